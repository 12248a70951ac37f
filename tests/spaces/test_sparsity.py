import random

import pytest
from pydantic import ValidationError

from evocomp.errors import EvocompError
from evocomp.spaces import SPACES, SparsitySpace
from evocomp.spaces.units import Unit
from evocomp.supernet.units import find_linear_units


def _space(model, **kw) -> SparsitySpace:
    return SparsitySpace(find_linear_units(model), SparsitySpace.Params(**kw))


def test_uniform_is_on_budget_and_at_target(tiny_model):
    space = _space(tiny_model, target=0.5, step=0.1, levels=3)
    g = space.uniform()
    assert space.cost(g) == space.budget
    assert space.sparsity(g) == pytest.approx(0.5, abs=1e-4)
    assert all(row["sparsity"] == pytest.approx(0.5, abs=1e-3) for row in space.describe(g))


def test_thousands_of_mutations_keep_nonzeros_exactly_on_budget(tiny_model):
    space = _space(tiny_model, target=0.6, step=0.05, levels=4)
    rng = random.Random(0)
    g = space.uniform()
    seen = set()
    for _ in range(5000):
        g = space.mutate(g, rng, switches=rng.randint(1, 3))
        assert space.cost(g) == space.budget
        assert space.is_feasible(g)
        seen.add(g)
    assert len(seen) > 1000  # the walk really moves
    assert min(min(x) for x in seen) == 0 and max(max(x) for x in seen) == 8


def test_switches_only_trade_between_equal_sized_units():
    units = [Unit(f"l{i}", "linear", i, shape, False) for i, shape in
             enumerate([(8, 8), (8, 8), (16, 8), (16, 8), (3, 5)])]
    space = SparsitySpace(units, SparsitySpace.Params(target=0.5, step=0.25, levels=1))
    rng = random.Random(1)
    for _ in range(500):
        g = space.mutate(space.uniform(), rng)
        moved = [i for i, lvl in enumerate(g) if lvl != 1]
        assert moved in ([], [0, 1], [2, 3])
        assert space.cost(g) == space.budget


def test_random_genomes_are_feasible_and_diverse(tiny_model):
    space = _space(tiny_model)
    rng = random.Random(3)
    genomes = {space.random(rng) for _ in range(20)}
    assert len(genomes) == 20
    assert all(space.cost(g) == space.budget for g in genomes)


def test_levels_outside_unit_interval_are_rejected():
    with pytest.raises(ValidationError, match="at most 2 levels fit"):
        SparsitySpace.Params(target=0.9, step=0.05, levels=4)
    with pytest.raises(ValidationError, match="less than 1"):
        SparsitySpace.Params(target=1.3)


def test_space_without_tradeable_units_fails_early():
    units = [Unit("a", "linear", 0, (4, 4)), Unit("b", "linear", 1, (4, 5))]
    space = SparsitySpace(units, SparsitySpace.Params(target=0.5, step=0.25, levels=1))
    with pytest.raises(EvocompError, match="no budget-preserving level switch"):
        space.check_movable()


def test_registered_by_name():
    assert SPACES.get("sparsity") is SparsitySpace
    with pytest.raises(EvocompError, match="unknown space 'sparsty'; allowed: .*'sparsity'"):
        SPACES.get("sparsty")


def test_variants_list_every_zero_count(tiny_model):
    space = _space(tiny_model, target=0.5, step=0.1, levels=2)
    variants = space.variants()
    unit = space.units[0]
    assert variants[unit.name] == sorted(
        round(0.5 * unit.numel) + k * round(0.1 * unit.numel) for k in range(-2, 3)
    )
