import random

import pytest
from pydantic import ValidationError

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
