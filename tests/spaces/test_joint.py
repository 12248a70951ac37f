import random

import pytest
from pydantic import ValidationError

from evocomp.errors import EvocompError
from evocomp.spaces import JointSpace
from evocomp.spaces.units import Unit

SPARSITY = {"name": "sparsity", "target": 0.5, "step": 0.125, "levels": 2}
BITS = {"name": "bits", "bits": [2, 3, 4, 5, 6], "target": 4}


def _units(blocks: int = 4) -> list[Unit]:
    units = []
    for b in range(blocks):
        for name, shape in [
            ("self_attn.q_proj", (64, 64)),
            ("self_attn.o_proj", (64, 64)),
            ("mlp.up_proj", (128, 64)),
            ("mlp.down_proj", (64, 128)),
        ]:
            units.append(Unit(f"model.layers.{b}.{name}", "linear", b, shape))
        units.append(Unit(f"model.layers.{b}.self_attn", "attn", b, (8192, 1)))
        units.append(Unit(f"model.layers.{b}.mlp", "mlp", b, (16384, 1)))
    return units


def _space(*parts, **options) -> JointSpace:
    return JointSpace(_units(), JointSpace.Params(spaces=list(parts), **options))


def _cost_from_rows(space: JointSpace, genome) -> int:
    """The joint cost recomputed from the readable rows: nonzeros × bits × alive."""
    total = 0
    for row in space.describe(genome):
        numel = dict((a.name, a.numel) for a in space.atoms)[row["unit"]]
        kept = row.get("nonzeros", numel)
        total += 0 if row.get("removed") else kept * row.get("bits", 1)
    return total


@pytest.mark.parametrize(
    "parts",
    [
        (SPARSITY, BITS),
        ({"name": "depth", "remove": 2}, SPARSITY),
        ({"name": "depth", "remove": 2, "granularity": "block"}, SPARSITY, BITS | {"target": 3}),
    ],
    ids=["sparsity-bits", "depth-sparsity", "block-depth-sparsity-bits"],
)
def test_thousands_of_mutations_stay_feasible_and_spend_the_budget(parts):
    space = _space(*parts)
    rng = random.Random(0)
    genome = space.uniform()
    assert space.is_maximal(genome)
    visited: list[set] = [set() for _ in parts]
    for _ in range(1000):
        genome = space.mutate(genome, rng, switches=rng.randint(1, 3))
        assert space.is_feasible(genome) and space.is_maximal(genome)
        for seen, part in zip(visited, space.split(genome), strict=True):
            seen.add(part)
    assert space.cost(genome) == _cost_from_rows(space, genome)
    assert all(len(seen) > 10 for seen in visited)  # every part moves


def test_default_budget_is_the_parts_starts_combined():
    space = _space(SPARSITY, BITS)
    assert space.per_weight(space.uniform()) == pytest.approx(0.5 * 4)
    assert space.budget == space.cost(space.uniform())
    assert space.compressor_kind == "sparsity+bits"
    assert space.baseline_name == "uniform"
    depth = _space({"name": "depth", "remove": 2}, SPARSITY)
    assert depth.compressor_kind == "sparsity"
    assert depth.baseline_name == "drop-last+uniform"


def test_trades_move_cost_between_dimensions():
    """Removing sublayers and pruning less elsewhere (or the reverse) must happen:
    exact switches alone could never change how many sublayers are removed."""
    space = _space({"name": "depth", "remove": 2}, SPARSITY)
    rng = random.Random(1)
    genome = space.uniform()
    removed_counts, mean_sparsity = set(), set()
    for _ in range(300):
        genome = space.mutate(genome, rng)
        depth, sparsity = space.split(genome)
        removed_counts.add(sum(depth))
        mean_sparsity.add(round(sum(sparsity) / len(sparsity), 3))
    assert len(removed_counts) >= 3 and len(mean_sparsity) >= 3


def test_explicit_target_repairs_the_start_onto_the_budget():
    space = _space(SPARSITY, BITS, target=2.5)
    start = space.uniform()
    assert space.budget == int(2.5 * sum(a.numel for a in space.atoms))
    assert space.is_maximal(start) and space.baseline_name == "start"
    assert 2.4 < space.per_weight(start) <= 2.5
    with pytest.raises(EvocompError, match="below its cheapest genome"):
        _space(SPARSITY, BITS, target=0.1)


