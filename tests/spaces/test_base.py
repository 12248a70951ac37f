"""The unconstrained operators every space shares: make_valid and wander."""

import random
import time

import pytest

from evocomp.spaces import BitsSpace, SearchSpace, SparsitySpace
from evocomp.spaces.units import Unit


def _units(n: int = 10, sizes=((16, 16), (16, 32))) -> list[Unit]:
    return [Unit(f"l{i}", "linear", i, sizes[i % len(sizes)]) for i in range(n)]


def _sparsity(n: int = 10) -> SparsitySpace:
    return SparsitySpace(_units(n), SparsitySpace.Params(target=0.5, step=0.1, levels=4))


def _bits(n: int = 10) -> BitsSpace:
    return BitsSpace(_units(n), BitsSpace.Params(target=4, bits=[2, 3, 4, 6, 8]))


def _span(space) -> int:
    return sum(space.n_levels(i) - 1 for i in range(len(space)))


def _end(space, pick) -> tuple[int, ...]:
    """Each gene at its cheapest (``pick=min``) or dearest (``max``) level."""
    return tuple(
        pick(range(space.n_levels(i)), key=lambda lv, i=i: space.level_cost(i, lv))
        for i in range(len(space))
    )


class _Generic(SparsitySpace):
    """A space that only has the contract's defaults for drawing steps and their cost."""

    random_step = SearchSpace.random_step
    _delta = SearchSpace._delta


SPACES = [_sparsity, _bits, lambda: _Generic(_units(), SparsitySpace.Params(step=0.1))]
IDS = ["sparsity", "bits", "generic"]


@pytest.mark.parametrize("make", [_sparsity, _bits], ids=IDS[:2])
def test_make_valid_clamps_levels_and_keeps_valid_genomes(make):
    space = make()
    rng = random.Random(0)
    top = [space.n_levels(i) - 1 for i in range(len(space))]
    wild = tuple(rng.randrange(-3, 12) for _ in range(len(space)))
    fixed = space.make_valid(wild)
    assert space.is_valid(fixed)
    assert fixed == tuple(min(max(0, x), t) for x, t in zip(wild, top, strict=True))
    for _ in range(20):
        g = space.wander(space.uniform(), rng, steps=20, rise=rng.random())
        assert space.make_valid(g) == g
    with pytest.raises(ValueError, match="genes"):
        space.make_valid((0,) * (len(space) + 1))


@pytest.mark.parametrize("make", SPACES, ids=IDS)
def test_wander_is_valid_whatever_the_budget_and_rise_sets_the_direction(make):
    space = make()
    rng = random.Random(1)
    start = space.uniform()
    for rise in (0.0, 0.3, 0.7, 1.0):
        g = start
        for _ in range(30):
            g = space.wander(g, rng, steps=rng.randint(1, 4), rise=rise)
            assert space.is_valid(g)
    down = [space.cost(space.wander(start, rng, steps=12, rise=0.0)) for _ in range(10)]
    up = [space.cost(space.wander(start, rng, steps=12, rise=1.0)) for _ in range(10)]
    assert max(down) < space.cost(start) < min(up)
    assert space.wander(start, rng, steps=0) == start
    seen = {space.wander(start, rng, steps=3) for _ in range(50)}
    assert len(seen) > 20  # random steps, not one path
    assert any(not space.is_feasible(g) for g in seen)  # the budget does not bind


@pytest.mark.parametrize("make", SPACES, ids=IDS)
def test_wander_reaches_both_ends_of_the_cost_range_and_stays_there(make):
    space = make()
    rng = random.Random(2)
    start, span = space.uniform(), _span(space)
    cheapest = space.wander(start, rng, steps=span, rise=0.0)
    dearest = space.wander(start, rng, steps=span, rise=1.0)
    assert (cheapest, dearest) == (_end(space, min), _end(space, max))
    assert space.wander(cheapest, rng, steps=5, rise=0.0) == cheapest
    assert space.wander(dearest, rng, steps=5, rise=1.0) == dearest
    # Each step moves one gene one level: k rising steps from the bottom move k levels.
    raised = space.wander(cheapest, rng, steps=7, rise=1.0)
    assert sum(abs(a - b) for a, b in zip(raised, cheapest, strict=True)) == 7


def test_random_rise_spreads_genomes_over_the_cost_range():
    space = _sparsity()
    rng = random.Random(3)
    start, span = space.uniform(), _span(space)
    costs = [
        space.cost(space.wander(start, rng, steps=span // 2, rise=rng.random())) for _ in range(200)
    ]
    lo = space.cost(space.wander(start, rng, steps=span, rise=0.0))
    hi = space.cost(space.wander(start, rng, steps=span, rise=1.0))
    quarter = (hi - lo) / 4
    assert all(lo <= c <= hi for c in costs)
    assert sum(c < lo + quarter for c in costs) > 20
    assert sum(c > hi - quarter for c in costs) > 20


def test_wander_is_cheap_on_a_real_sized_space():
    """~200 genes (a 30-block model's linears) × 800 steps, the size of a
    multi-objective search's start population draws."""
    space = _sparsity(210)
    rng = random.Random(4)
    t = time.perf_counter()
    for rise in (0.0, 0.5, 1.0):
        space.wander(space.uniform(), rng, steps=800, rise=rise)
    assert time.perf_counter() - t < 3.0  # ~0.1 s when the machine is idle


def test_wander_is_a_function_of_the_rng():
    space = _bits()
    a = space.wander(space.uniform(), random.Random(7), steps=40, rise=0.4)
    b = space.wander(space.uniform(), random.Random(7), steps=40, rise=0.4)
    assert a == b
