import random

import pytest
from conftest import tiny_llama
from pydantic import ValidationError

from evocomp.errors import EvocompError
from evocomp.spaces import SPACES
from evocomp.spaces.depth import DepthSpace
from evocomp.spaces.units import Unit
from evocomp.supernet.units import find_linear_units, find_sublayer_units


def _space(model=None, **kw) -> DepthSpace:
    model = model if model is not None else tiny_llama()
    return DepthSpace(find_sublayer_units(model), DepthSpace.Params(**kw))


def _kinds(space: DepthSpace, genome) -> tuple[int, int]:
    removed = space.removed(genome)
    return sum(u.kind == "attn" for u in removed), sum(u.kind == "mlp" for u in removed)


def test_registered_and_params_validated():
    assert SPACES.get("depth") is DepthSpace
    for bad in (
        {},
        {"remove": 2, "remove_fraction": 0.25},
        {"remove": 2, "typo": 1},
        {"remove": 2, "granularity": "block", "attn_fraction": 0.5},
        {"remove": -1},
        {"remove": 2, "swap": "cross"},
    ):
        with pytest.raises(ValidationError):
            DepthSpace.Params(**bad)


def test_uniform_drops_the_last_sublayers_and_sits_on_budget():
    space = _space(remove=3)
    g = space.uniform()
    assert g == (0, 0, 0, 0, 0, 1, 1, 1)  # mlp 2, attn 3, mlp 3
    assert space.cost(g) == space.budget == 3 and space.on_budget(g)
    assert [r["removed"] for r in space.describe(g)] == [bool(x) for x in g]
    assert space.variant(0, 0) is None and space.variant(0, 1) == 1
    assert space.variants() == {}  # no database needed
    assert space.params_removed(g) == 24576 + 12288 + 24576
    space.check_movable()


def test_remove_fraction_snaps_to_a_reachable_count():
    assert _space(remove_fraction=0.25).budget == 2
    assert _space(remove_fraction=0.3, granularity="block").budget == 2  # 2.4 -> one block
    assert _space(remove_fraction=0.4, granularity="pair").budget == 4  # 3.2 -> one pair


def test_unreachable_counts_and_wrong_units_are_errors():
    with pytest.raises(EvocompError, match=r"remove=3 .*'block'.*allowed: 0, 2, 4"):
        _space(remove=3, granularity="block")
    with pytest.raises(EvocompError, match=r"allowed: 0, 1, 2, \.\.\., 8 \(a depth search "
                       r"itself: 1, 2, 3, 4, 5, 6, 7\)$"):
        _space(remove=9)
    for whole in (0, 8):  # nothing to swap: the message gives the counts that work
        with pytest.raises(EvocompError, match=r"needs one of: 1, 2, 3, 4, 5, 6, 7"):
            _space(remove=whole).check_movable()
    with pytest.raises(EvocompError, match="sublayer units"):
        DepthSpace(find_linear_units(tiny_llama()), DepthSpace.Params(remove=1))
    with pytest.raises(EvocompError, match="only 4"):
        _space(remove=6, attn_fraction=1.0)


def test_feasibility_allows_fewer_removed_but_never_more():
    space = _space(remove=3)
    assert space.is_feasible(space.dense()) and not space.on_budget(space.dense())
    assert space.is_feasible((1, 0, 1, 0, 0, 0, 0, 0))
    assert not space.is_feasible((1, 1, 1, 1, 0, 0, 0, 0))  # 4 > 3
    assert not space.is_feasible((0,) * 7) and not space.is_feasible((2,) + (0,) * 7)


def test_thousands_of_mutations_swap_same_kind_and_stay_exactly_on_budget():
    space = _space(model=tiny_llama(layers=8), remove=5)
    rng = random.Random(0)
    g = space.uniform()
    split = _kinds(space, g)
    seen = set()
    for _ in range(3000):
        child = space.mutate(g, rng)
        moved = [i for i in range(len(g)) if g[i] != child[i]]
        if moved:  # one removed and one kept sublayer of the same kind trade places
            assert len(moved) == 2 and len({space.units[i].kind for i in moved}) == 1
        g = space.mutate(child, rng, switches=rng.randint(1, 3))
        assert space.cost(g) == space.budget and space.on_budget(g)
        assert _kinds(space, g) == split
        seen.add(g)
    assert len(seen) > 500


def test_any_swap_moves_removals_between_kinds():
    space = _space(model=tiny_llama(layers=8), remove=5, swap="any")
    rng = random.Random(1)
    g, splits = space.uniform(), set()
    for _ in range(2000):
        g = space.mutate(g, rng)
        assert space.cost(g) == space.budget
        splits.add(_kinds(space, g))
    assert len(splits) >= 4


def test_attn_fraction_sets_the_start_split():
    space = _space(remove=3, attn_fraction=1.0)
    assert space.uniform() == (0, 0, 1, 0, 1, 0, 1, 0)  # the last three attention sublayers
    assert space.quota == {"attn": 3, "mlp": 0}
    assert _space(remove=3, attn_fraction=1.0, swap="any").quota is None
    rng = random.Random(0)
    assert all(_kinds(space, space.random(rng)) == (3, 0) for _ in range(50))


