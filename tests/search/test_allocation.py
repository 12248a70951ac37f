"""OWL and sensitivity allocations: OWL's formula and its settling onto the budget,
the knapsack against brute force, the probing generator, and both as EvoPress
start genomes."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from conftest import tiny_llama
from pydantic import ValidationError

from evocomp.errors import EvocompError
from evocomp.runner import prepare_optimizer
from evocomp.search import OPTIMIZERS
from evocomp.search.allocation import OWL, Sensitivity, knapsack, nearest_on_budget, owl_offsets
from evocomp.search.evopress import EvoPress
from evocomp.spaces import BitsSpace, DepthSpace, SparsitySpace
from evocomp.spaces.units import Unit
from evocomp.spaces.width import WidthSpace
from evocomp.supernet.units import find_linear_units, find_sublayer_units

TOKENS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))


def _tiny_sparsity(**kw) -> SparsitySpace:
    params = {"target": 0.5, "step": 0.05, "levels": 4, **kw}
    return SparsitySpace(find_linear_units(tiny_llama()), SparsitySpace.Params(**params))


def _small_space(levels: int = 2) -> SparsitySpace:
    """Four layers of different sizes (different cost tables), 2·levels+1 levels."""
    shapes = [(8, 8), (8, 16), (16, 16), (4, 8)]
    units = [Unit(f"l{i}", "linear", i, s) for i, s in enumerate(shapes)]
    return SparsitySpace(units, SparsitySpace.Params(target=0.5, step=0.125, levels=levels))


def _block_sparsity(space: SparsitySpace, genome) -> dict[int, float]:
    rows = space.describe(genome)
    out: dict[int, list[float]] = {}
    for r in rows:
        out.setdefault(r["block"], []).append(r["sparsity"])
    return {b: sum(v) / len(v) for b, v in out.items()}


# -- OWL ---------------------------------------------------------------------------


def test_owl_offsets_follow_the_formula():
    ratios = [0.01, 0.05, 0.02, 0.03]
    offsets = owl_offsets(ratios, 0.08)
    # (D - min) / (max - min) * 2λ, minus its mean
    scaled = [0.0, 0.16, 0.04, 0.08]
    assert offsets == pytest.approx([s - 0.07 for s in scaled])
    assert sum(offsets) == pytest.approx(0.0, abs=1e-12)
    assert max(offsets) - min(offsets) == pytest.approx(0.16)
    assert owl_offsets([0.3, 0.3, 0.3], 0.08) == [0.0, 0.0, 0.0]


def test_owl_allocation_is_on_budget_and_spares_outlier_rich_blocks():
    space = _tiny_sparsity()
    opt = OWL(space, OWL.Params(lam=0.08))
    with pytest.raises(RuntimeError, match="prepare"):
        opt.genome()
    ratios = [0.01, 0.05, 0.02, 0.03]
    opt.prepare(ratios)
    shares = opt.shares()
    # Before rounding: kept shares within 1 - target ± 2λ, averaging 1 - target.
    assert all(0.5 - 0.16 - 1e-9 <= s <= 0.5 + 0.16 + 1e-9 for s in shares)
    assert sum(shares) / len(shares) == pytest.approx(0.5, abs=1e-4)
    genome = opt.ask()[0].genome
    assert space.is_feasible(genome) and space.cost(genome) == space.budget
    sparsity = _block_sparsity(space, genome)
    order = sorted(range(4), key=ratios.__getitem__)  # fewest outliers first
    assert [sparsity[b] for b in order] == sorted(sparsity.values(), reverse=True)
    # Each block sits at the grid point nearest target - offset (0.57, 0.41, 0.53, 0.49).
    assert [sparsity[b] for b in range(4)] == pytest.approx([0.55, 0.40, 0.55, 0.50], abs=1e-3)
    opt.tell([1.0])
    assert opt.best_genome == genome and opt.ask() == []


def test_owl_rounding_is_settled_exactly_onto_the_budget():
    space = _tiny_sparsity()
    rng = random.Random(0)
    for _ in range(20):
        wanted = [rng.uniform(0.2, 0.9) for _ in range(len(space))]
        genome = nearest_on_budget(space, wanted)
        assert space.cost(genome) == space.budget
    # Equal ratios leave the uniform genome.
    opt = OWL(space, OWL.Params())
    opt.prepare([0.2] * 4)
    assert opt.genome() == space.uniform()


def test_owl_on_width_measures_the_linears_inside_sublayers():
    model = tiny_llama()
    width = WidthSpace(find_sublayer_units(model), WidthSpace.Params(step=0.25, neuron_multiple=8))
    opt = OWL(width, OWL.Params(lam=0.2, batch_size=1))
    prepare_optimizer(opt, model, TOKENS)
    assert opt.ratios is not None and len(opt.ratios) == 4
    sparsity = OWL(_tiny_sparsity(), OWL.Params(batch_size=1))
    prepare_optimizer(sparsity, model, TOKENS)
    # A block's sublayers cover exactly its linears: the same ratios.
    assert opt.ratios == pytest.approx(sparsity.ratios)
    assert width.is_feasible(opt.genome())


def test_owl_and_sensitivity_refuse_spaces_without_the_capability():
    model = tiny_llama()
    bits = BitsSpace(find_linear_units(model), BitsSpace.Params(target=4, bits=[2, 3, 4, 8]))
    with pytest.raises(EvocompError, match="space.name one of: 'sparsity', 'width'"):
        OWL(bits, OWL.Params())
    depth = DepthSpace(find_sublayer_units(model), DepthSpace.Params(remove=2))
    with pytest.raises(EvocompError, match=r"space.name one of: 'bits', 'sparsity', 'width' \("):
        Sensitivity(depth, Sensitivity.Params())
    Sensitivity(bits, Sensitivity.Params())  # bits: levels combine freely
    with pytest.raises(ValidationError):
        OWL.Params(lam=0.0)
    with pytest.raises(ValidationError):
        Sensitivity.Params(radius=0)
    assert OPTIMIZERS.get("owl") is OWL and OPTIMIZERS.get("sensitivity") is Sensitivity


# -- sensitivity -------------------------------------------------------------------


def _brute_force(space, increase) -> float:
    best = float("inf")
    for genome in itertools.product(*(sorted(inc) for inc in increase)):
        if space.is_feasible(genome):
            best = min(best, sum(inc[g] for inc, g in zip(increase, genome, strict=True)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_finds_the_brute_force_optimum(seed):
    space = _small_space()
    rng = random.Random(seed)
    start = space.uniform()
    # Denser levels (lower index: fewer zeros) mostly hurt less, with noise.
    increase = [
        {lv: 0.0 if lv == start[i] else (lv - start[i]) * rng.uniform(0.1, 3) + rng.gauss(0, 0.3)
         for lv in range(space.n_levels(i))}
        for i in range(len(space))
    ]
    genome = knapsack(space, increase, resolution=100_000)
    assert space.is_feasible(genome)
    got = sum(inc[g] for inc, g in zip(increase, genome, strict=True))
    assert got == pytest.approx(_brute_force(space, increase), abs=1e-9)
    # A coarse grid stays feasible and is no worse than uniform.
    coarse = knapsack(space, increase, resolution=10)
    assert space.is_feasible(coarse)
    assert sum(inc[g] for inc, g in zip(increase, coarse, strict=True)) <= 1e-12


def _additive(space: SparsitySpace, weights):
    """A separable landscape: weighted squared sparsity per layer."""
    def fitness(genome) -> float:
        rows = space.describe(genome)
        return sum(w * r["sparsity"] ** 2 for w, r in zip(weights, rows, strict=True))
    return fitness


def test_sensitivity_probes_then_scores_the_optimal_allocation():
    space = _small_space()
    weights = [8.0, 0.5, 4.0, 0.1]
    fitness = _additive(space, weights)
    opt = Sensitivity(space, Sensitivity.Params(tokens=64, final_tokens=256, radius=1))
    assert opt.progress == (0, 2)
    probes = opt.ask()
    start = space.uniform()
    assert all(r.probe and r.tokens == 64 for r in probes)
    assert probes[0].genome == start and len(probes) == 1 + 2 * len(space)
    assert all(space.is_valid(r.genome) for r in probes)
    assert not all(space.is_feasible(r.genome) for r in probes)  # off budget
    opt.tell([fitness(r.genome) for r in probes])
    assert opt.progress == (1, 2) and opt.best_genome is None
    (final,) = opt.ask()
    assert not final.probe and final.tokens == 256 and space.is_feasible(final.genome)
    # The landscape is separable, so the increases are exact: brute force agrees.
    increase = [
        {lv: fitness(start[:i] + (lv,) + start[i + 1 :]) - fitness(start)
         for lv in range(start[i] - 1, start[i] + 2)}
        for i in range(len(space))
    ]
    assert fitness(final.genome) == pytest.approx(
        fitness(start) + _brute_force(space, increase), abs=1e-12
    )
    assert fitness(final.genome) < fitness(start)
    opt.tell([fitness(final.genome)])
    assert opt.best_genome == final.genome and opt.progress == (2, 2) and opt.ask() == []


def test_sensitivity_without_radius_probes_every_level_and_skips_diverged_ones():
    space = _small_space()
    opt = Sensitivity(space, Sensitivity.Params(radius=None))
    probes = opt.ask()
    assert len(probes) == 1 + sum(space.n_levels(i) - 1 for i in range(len(space)))
    start = space.uniform()
    fitness = _additive(space, [8.0, 0.5, 4.0, 0.1])
    # Every sparser level of layer 1 diverges: the allocation never uses them.
    scores = [
        float("nan") if r.genome[1] > start[1] else fitness(r.genome) for r in probes
    ]
    opt.tell(scores)
    (final,) = opt.ask()
    assert final.genome[1] <= start[1] and space.is_feasible(final.genome)


# -- as EvoPress start genomes ---------------------------------------------------------


def _drive(opt, fitness) -> list[list]:
    batches = []
    while requests := opt.ask():
        batches.append(requests)
        for r in requests:
            assert opt.space.is_valid(r.genome)
            assert r.probe or opt.space.is_feasible(r.genome)
        opt.tell([fitness(r.genome) for r in requests])
    return batches


def test_evopress_starts_from_owl_and_sensitivity():
    model = tiny_llama()
    space = _tiny_sparsity()
    weights = [1.0 + (i % 7) for i in range(len(space))]
    fitness = _additive(space, weights)
    params = EvoPress.Params(
        generations=1, offspring=2, start_from=["owl", "sensitivity"],
        stages=[{"tokens": 64, "keep": 1}],
    )
    opt = EvoPress(space, params)
    assert opt.token_budgets() == {"stages[0].tokens": 64, "start_from.sensitivity.tokens": 512}
    prepare_optimizer(opt, model, TOKENS)
    owl = OWL(space, OWL.Params())
    prepare_optimizer(owl, model, TOKENS)
    sens = Sensitivity(space, Sensitivity.Params())
    sens_batches = _drive(sens, fitness)
    batches = _drive(opt, fitness)
    # First the sensitivity probes (recorded like any request), then the starts.
    assert [(r.genome, r.tokens, r.probe) for r in batches[0]] == [
        (r.genome, r.tokens, r.probe) for r in sens_batches[0]
    ]
    starts = [r.genome for r in batches[1]]
    assert starts == [space.uniform(), owl.genome(), sens_batches[1][0].genome]
    assert all(r.tokens == 64 and not r.probe for r in batches[1])
    assert space.is_feasible(opt.best_genome)
    assert fitness(opt.best_genome) <= fitness(sens_batches[1][0].genome)


def test_evopress_refuses_probes_on_a_trained_stage_budget():
    space = _tiny_sparsity()
    params = EvoPress.Params(
        start_from=["sensitivity"],
        stages=[{"tokens": 512, "keep": 1}],
        train={"tokens": [64]},
    )
    with pytest.raises(EvocompError, match="search.start_from.sensitivity.tokens=512"):
        EvoPress(space, params)
    with pytest.raises(ValidationError, match="not a one-shot baseline; choose"):
        EvoPress.Params(start_from=["sleb"])
