import random
from fractions import Fraction

import pytest
from pydantic import ValidationError

from evocomp.errors import EvocompError
from evocomp.spaces import SPACES, BitsSpace
from evocomp.supernet.units import find_linear_units


def _space(model, **kw) -> BitsSpace:
    return BitsSpace(find_linear_units(model), BitsSpace.Params(**kw))


def test_integer_target_has_an_exact_uniform_baseline(tiny_model):
    space = _space(tiny_model, target=3)
    g = space.uniform()
    assert space.has_uniform
    assert {r["bits"] for r in space.describe(g)} == {3}
    assert space.cost(g) == space.budget and space.average_bits(g) == 3.0


@pytest.mark.parametrize("target", [2.5, 3.25, 4.9])
def test_off_level_target_starts_feasible_and_close_to_budget(tiny_model, target):
    space = _space(tiny_model, target=target)
    g = space.uniform()
    assert not space.has_uniform
    assert space.is_feasible(g)
    largest_step = max(u.numel for u in space.units) * 2  # 6 -> 8 bits is the widest step
    assert space.budget - space.cost(g) < largest_step
    assert space.average_bits(g) == pytest.approx(target, abs=0.3)


def test_mutations_keep_stored_bits_exactly_constant(tiny_model):
    space = _space(tiny_model, target=2.5)
    rng = random.Random(0)
    g = space.uniform()
    cost = space.cost(g)
    seen = set()
    for _ in range(3000):
        g = space.mutate(g, rng, switches=rng.randint(1, 3))
        assert space.cost(g) == cost <= space.budget
        seen.add(g)
    assert len(seen) > 500
    assert {lvl for genome in seen for lvl in genome} >= {0, 1, 2, 3}


def test_repair_makes_any_genome_feasible_and_spends_the_budget(tiny_model):
    space = _space(tiny_model, target=3.0)
    rng = random.Random(1)
    for _ in range(50):
        junk = tuple(rng.randrange(6) for _ in range(len(space)))
        fixed = space.repair(junk, rng)
        assert space.is_feasible(fixed)
        # Nothing left that a single one-level raise could still afford.
        slack = space.budget - space.cost(fixed)
        assert all(
            fixed[i] == 5 or space.level_cost(i, fixed[i] + 1) - space.level_cost(i, fixed[i])
            > slack
            for i in range(len(space))
        )


def test_variants_are_bitwidths_and_16_bits_means_dense(tiny_model):
    space = _space(tiny_model, target=4, bits=[2, 4, 16])
    assert space.variant(0, 0) == 2 and space.variant(0, 1) == 4 and space.variant(0, 2) is None
    assert space.variants()[space.units[0].name] == [2, 4]


def test_bad_targets_are_rejected():
    with pytest.raises(ValidationError, match="outside the allowed bitwidths"):
        BitsSpace.Params(target=1.5)
    with pytest.raises(ValidationError, match="2..16"):
        BitsSpace.Params(bits=[1, 4])
    assert SPACES.get("bits") is BitsSpace


# -- preset gguf: llama.cpp tensor types as levels ----------------------------------


def _gguf(model, **kw) -> BitsSpace:
    return _space(model, preset="gguf", **kw)


def test_gguf_levels_are_types_by_size_costing_their_stored_blocks(tiny_model):
    space = _gguf(tiny_model, target=5.0, types=["Q8_0", "Q4_0", "Q5_1", "Q4_1", "Q4_0"])
    assert space.params.types == ["Q4_0", "Q4_1", "Q5_1", "Q8_0"]
    assert space.compressor_kind == "gguf" and BitsSpace.compressor_kind == "bits"
    unit = space.units[0]
    assert [space.level_cost(0, lv) for lv in range(4)] == [
        unit.numel // 32 * nbytes * 8 for nbytes in (18, 20, 24, 34)
    ]
    assert [space.variant(0, lv) for lv in range(4)] == [2, 3, 7, 8]  # GGMLQuantizationType
    assert space.describe_level(0, 0) == {"bits": 4.5, "type": "Q4_0"}
    assert space.size_factor(0, 3) == Fraction(17, 2)
    g = space.uniform()
    assert space.has_uniform and set(g) == {1}
    assert space.cost(g) == space.budget and space.average_bits(g) == 5.0
    assert {r["type"] for r in space.describe(g)} == {"Q4_1"}
    assert space.variants()[unit.name] == [2, 3, 7, 8]


def test_gguf_defaults_and_off_level_targets(tiny_model):
    space = _gguf(tiny_model, target=5.25)
    assert space.params.types == ["MXFP4", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
    assert space.params.bits is None
    g = space.uniform()
    assert not space.has_uniform and space.is_feasible(g)
    rng = random.Random(0)
    cost = space.cost(g)
    for _ in range(500):
        g = space.mutate(g, rng)
        assert space.cost(g) == cost
    # A dumped config validates again as it was (the unused list stays None).
    assert BitsSpace.Params(**space.params.model_dump()) == space.params


def test_plain_bits_keep_their_kind_and_defaults(tiny_model):
    space = _space(tiny_model, target=3)
    assert space.compressor_kind == "bits" and space.params.types is None
    assert space.params.bits == [2, 3, 4, 5, 6, 8]
    assert BitsSpace.Params(**space.params.model_dump()) == space.params


def test_gguf_options_are_checked():
    with pytest.raises(ValidationError, match="unknown GGUF type 'Q4_K'; types allowed: .*'Q4_0'"):
        BitsSpace.Params(preset="gguf", target=5, types=["Q4_0", "Q4_K"])
    with pytest.raises(ValidationError, match="bits does not go with preset gguf"):
        BitsSpace.Params(preset="gguf", target=5, bits=[4, 8])
    with pytest.raises(ValidationError, match="types needs preset: gguf"):
        BitsSpace.Params(target=4, types=["Q4_0"])
    with pytest.raises(ValidationError, match=r"outside the range of the GGUF types Q4_0 \(4.5\)"):
        BitsSpace.Params(preset="gguf", target=4, types=["Q4_0", "Q8_0"])
    with pytest.raises(ValidationError, match="outside the range"):
        BitsSpace.Params(preset="gguf")  # the default target, 3 bits, is below every type
    with pytest.raises(ValidationError, match="preset"):
        BitsSpace.Params(preset="gptq", target=4)


def test_gguf_types_must_fit_the_rows(tiny_model):
    """TQ2_0 stores 256-weight blocks; the tiny model's rows hold 64 or 128 weights."""
    with pytest.raises(EvocompError, match=r"TQ2_0 stores rows in blocks of 256.*rows of 64"):
        _gguf(tiny_model, target=4.5, types=["TQ2_0", "Q4_0"])
