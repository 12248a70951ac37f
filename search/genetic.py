"""A (μ+λ) genetic algorithm built from DEAP's operators.

Design
------
* **Operators from DEAP, bookkeeping here.** Individuals are :class:`_Individual`
  lists (DEAP's crossovers work on mutable sequences) carrying a ``score``, the
  negated fitness, because DEAP's selections maximise the attribute they are
  given. ``deap.creator`` is never used: the classes it makes are process-wide
  globals that leak between runs and do not pickle into Ray workers.
* **Always feasible.** Crossover (``tools.cxTwoPoint`` or ``tools.cxUniform``)
  ignores the budget, so every crossover child goes through
  :meth:`~evocomp.spaces.base.SearchSpace.repair` (feasible and spending the
  budget; depth groups made whole); mutation is the space's budget-keeping
  :meth:`~evocomp.spaces.base.SearchSpace.mutate` with 1..``max_switches``
  switches. Nothing infeasible is ever asked for.
* **Variation as DEAP's** ``algorithms.varOr``: each child comes from a crossover
  of two tournament-selected parents (probability ``crossover``; the first child
  is kept), else a mutation of one (probability ``mutation``), else a copy. A
  child whose genome was already evaluated (every copy, and crossovers that
  repair back onto a parent) is redrawn, so a generation asks for up to λ *new*
  genomes and no genome is evaluated twice in a run. The best μ of parents and
  children survive (``tools.selBest``).
* **One random stream, global state untouched.** DEAP's tools draw from the
  global :mod:`random` module. Each DEAP call runs inside :func:`_deap_random`,
  which loads the optimizer's own ``random.Random(seed)`` state into the global
  generator, runs the call, stores the advanced state back and restores the
  caller's global state. So the search is a function of the seed and the fitness
  values alone (resume replays it), and the caller's ``random`` is as it was.
  (Not thread-safe against other threads drawing from ``random`` meanwhile; the
  runner drives optimizers from one thread.)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

from deap import tools
from pydantic import BaseModel, ConfigDict, Field, model_validator

from evocomp.search.base import OPTIMIZERS, GeneratorOptimizer, Request
from evocomp.spaces.base import Genome

_REDRAWS = 20
"""Draws per wanted child (and per wanted initial genome) before giving up on
finding new genomes: a converged population asks for fewer."""


class _Individual(list):
    """A genome as the mutable list DEAP's operators expect, with its score
    (negated fitness: DEAP's selections pick the largest)."""

    def __init__(self, genome: Genome, score: float = float("-inf")) -> None:
        super().__init__(genome)
        self.score = score

    @property
    def genome(self) -> Genome:
        return tuple(self)


@contextmanager
def _deap_random(rng: random.Random) -> Iterator[None]:
    """Let DEAP's global-``random`` draws come from ``rng`` (see the module docstring)."""
    saved = random.getstate()
    random.setstate(rng.getstate())
    try:
        yield
    finally:
        rng.setstate(random.getstate())
        random.setstate(saved)


@OPTIMIZERS.register("ga")
class GeneticAlgorithm(GeneratorOptimizer):
    """(μ+λ) evolution: a population of ``population`` genomes (the uniform start
    plus random feasible ones) makes ``offspring`` children per generation by
    crossover + repair or by level-switch mutation; the best ``population`` of
    parents and children survive. See the module docstring for the design."""

    name = "ga"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        population: int = Field(16, ge=2, description="μ: genomes that survive each generation")
        offspring: int = Field(16, ge=1, description="λ: children per generation")
        generations: int = Field(30, ge=0)
        crossover: float = Field(0.5, ge=0.0, le=1.0, description="probability a child is a cross")
        mutation: float = Field(0.5, ge=0.0, le=1.0, description="probability a child is a mutant")
        operator: Literal["two-point", "uniform"] = Field(
            "two-point", description="DEAP crossover: cxTwoPoint or cxUniform"
        )
        swap_prob: float = Field(
            0.5, gt=0.0, le=1.0, description="cxUniform: chance each gene is exchanged"
        )
        tournament: int = Field(3, ge=1, description="parents are the best of this many")
        max_switches: int = Field(3, ge=1, description="a mutant gets 1..this many switches")
        tokens: int = Field(2048, gt=0, description="evaluation tokens per genome")

        @model_validator(mode="after")
        def _var_or(self) -> GeneticAlgorithm.Params:
            total = self.crossover + self.mutation
            if total > 1 + 1e-9 or total <= 0:
                raise ValueError(
                    f"crossover + mutation must be in (0, 1] (DEAP varOr), got {total:g}"
                )
            return self

    params: Params

    def __init__(self, space: Any, params: BaseModel, *, seed: int = 0) -> None:
        super().__init__(space, params, seed=seed)
        self._fitness: dict[Genome, float] = {}
        self._generation = 0

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def progress(self) -> tuple[int, int]:
        return self._generation, self.params.generations

    # -- variation ---------------------------------------------------------------------
    def _mate(self) -> Callable[[list[int], list[int]], tuple[list[int], list[int]]]:
        if self.params.operator == "uniform":
            p = self.params.swap_prob
            return lambda a, b: tools.cxUniform(a, b, indpb=p)
        return tools.cxTwoPoint

    def _child(self, population: list[_Individual]) -> Genome:
        """One varOr child (see the module docstring); may be a known genome."""
        p, rng = self.params, self.rng
        op = rng.random()
        if op < p.crossover and len(self.space) > 1:
            with _deap_random(rng):
                a, b = tools.selTournament(population, 2, p.tournament, fit_attr="score")
                child, _ = self._mate()(list(a), list(b))
            return self.space.repair(tuple(child), rng)
        if op < p.crossover + p.mutation:
            with _deap_random(rng):
                (parent,) = tools.selTournament(population, 1, p.tournament, fit_attr="score")
            return self.space.mutate(parent.genome, rng, switches=rng.randint(1, p.max_switches))
        with _deap_random(rng):  # reproduction: a copy (redrawn by the caller)
            (parent,) = tools.selTournament(population, 1, p.tournament, fit_attr="score")
        return parent.genome

    def _new(self, make: Callable[[], Genome], n: int) -> list[Genome]:
        """Up to ``n`` distinct genomes from ``make()`` that were never evaluated."""
        out: list[Genome] = []
        for _ in range(_REDRAWS * n):
            if len(out) == n:
                break
            genome = make()
            if genome not in self._fitness and genome not in out:
                out.append(genome)
        return out

    # -- the loop ----------------------------------------------------------------------
    def _evaluate(self, genomes: list[Genome]) -> Generator[list[Request], list[float], None]:
        if not genomes:
            return
        scores = yield [Request(g, self.params.tokens) for g in genomes]
        for g, score in zip(genomes, scores, strict=True):
            self._fitness[g] = score
            self.consider(g, score)

    def run(self) -> Generator[list[Request], list[float], None]:
        p = self.params
        start = self.space.uniform()
        first = [start, *self._new(lambda: self.space.random(self.rng), p.population - 1)]
        first = list(dict.fromkeys(first))
        yield from self._evaluate(first)
        population = [_Individual(g, -self._fitness[g]) for g in first]
        for gen in range(p.generations):
            children = self._new(partial(self._child, population), p.offspring)
            yield from self._evaluate(children)
            pool = population + [_Individual(g, -self._fitness[g]) for g in children]
            population = tools.selBest(pool, p.population, fit_attr="score")
            self._generation = gen + 1
