"""Genetic algorithms built from DEAP's operators: a (μ+λ) GA under the budget, and
NSGA-II over quality and cost with no budget.

Design
------
* **Operators from DEAP, bookkeeping here.** Individuals are :class:`_Individual`
  lists (DEAP's crossovers work on mutable sequences) carrying a ``score``, the
  negated fitness, because DEAP's selections maximise the attribute they are
  given; NSGA-II's individuals also carry a ``fitness`` of class
  :class:`_Objectives`, a plain ``deap.base.Fitness`` subclass with weights
  (-1, -1). ``deap.creator`` is never used: the classes it makes are process-wide
  globals that leak between runs and do not pickle into Ray workers.
* **Shared variation** (:class:`_Evolution`), as DEAP's ``algorithms.varOr``:
  each child comes from a crossover (``tools.cxTwoPoint`` or ``tools.cxUniform``)
  of two selected parents (probability ``crossover``; the first child is kept),
  else a mutation of one (probability ``mutation``), else a copy. A child whose
  genome was already evaluated (every copy, and crossovers that land back on a
  parent) is redrawn, so a generation asks for up to λ *new* genomes and no
  genome is evaluated twice in a run.
* **GA: a first population near the start** (``init: mutants``, the default): the
  uniform genome and its level-switch mutants. On a compressed LLM uniform is close
  to the optimum, and random feasible genomes (``init: random``, long random walks
  from it) are so far from it that the first generation is wasted and crossovers
  with them are too (on SmolLM2 at 32k tokens the GA then beat uniform on one seed
  of three).
* **GA: always feasible.** Parents are tournament winners. Crossover ignores the
  budget, so every crossover child goes through
  :meth:`~evocomp.spaces.base.SearchSpace.repair` (feasible and spending the
  budget; depth groups made whole); mutation is the space's budget-keeping
  :meth:`~evocomp.spaces.base.SearchSpace.mutate` with 1..``max_switches``
  switches. Nothing infeasible is ever asked for. The best μ of parents and
  children survive (``tools.selBest``).
* **NSGA-II: valid, not budgeted** (``budgeted = False``). The objectives are
  (fitness, cost), both minimised; the runner tells fitness, the optimizer reads
  cost from the space. The first population is the uniform start plus genomes
  spread over the whole cost range (:func:`~evocomp.search.base.cost_spread`: a
  cheapest, a dearest, and random walks in between). Crossover children are only
  made valid (:meth:`~evocomp.spaces.base.SearchSpace.make_valid`); mutation is
  an unconstrained walk of 1..``max_switches`` steps
  (:meth:`~evocomp.spaces.base.SearchSpace.wander`). Parents come from
  ``tools.selTournamentDCD`` (dominance, then crowding distance); μ of parents
  and children survive by ``tools.selNSGA2`` (non-dominated fronts, the last one
  thinned by crowding distance). ``front()`` is the non-dominated set of every
  genome evaluated; ``best_genome`` is the best one within the budget (the
  uniform start is in the first batch, so one exists). A diverged genome
  (non-finite fitness) is recorded but never becomes a parent.
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

import math
import random
from abc import abstractmethod
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal, TypeVar

from deap import base, tools
from pydantic import Field, model_validator

from evocomp.search.base import (
    OPTIMIZERS,
    GeneratorOptimizer,
    OneBudgetParams,
    Point,
    Request,
    TrainAware,
    Training,
    cost_spread,
    pareto_front,
)
from evocomp.search.surrogate import Screening, SurrogateParams
from evocomp.spaces.base import Genome, SearchSpace

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


V = TypeVar("V", bound="_VariationParams")


class _Evolution(GeneratorOptimizer[V]):
    """What the GA and NSGA-II share: the archive of evaluated genomes, DEAP's
    crossovers, varOr children, redraws of known genomes, and batch evaluation.
    Subclasses choose parents (:meth:`_select`), fix crossover children
    (:meth:`_fix`) and mutate (:meth:`_mutant`)."""

    def _training(self) -> Training | None:
        """The training every genome gets before it is scored (none by default)."""
        return None

    def __init__(self, space: SearchSpace[Any], params: V, *, seed: int = 0) -> None:
        super().__init__(space, params, seed=seed)
        self._fitness: dict[Genome, float] = {}
        self._generation = 0

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def progress(self) -> tuple[int, int]:
        return self._generation, self.params.generations

    # -- what subclasses provide ---------------------------------------------------------
    @abstractmethod
    def _select(self, population: list[_Individual], k: int) -> list[_Individual]:
        """``k`` parents (runs inside :func:`_deap_random`)."""

    @abstractmethod
    def _fix(self, genome: Genome) -> Genome:
        """A crossover child made acceptable to the search."""

    @abstractmethod
    def _mutant(self, genome: Genome) -> Genome:
        """A mutation of ``genome``."""

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
                a, b = self._select(population, 2)
                child, _ = self._mate()(list(a), list(b))
            return self._fix(tuple(child))
        if op < p.crossover + p.mutation:
            with _deap_random(rng):
                (parent,) = self._select(population, 1)
            return self._mutant(parent.genome)
        with _deap_random(rng):  # reproduction: a copy (redrawn by the caller)
            (parent,) = self._select(population, 1)
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

    def _evaluate(self, genomes: list[Genome]) -> Generator[list[Request], list[float], None]:
        if not genomes:
            return
        scores = yield [Request(g, self.params.tokens, self._training()) for g in genomes]
        for g, score in zip(genomes, scores, strict=True):
            self._fitness[g] = score
            self.consider(g, score)


class _VariationParams(OneBudgetParams):
    """The options the GA and NSGA-II share."""

    population: int = Field(16, ge=2, description="μ: genomes that survive each generation")
    offspring: int = Field(16, ge=1, description="λ: children per generation")
    generations: int = Field(30, ge=0, description="generations after the first population")
    crossover: float = Field(0.5, ge=0.0, le=1.0, description="probability a child is a cross")
    mutation: float = Field(0.5, ge=0.0, le=1.0, description="probability a child is a mutant")
    operator: Literal["two-point", "uniform"] = Field(
        "two-point", description="DEAP crossover: cxTwoPoint or cxUniform"
    )
    swap_prob: float = Field(
        0.5, gt=0.0, le=1.0, description="cxUniform: chance each gene is exchanged"
    )
    max_switches: int = Field(
        3, ge=1, description="a mutant gets 1..this many moves (ga: level switches; nsga2: steps)"
    )

    @model_validator(mode="after")
    def _var_or(self) -> _VariationParams:
        total = self.crossover + self.mutation
        if total > 1 + 1e-9 or total <= 0:
            raise ValueError(f"crossover + mutation must be in (0, 1] (DEAP varOr), got {total:g}")
        return self


class GeneticAlgorithmParams(_VariationParams):
    """Options of :class:`GeneticAlgorithm`."""

    tournament: int = Field(3, ge=1, description="parents are the best of this many")
    init: Literal["mutants", "random"] = Field(
        "mutants",
        description="the first population besides the uniform start: mutants (its "
        "level-switch mutants, small moves from a good start) or random (random "
        "feasible genomes, far from it)",
    )
    surrogate: SurrogateParams | None = Field(
        None,
        description="pre-screening: {pool, explore, ridge, warmup}: make `pool` children, "
        "score the `offspring` an additive model of the scores so far ranks best; "
        "none: every child is scored",
    )
    train: TrainAware | None = Field(
        None,
        description="training-aware selection: {tokens: [one count], lr, optimizer, params: "
        "all | lora, loss: kd | lm}: every genome is fine-tuned before it is scored",
    )

    @model_validator(mode="after")
    def _one_training(self) -> GeneticAlgorithmParams:
        if self.train is not None and len(self.train.tokens) != 1:
            raise ValueError(
                "train.tokens needs one count (the GA scores at one budget), "
                f"got {self.train.tokens}"
            )
        return self


@OPTIMIZERS.register("ga")
class GeneticAlgorithm(_Evolution[GeneticAlgorithmParams]):
    """(μ+λ) evolution: a population of ``population`` genomes (the uniform start
    plus its mutants, or random feasible genomes) makes ``offspring`` children per
    generation by crossover + repair or by level-switch mutation; the best
    ``population`` of parents and children survive. See the module docstring for
    the design."""

    name = "ga"

    Params = GeneticAlgorithmParams

    def _training(self) -> Training | None:
        return None if self.params.train is None else self.params.train.at(0)

    def train_budgets(self) -> dict[str, int]:
        return {} if self.params.train is None else self.params.train.budgets()

    def _select(self, population: list[_Individual], k: int) -> list[_Individual]:
        return tools.selTournament(population, k, self.params.tournament, fit_attr="score")

    def _fix(self, genome: Genome) -> Genome:
        return self.space.repair(genome, self.rng)

    def _mutant(self, genome: Genome) -> Genome:
        switches = self.rng.randint(1, self.params.max_switches)
        return self.space.mutate(genome, self.rng, switches=switches)

    def run(self) -> Generator[list[Request], list[float], None]:
        p = self.params
        start = self.space.uniform()
        if p.init == "mutants":
            draw = partial(self._mutant, start)
        else:
            draw = partial(self.space.random, self.rng)
        first = [start, *self._new(draw, p.population - 1)]
        first = list(dict.fromkeys(first))
        yield from self._evaluate(first)
        population = [_Individual(g, -self._fitness[g]) for g in first]
        screen = None if p.surrogate is None else Screening(self.space, p.surrogate)
        if screen is not None:
            screen.observe(first, [self._fitness[g] for g in first])
        for gen in range(p.generations):
            if screen is None:
                children = self._new(partial(self._child, population), p.offspring)
            else:
                made = self._new(partial(self._child, population), screen.size(p.offspring))
                children = screen.pick(made, p.offspring, self.rng)
            yield from self._evaluate(children)
            if screen is not None:
                screen.observe(children, [self._fitness[g] for g in children])
            pool = population + [_Individual(g, -self._fitness[g]) for g in children]
            population = tools.selBest(pool, p.population, fit_attr="score")
            self._generation = gen + 1


class _Objectives(base.Fitness):
    """(fitness, cost), both minimised. A plain subclass, not ``deap.creator``'s."""

    weights = (-1.0, -1.0)