@pytest.mark.parametrize("granularity, size", [("block", 2), ("pair", 4)])
def test_coarse_granularities_move_whole_groups(granularity, size):
    space = _space(model=tiny_llama(layers=6), remove=size, granularity=granularity)
    assert all(len(grp) == size for grp in space.groups)
    assert space.uniform() == (0,) * (12 - size) + (1,) * size
    rng = random.Random(0)
    g, seen = space.uniform(), set()
    for _ in range(1000):
        g = space.mutate(g, rng, switches=rng.randint(1, 2))
        assert space.on_budget(g)
        blocks = sorted({u.block for u in space.removed(g)})
        assert len(blocks) == size // 2
        if granularity == "pair":
            assert blocks[0] % 2 == 0 and blocks == list(range(blocks[0], blocks[0] + 2))
        seen.add(g)
    assert len(seen) == 12 // size
    untied = list(space.uniform())
    untied[-1] = 0
    assert not space.is_feasible(tuple(untied))


def test_pairs_align_to_the_last_block_with_an_odd_count():
    space = _space(model=tiny_llama(layers=5), remove=4, granularity="pair")
    assert [sorted({space.units[i].block for i in grp}) for grp in space.groups] == [
        [0],
        [1, 2],
        [3, 4],
    ]
    assert {u.block for u in space.removed(space.uniform())} == {3, 4}
    with pytest.raises(EvocompError, match="allowed: 0, 4, 8, 10"):
        _space(model=tiny_llama(layers=5), remove=2, granularity="pair")


def test_can_remove_keeps_the_budget_reachable():
    units = [Unit(f"b{b}.{k}", k, b, (1, 1)) for b in range(5) for k in ("attn", "mlp")]
    space = DepthSpace(units, DepthSpace.Params(remove=8, granularity="pair"))
    dense = space.dense()
    first = next(k for k, grp in enumerate(space.groups) if len(grp) == 2)
    assert not space.can_remove(dense, first)  # 2 + pairs of 4 never make 8
    assert all(space.can_remove(dense, k) for k, g in enumerate(space.groups) if len(g) == 4)
    quota = _space(remove=3, attn_fraction=2 / 3)  # 2 attention, 1 MLP
    g = quota.remove_group(quota.dense(), 1)  # mlp 0
    assert not quota.can_remove(g, 3)  # a second MLP would exceed the quota
    assert quota.can_remove(g, 0)


@pytest.mark.parametrize(
    "params",
    [
        {"remove": 5},
        {"remove": 5, "swap": "any"},
        {"remove": 3, "attn_fraction": 1 / 3},
        {"remove": 4, "granularity": "block"},
        {"remove": 8, "granularity": "pair"},
    ],
)
def test_repair_puts_any_genome_exactly_on_budget(params):
    space = _space(model=tiny_llama(layers=5), **params)
    rng = random.Random(0)
    for _ in range(300):
        junk = tuple(rng.choice((0, 0, 1, 3)) for _ in range(len(space)))
        fixed = space.repair(junk, rng)
        assert space.on_budget(fixed)
        if space.quota is not None:
            assert _kinds(space, fixed) == (space.quota["attn"], space.quota["mlp"])
    assert space.repair(space.uniform(), rng) == space.uniform()
    assert space.baseline_name == "drop-last"


@pytest.mark.parametrize("granularity", ["sublayer", "block", "pair"])
def test_make_valid_clamps_and_makes_groups_whole(granularity):
    space = _space(model=tiny_llama(layers=4), remove=4, granularity=granularity)
    rng = random.Random(0)
    for _ in range(100):
        junk = tuple(rng.choice((-1, 0, 0, 1, 3)) for _ in range(len(space)))
        fixed = space.make_valid(junk)
        assert space.is_valid(fixed)
        assert fixed == space.make_whole(tuple(min(max(0, x), 1) for x in junk))
    assert space.make_valid(space.dense()) == space.dense()  # valid, if under budget
    over = (1,) * len(space)
    assert space.make_valid(over) == over and not space.is_feasible(over)  # budget aside


@pytest.mark.parametrize("granularity", ["sublayer", "block", "pair"])
def test_wander_toggles_whole_groups_and_crosses_the_budget(granularity):
    space = _space(model=tiny_llama(layers=4), remove=4, granularity=granularity)
    rng = random.Random(1)
    g, counts = space.uniform(), set()
    for _ in range(300):
        nxt = space.wander(g, rng, steps=1, rise=rng.random())
        assert space.is_valid(nxt)
        moved = [i for i in range(len(g)) if g[i] != nxt[i]]
        assert not moved or sorted(moved) in [sorted(grp) for grp in space.groups]
        g = nxt
        counts.add(space.cost(g))
    assert max(counts) > space.budget  # more removed than the budget allows: valid
    groups = len(space.groups)
    assert space.wander(space.uniform(), rng, steps=groups, rise=0.0) == space.dense()
    assert space.wander(space.uniform(), rng, steps=groups, rise=1.0) == (1,) * len(space)