def test_repair_makes_any_genome_feasible_and_whole():
    space = _space({"name": "depth", "remove": 2, "granularity": "block"}, SPARSITY)
    rng = random.Random(3)
    for _ in range(50):
        wild = tuple(rng.randrange(-1, 6) for _ in range(len(space)))
        fixed = space.repair(wild, rng)
        assert space.is_maximal(fixed)
    assert space.is_maximal(space.random(rng))


def test_placements_combine_sparsity_and_bits_and_skip_removed_sublayers():
    space = _space({"name": "depth", "remove": 1}, SPARSITY, BITS)
    genome = space.uniform()
    placed = dict((u.name, key) for u, key in space.placements(genome))
    assert placed["model.layers.3.mlp"] == 1  # drop-last removes the last MLP
    assert "model.layers.3.mlp.up_proj" not in placed  # no weight for a skipped sublayer
    assert placed["model.layers.0.mlp.up_proj"] == (128 * 64 // 2, 4)
    variants = space.variants()
    assert (0, 2) not in variants["model.layers.0.self_attn.q_proj"]  # levels 0.25..0.75
    assert len(variants["model.layers.0.self_attn.q_proj"]) == 5 * 5
    rows = space.describe(genome)
    assert {"sparsity", "nonzeros", "bits", "removed", "cost"} <= set(rows[0])


def test_bad_parts_are_named():
    with pytest.raises(ValidationError, match=r"spaces\[1\].name='width'"):
        JointSpace.Params(spaces=[SPARSITY, {"name": "width"}])
    with pytest.raises(ValidationError, match="appears twice"):
        JointSpace.Params(spaces=[SPARSITY, SPARSITY])
    with pytest.raises(ValidationError, match=r"spaces\[1\]: .*outside the allowed bitwidths"):
        JointSpace.Params(spaces=[SPARSITY, BITS | {"target": 9}])
    with pytest.raises(ValidationError, match=r"spaces\[0\].levels"):
        JointSpace.Params(spaces=[SPARSITY | {"levels": 0}, BITS])
    with pytest.raises(ValidationError, match="at least two parts"):
        JointSpace.Params(spaces=[SPARSITY])


def test_a_gguf_bits_part_is_refused():
    """Its keys are GGUF type ids, which a joint (zeros, bits) key would misread."""
    gguf = {"name": "bits", "preset": "gguf", "target": 5.0}
    with pytest.raises(ValidationError, match=r"spaces\[1\]: .*gguf compressor variants.*alone"):
        JointSpace.Params(spaces=[SPARSITY, gguf])


def test_make_valid_makes_each_part_valid_by_its_own_rules():
    space = _space({"name": "depth", "remove": 2, "granularity": "block"}, SPARSITY, BITS)
    rng = random.Random(0)
    for _ in range(50):
        wild = tuple(rng.randrange(-2, 7) for _ in range(len(space)))
        fixed = space.make_valid(wild)
        assert space.is_valid(fixed)
        parts = zip(space.parts, space.split(wild), space.split(fixed), strict=True)
        assert all(p.make_valid(w) == f for p, w, f in parts)
    with pytest.raises(ValueError, match="genes"):
        space.make_valid((0,) * 3)


def test_wander_moves_every_part_across_the_whole_cost_range():
    space = _space({"name": "depth", "remove": 2, "granularity": "block"}, SPARSITY, BITS)
    rng = random.Random(1)
    start = space.uniform()
    g, visited = start, [set() for _ in space.parts]
    for _ in range(300):
        g = space.wander(g, rng, steps=rng.randint(1, 3), rise=rng.random())
        assert space.is_valid(g)
        for seen, part in zip(visited, space.split(g), strict=True):
            seen.add(part)
    assert all(len(seen) > 5 for seen in visited)
    span = sum(space.n_levels(i) - 1 for i in range(len(space)))
    cheapest = space.wander(start, rng, steps=span, rise=0.0)
    dearest = space.wander(start, rng, steps=span, rise=1.0)
    assert space.cost(cheapest) == 0  # every sublayer removed: nothing stored
    depth, sparsity, bits = space.split(dearest)
    assert sum(depth) == 0 and set(sparsity) == {0} and set(bits) == {4}  # dense, 6 bits
    assert space.cost(dearest) > space.budget
    down = space.wander(start, rng, steps=6, rise=0.0)
    up = space.wander(start, rng, steps=6, rise=1.0)
    assert space.cost(down) < space.cost(start) < space.cost(up)
