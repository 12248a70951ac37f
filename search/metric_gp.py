"""Genetic programming over pruning metrics (Pruner-Zero's search, which its
authors never released).

Individuals are DEAP ``gp.PrimitiveTree`` expressions over the typed primitive
set of :mod:`evocomp.spaces.metric` (one type: a float tensor). The first
population is seeds plus ``gp.genHalfAndHalf`` trees of depth 2–4 (Pruner-Zero's
setting); each generation breeds ``offspring`` children from tournament winners
by ``gp.cxOnePoint`` (probability ``crossover``) and ``gp.mutUniform``
(probability ``mutation``), both under ``gp.staticLimit`` on the space's
``max_depth``; steady state: a child replaces the worst member when it is better.
Every child is simplified (opposing operations cancelled) and asked for by its
ranking form's genome, so metrics that prune alike are scored once (the trial
store answers repeats). Members are scored on ``stages[0].tokens``; at the end
the population is sieved through the stages (few tokens first, more for the
survivors) and the last stage's winner is the result. A metric that cannot rank
(NaN, infinite, constant scores) scores the worst fitness and never wins.
Randomness: DEAP's global-``random`` draws come from the optimizer's seeded
stream (see :mod:`evocomp.search.genetic`), so a resumed search replays.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from typing import Any

from deap import gp, tools
from pydantic import Field, field_validator, model_validator

from evocomp.errors import EvocompError
from evocomp.registry import StrictModel
from evocomp.search.base import OPTIMIZERS, GeneratorOptimizer, Request
from evocomp.search.evopress import Stage, check_sieve
from evocomp.search.genetic import _deap_random
from evocomp.spaces.base import Genome, SearchSpace
from evocomp.spaces.metric import (
    ARITY,
    SYMBOLS,
    TERMINALS,
    Expr,
    MetricSpace,
    encode,
    parse,
    ranking_form,
    simplify,
)

_REDRAWS = 20
"""Variation attempts before a child that repeats a known metric is accepted."""


class MetricGPParams(StrictModel):
    """Options of :class:`MetricGP`."""

    population: int = Field(50, ge=2, description="members (Pruner-Zero: 50)")
    generations: int = Field(20, ge=0, description="breeding rounds after the first population")
    offspring: int = Field(8, ge=1, description="children per generation")
    tournament: int = Field(
        10, ge=1, description="tournament size for parents (Pruner-Zero: top-10); "
        "at most the population"
    )
    crossover: float = Field(0.8, ge=0, le=1, description="probability of one-point crossover")
    mutation: float = Field(0.3, ge=0, le=1, description="probability of uniform subtree mutation")
    init_depth: list[int] = Field(
        default_factory=lambda: [2, 4],
        description="[min, max] depth of the random first trees (Pruner-Zero: 2-4)",
    )
    seeds: list[str] = Field(
        default_factory=list,
        description="expressions or presets put in the first population (e.g. [wanda])",
    )
    stages: list[Stage] = Field(
        default_factory=lambda: [Stage(tokens=1024, keep=8), Stage(tokens=4096, keep=1)],
        description="members are scored on stages[0].tokens; at the end the population "
        "is sieved through every stage [{tokens, keep}] (keep shrinks to 1)",
    )

    @field_validator("init_depth")
    @classmethod
    def _depths(cls, depths: list[int]) -> list[int]:
        if len(depths) != 2 or not 0 <= depths[0] <= depths[1]:
            raise ValueError(f"init_depth must be [min, max] with 0 <= min <= max, got {depths}")
        return depths

    @field_validator("seeds")
    @classmethod
    def _parse(cls, seeds: list[str]) -> list[str]:
        for text in seeds:
            parse(text)
        return seeds

    @model_validator(mode="after")
    def _sieve(self) -> MetricGPParams:
        check_sieve(self.stages)
        return self


def _never(*_: Any) -> Any:
    raise AssertionError("metric trees are converted to expressions, never compiled")


def primitive_set() -> gp.PrimitiveSetTyped:
    """DEAP's typed primitive set of the metric language (one type, ``float``)."""
    pset = gp.PrimitiveSetTyped("metric", [], float)
    for name in TERMINALS:
        pset.addTerminal(name, float, name=name)
    for name in SYMBOLS:
        if ARITY[name]:
            pset.addPrimitive(_never, [float] * ARITY[name], float, name=name)
    return pset


def tree_expr(tree: gp.PrimitiveTree) -> Expr:
    """The expression a DEAP tree (prefix order) writes."""
    nodes = iter(tree)

    def node() -> Expr:
        n = next(nodes)
        return Expr(n.name, tuple(node() for _ in range(n.arity)))

    return node()


def expr_tree(expr: Expr, pset: gp.PrimitiveSetTyped) -> gp.PrimitiveTree:
    """The DEAP tree of ``expr``."""
    return gp.PrimitiveTree([pset.mapping[n] for n in _prefix(expr)])


def _prefix(e: Expr) -> list[str]:
    return [e.op, *(s for a in e.args for s in _prefix(a))]


@dataclass
class _Member:
    tree: gp.PrimitiveTree
    genome: Genome  # of its ranking form: what is asked for and stored
    fitness: float = math.inf

    @property
    def score(self) -> float:
        """Negated fitness: DEAP's selections maximise the attribute they read."""
        return -self.fitness if math.isfinite(self.fitness) else -math.inf


