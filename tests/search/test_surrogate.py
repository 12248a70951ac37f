"""Surrogate pre-screening: the additive model ranks genomes of an additive landscape,
screening is transparent before its warm-up, and with it the GA and EvoPress find
better genomes at equal evaluations."""

from __future__ import annotations

import random
import statistics

import pytest
from landscapes import drive, loss, sparsity_space

from evocomp.search.evopress import EvoPress
from evocomp.search.genetic import GeneticAlgorithm
from evocomp.search.surrogate import AdditiveSurrogate, Screening, SurrogateParams


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(x: list[float]) -> list[int]:
        order = sorted(range(len(x)), key=x.__getitem__)
        out = [0] * len(x)
        for r, i in enumerate(order):
            out[i] = r
        return out

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True)) / (n * (n * n - 1))


def test_the_model_ranks_unseen_genomes_of_an_additive_landscape():
    space = sparsity_space()
    rng = random.Random(0)
    model = AdditiveSurrogate(space)
    for _ in range(40):
        g = space.random(rng, steps=6)
        model.add(g, loss(space, g))
    fresh = [space.random(rng, steps=6) for _ in range(40)]
    predicted = list(model.predict(fresh))
    assert _spearman(predicted, [loss(space, g) for g in fresh]) > 0.9


def test_non_finite_scores_are_left_out():
    space = sparsity_space()
    model = AdditiveSurrogate(space)
    model.add(space.uniform(), float("inf"))
    assert len(model) == 0


def test_screening_is_transparent_before_its_warmup_then_picks_distinct_children():
    space = sparsity_space()
    screen = Screening(space, SurrogateParams(pool=32, warmup=8, explore=0.25))
    rng = random.Random(1)
    kids = [space.mutate(space.uniform(), rng) for _ in range(4)]
    assert screen.size(4) == 4 and screen.pick(kids, 4, rng) == kids
    screen.observe(kids + kids, [loss(space, g) for g in kids + kids])
    assert screen.ready and screen.size(4) == 32
    parent = space.uniform()
    made = [space.mutate(parent, rng, switches=2) for _ in range(32)] + [parent]
    a = screen.pick(made, 4, random.Random(5), exclude=parent)
    assert a == screen.pick(made, 4, random.Random(5), exclude=parent)  # deterministic
    assert len(set(a)) == 4 and parent not in a
    # Three by the model (the predicted best), one explored at random.
    best = sorted(dict.fromkeys(g for g in made if g != parent),
                  key=lambda g: screen.model.predict([g])[0])[:3]
    assert a[:3] == best


def _mean_best(make, seeds=range(6)) -> float:
    space = sparsity_space()
    out = []
    for seed in seeds:
        opt = make(space, seed)
        drive(opt, space)
        out.append(opt.best_fitness)
    return statistics.mean(out)


@pytest.mark.parametrize("optimizer", ["ga", "evopress"])
def test_screening_finds_better_genomes_at_equal_evaluations(optimizer):
    def make(surrogate):
        def build(space, seed):
            if optimizer == "ga":
                params = GeneticAlgorithm.Params(population=8, offspring=8, generations=10,
                                                 tokens=64, surrogate=surrogate)
                return GeneticAlgorithm(space, params, seed=seed)
            params = EvoPress.Params(generations=10, offspring=8, surrogate=surrogate,
                                     stages=[{"tokens": 64, "keep": 2}, {"tokens": 256, "keep": 1}])
            return EvoPress(space, params, seed=seed)
        return build

    plain = _mean_best(make(None))
    screened = _mean_best(make({"pool": 64}))
    assert screened < 0.9 * plain


def test_a_screened_search_replays_its_requests_from_its_seed():
    space = sparsity_space()
    params = GeneticAlgorithm.Params(population=6, offspring=6, generations=6, tokens=64,
                                     surrogate={"pool": 32, "warmup": 6})
    runs = [drive(GeneticAlgorithm(space, params, seed=3), space) for _ in range(2)]
    assert runs[0] == runs[1]