class _Ranked(_Individual):
    """An individual for DEAP's multi-objective tools, which read ``.fitness``."""

    def __init__(self, genome: Genome, fitness: float, cost: int) -> None:
        super().__init__(genome, -fitness)
        self.fitness = _Objectives((fitness, float(cost)))


class NSGA2Params(_VariationParams):
    """Options of :class:`NSGA2`."""

    population: int = Field(
        24, ge=4, description="μ: genomes that survive each generation (fronts, crowding)"
    )
    offspring: int = Field(24, ge=1, description="λ: children per generation")


@OPTIMIZERS.register("nsga2")
class NSGA2(_Evolution[NSGA2Params]):
    """NSGA-II over quality and cost, no budget: the first population is spread
    over the whole cost range, children come from crossovers made valid or from
    unconstrained random walks (:meth:`~evocomp.spaces.base.SearchSpace.wander`),
    and ``tools.selNSGA2`` keeps the best fronts, crowding-thinned. One run gives
    the whole front (:meth:`front`); ``best_genome`` is the best genome within the
    budget. See the module docstring for the design."""

    name = "nsga2"
    budgeted = False

    Params = NSGA2Params

    def __init__(self, space: SearchSpace[Any], params: NSGA2Params, *, seed: int = 0) -> None:
        super().__init__(space, params, seed=seed)
        self._costs: dict[Genome, int] = {}

    def _cost(self, genome: Genome) -> int:
        """The space's cost of ``genome``, cached: survival reads it every generation."""
        if genome not in self._costs:
            self._costs[genome] = self.space.cost(genome)
        return self._costs[genome]

    def front(self) -> list[Point]:
        """Every non-dominated evaluated genome as (genome, fitness, cost), by cost."""
        return pareto_front((g, f, self._cost(g)) for g, f in self._fitness.items())

    def _select(self, population: list[_Individual], k: int) -> list[_Individual]:
        if len(population) < 4:  # selTournamentDCD draws four distinct individuals
            return tools.selRandom(population, k)
        return tools.selTournamentDCD(population, 4)[:k]

    def _fix(self, genome: Genome) -> Genome:
        return self.space.make_valid(genome)

    def _mutant(self, genome: Genome) -> Genome:
        steps = self.rng.randint(1, self.params.max_switches)
        return self.space.wander(genome, self.rng, steps=steps)

    def _survivors(self, genomes: list[Genome], k: int) -> list[_Individual]:
        """NSGA-II selection of ``k`` of ``genomes``; it also sets the crowding
        distances that parent selection reads. A diverged genome (non-finite
        fitness) never survives."""
        pool = [
            _Ranked(g, f, self._cost(g)) for g in genomes if math.isfinite(f := self._fitness[g])
        ]
        return tools.selNSGA2(pool, min(k, len(pool)))

    def run(self) -> Generator[list[Request], list[float], None]:
        p = self.params
        first = cost_spread(self.space, self.rng, p.population)
        yield from self._evaluate(first)
        population = self._survivors(first, p.population)
        for gen in range(p.generations):
            if not population:  # every genome diverged: nothing to breed from
                break
            children = self._new(partial(self._child, population), p.offspring)
            yield from self._evaluate(children)
            population = self._survivors([i.genome for i in population] + children, p.population)
            self._generation = gen + 1