@OPTIMIZERS.register("metric-gp")
class MetricGP(GeneratorOptimizer[MetricGPParams]):
    """Pruner-Zero's genetic programming over metric expressions, for the ``metric``
    space: DEAP ``gp`` trees, tournament parents, one-point crossover and uniform
    subtree mutation under the space's depth limit, steady-state replacement of
    the worst; members scored on ``stages[0].tokens``, the final population sieved
    through the stages. Children are simplified and asked for by their ranking
    form, so metrics that prune alike are scored once."""

    name = "metric-gp"
    Params = MetricGPParams
    genome_kind = "expression"

    def __init__(self, space: SearchSpace[Any], params: MetricGPParams, *, seed: int = 0) -> None:
        if not isinstance(space, MetricSpace):
            raise EvocompError(
                f"search.name='metric-gp' evolves metric expressions; it needs space.name="
                f"'metric', not {space.name!r}"
            )
        super().__init__(space, params, seed=seed)
        self.metric_space = space
        self.pset = primitive_set()
        depth = attrgetter("height")
        limit = gp.staticLimit(key=depth, max_value=space.params.max_depth)
        self._cross = limit(gp.cxOnePoint)
        self._mutate = limit(
            partial(gp.mutUniform, expr=partial(gp.genGrow, min_=0, max_=2), pset=self.pset)
        )
        self._generation = 0
        self.population: list[_Member] = []

    def token_budgets(self) -> dict[str, int]:
        return {f"stages[{k}].tokens": s.tokens for k, s in enumerate(self.params.stages)}

    @property
    def progress(self) -> tuple[int, int]:
        return self._generation, self.params.generations + 1  # + the final sieve

    def _member(self, expr: Expr) -> _Member:
        simple = simplify(expr)
        return _Member(expr_tree(simple, self.pset), encode(ranking_form(simple)))

    def _first(self) -> list[_Member]:
        p = self.params
        members = {}
        for text in p.seeds:
            m = self._member(parse(text, max_depth=self.metric_space.params.max_depth))
            members.setdefault(m.genome, m)
        lo, hi = p.init_depth
        hi = min(hi, self.metric_space.params.max_depth)
        for _ in range(_REDRAWS * p.population):
            if len(members) >= p.population:
                break
            with _deap_random(self.rng):
                tree = gp.PrimitiveTree(gp.genHalfAndHalf(self.pset, min(lo, hi), hi))
            m = self._member(tree_expr(tree))
            members.setdefault(m.genome, m)
        return list(members.values())

    def _child(self, known: set[Genome]) -> _Member:
        p = self.params
        k = min(p.tournament, len(self.population))
        child = None
        for _ in range(_REDRAWS):
            with _deap_random(self.rng):
                a, b = tools.selTournament(self.population, 2, tournsize=k, fit_attr="score")
                tree = gp.PrimitiveTree(list(a.tree))
                if self.rng.random() < p.crossover:
                    tree, _ = self._cross(tree, gp.PrimitiveTree(list(b.tree)))
                if self.rng.random() < p.mutation:
                    (tree,) = self._mutate(tree)
            child = self._member(tree_expr(tree))
            if child.genome not in known:
                break
        assert child is not None
        return child

    def run(self) -> Generator[list[Request], list[float], None]:
        p = self.params
        first = p.stages[0].tokens
        members = self._first()
        scores = yield [Request(m.genome, first) for m in members]
        for m, s in zip(members, scores, strict=True):
            m.fitness = s
        self.population = self._ranked(members)[: p.population]
        self._note_best()
        known = {m.genome for m in members}
        for gen in range(p.generations):
            children = {}
            for _ in range(p.offspring):
                c = self._child(known | set(children))
                children.setdefault(c.genome, c)
            batch = list(children.values())
            scores = yield [Request(c.genome, first) for c in batch]
            for c, s in zip(batch, scores, strict=True):
                c.fitness = s
            known |= set(children)
            # Steady state: children displace the worst members they beat (the
            # members win ties, so a repeat never pushes out its original).
            self.population = self._ranked(self.population + batch)[: p.population]
            self._note_best()
            self._generation = gen + 1
        pool = [m.genome for m in self.population if math.isfinite(m.fitness)]
        pool = pool[: p.stages[0].keep] or [self.population[0].genome]
        fitness = {m.genome: m.fitness for m in self.population}
        for stage in p.stages[1:]:
            scores = yield [Request(g, stage.tokens) for g in pool]
            ranked = sorted(range(len(pool)), key=scores.__getitem__)[: stage.keep]
            fitness = {pool[i]: scores[i] for i in ranked}
            pool = [pool[i] for i in ranked]
        self.best_genome, self.best_fitness = pool[0], fitness[pool[0]]
        self._generation = p.generations + 1

    @staticmethod
    def _ranked(members: list[_Member]) -> list[_Member]:
        # Stable: earlier members win ties.
        return sorted(members, key=lambda m: m.fitness)

    def _note_best(self) -> None:
        best = self.population[0]
        self.best_genome, self.best_fitness = best.genome, best.fitness
