"""metric-gp: Pruner-Zero's genetic programming over metric expressions, on
landscapes computed from real tensors (no model)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import random_expr

from evocomp.errors import EvocompError
from evocomp.search import OPTIMIZERS
from evocomp.search.metric_gp import MetricGP, MetricGPParams, expr_tree, primitive_set, tree_expr
from evocomp.spaces import MetricSpace, SparsitySpace
from evocomp.spaces.metric import decode, parse, ranking_form
from evocomp.spaces.units import Unit
from evocomp.supernet.metric import metric_scores

UNITS = [Unit(f"l{i}", "linear", i, (32, 64)) for i in range(2)]
STAGES = [{"tokens": 64, "keep": 3}, {"tokens": 256, "keep": 1}]


def _gp(seed: int = 0, space: dict | None = None, **params) -> MetricGP:
    params = {"population": 16, "generations": 6, "offspring": 6, "stages": STAGES, **params}
    return MetricGP(
        MetricSpace(UNITS, MetricSpace.Params(**(space or {}))),
        MetricGPParams(**params), seed=seed,
    )


class Landscape:
    """The fitness of a metric: the share of weights whose keep/prune decision at 50%
    per row differs from a hidden true importance ``|W|² · G``."""

    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.w = torch.randn(32, 64, generator=gen)
        self.g = torch.rand(32, 64, generator=gen)
        self.x = torch.rand(64, generator=gen) + 0.5
        self.truth = self._kept(self.w.square() * self.g)
        self.calls = 0

    @staticmethod
    def _kept(scores: torch.Tensor) -> torch.Tensor:
        order = scores.argsort(dim=1, stable=True)[:, 32:]
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)

    def __call__(self, genome, tokens: int) -> float:
        self.calls += 1
        scores = metric_scores(decode(genome), self.w, self.g, self.x)
        if not torch.isfinite(scores).all() or (scores == scores.flatten()[0]).all():
            return math.inf  # what the runner records for an invalid metric
        return (self._kept(scores) != self.truth).float().mean().item()


def _run(opt: MetricGP, fitness) -> list[list]:
    batches = []
    while requests := opt.ask():
        batches.append([(r.genome, r.tokens) for r in requests])
        opt.tell([fitness(r.genome, r.tokens) for r in requests])
    return batches


def test_it_finds_the_hidden_importance_metric():
    land = Landscape()
    opt = _gp(population=24, generations=20, offspring=8)
    _run(opt, land)
    assert opt.best_fitness == 0.0, str(decode(opt.best_genome))
    # a metric that prunes exactly like |W|^2 G, found among a few hundred
    assert land.calls <= 24 + 20 * 8 + 3


def test_the_same_seed_and_fitness_replay_the_same_requests():
    a = _run(_gp(seed=3), Landscape())
    b = _run(_gp(seed=3), Landscape())
    c = _run(_gp(seed=4), Landscape())
    assert a == b
    assert a != c


def test_requests_are_valid_canonical_and_new():
    opt = _gp(space={"max_depth": 4}, seeds=["wanda", "zsn(mul(X, W))", "pruner-zero"])
    batches = _run(opt, Landscape())
    first = [g for g, _ in batches[0]]
    # seeds first; two seeds with one ranking form are one member
    assert first[:2] == [opt.space.genome("wanda"), opt.space.genome("pruner-zero")]
    search = [g for batch in batches[:-1] for g, _ in batch]
    assert len(search) == len(set(search))  # no metric scored twice
    for g in search:
        e = decode(g)
        assert opt.space.is_valid(g) and e.depth <= 4
        assert ranking_form(e) == e  # asked for by its ranking form
    final = batches[-1]
    assert {t for _, t in final} == {256} and len(final) == 3
    assert opt.best_genome in [g for g, _ in final]
    assert opt.progress == (7, 7)


def test_invalid_metrics_score_worst_and_never_win():
    def fitness(genome, tokens):
        return math.inf if "W" in decode(genome).terminals else 1.0 / decode(genome).size

    opt = _gp(seeds=["sub(W, W)", "G"])
    _run(opt, fitness)
    assert math.isfinite(opt.best_fitness)
    assert "W" not in decode(opt.best_genome).terminals


def test_trees_and_expressions_convert_both_ways():
    pset = primitive_set()
    rng = random.Random(0)
    for _ in range(200):
        e = random_expr(rng, 5)
        tree = expr_tree(e, pset)
        assert tree_expr(tree) == e and tree.height == e.depth
    assert str(expr_tree(parse("pruner-zero"), pset)) == "mul(abs(mul(W, W)), mms(G))"


def test_it_refuses_a_level_space_and_is_registered():
    assert OPTIMIZERS.get("metric-gp") is MetricGP
    assert MetricGP.genome_kind == "expression"
    space = SparsitySpace(UNITS, SparsitySpace.Params())
    with pytest.raises(EvocompError, match="space.name='metric'"):
        MetricGP(space, MetricGPParams())


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"init_depth": [3, 2]}, "init_depth"),
        ({"seeds": ["mul(W, Q)"]}, "unknown symbol 'Q'"),
        ({"stages": [{"tokens": 64, "keep": 2}]}, "shrink to 1"),
    ],
)
def test_bad_options_are_refused(params, match):
    with pytest.raises(ValueError, match=match):
        MetricGPParams(**params)
