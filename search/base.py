"""The optimizer contract: ask for genomes (at a token budget), tell their fitness;
and, for multi-objective optimizers, the quality-cost front (:func:`pareto_front`)
and a start population spread over the cost range (:func:`cost_spread`)."""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from itertools import groupby
from typing import ClassVar, TypeVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from evocomp.registry import Registry
from evocomp.spaces.base import Genome, SearchSpace


@dataclass(frozen=True)
class Request:
    """Evaluate ``genome`` on the first ``tokens`` evaluation tokens."""

    genome: Genome
    tokens: int


class Optimizer(ABC):
    """Ask/tell over genomes; lower fitness is better.

    ``ask()`` returns the next batch of requests (empty when the search is
    over); ``tell()`` takes one fitness per request of the last batch, in order.
    Given the same seed and the same fitness values an optimizer makes the same
    requests, which is what lets a killed search resume from its trial store.
    """

    name: ClassVar[str]
    budgeted: bool = True
    """Whether every request keeps the space's budget (``is_feasible``). Multi-objective
    optimizers set False: they trade cost against quality, so their requests are only
    valid (``is_valid``), and ``best_genome`` is the best one within the budget. A class
    or instance attribute (``OptunaSearch`` decides per run, from its params): read it
    from the optimizer, not its class."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, space: SearchSpace, params: BaseModel, *, seed: int = 0) -> None:
        self.space = space
        self.params = params
        self.rng = random.Random(seed)
        self.best_genome: Genome | None = None
        self.best_fitness = float("inf")

    def prepare(self, model: nn.Module, calibration_tokens: torch.Tensor) -> None:
        """Called once by the runner before the first ``ask()`` with the dense model
        and the calibration tokens; optimizers that measure the model first
        (``shortgpt``) override it. Must be deterministic (resume replays it)."""
        return None  # most optimizers need nothing from the model

    @abstractmethod
    def ask(self) -> list[Request]: ...

    @abstractmethod
    def tell(self, fitness: list[float]) -> None: ...

    @property
    @abstractmethod
    def progress(self) -> tuple[int, int]:
        """(steps done, steps planned), for progress bars."""


class GeneratorOptimizer(Optimizer):
    """An optimizer written as a plain loop: ``run()`` yields batches of
    requests and receives their fitness values."""

    def __init__(self, space: SearchSpace, params: BaseModel, *, seed: int = 0) -> None:
        super().__init__(space, params, seed=seed)
        self._loop = self.run()
        self._pending: list[Request] | None = None
        self._started = False

    @abstractmethod
    def run(self) -> Generator[list[Request], list[float], None]: ...

    def _start(self) -> None:
        # Lazily, so that run() sees what prepare() measured.
        if not self._started:
            self._started = True
            self._pending = next(self._loop, None)

    def ask(self) -> list[Request]:
        self._start()
        return list(self._pending or [])

    def tell(self, fitness: list[float]) -> None:
        self._start()
        if self._pending is None:
            raise RuntimeError("the search is over; nothing was asked")
        if len(fitness) != len(self._pending):
            raise ValueError(f"expected {len(self._pending)} fitness values, got {len(fitness)}")
        try:
            self._pending = self._loop.send(fitness)
        except StopIteration:
            self._pending = None

    def consider(self, genome: Genome, fitness: float) -> None:
        """Keep ``genome`` as the best when it beats it (and, for an unbudgeted
        optimizer, is within the budget)."""
        if fitness < self.best_fitness and (self.budgeted or self.space.is_feasible(genome)):
            self.best_genome, self.best_fitness = genome, fitness


T = TypeVar("T")

Point = tuple[Genome, float, int]
"""An evaluated genome on the quality-cost plane: (genome, fitness, cost), both minimised."""


def pareto_front(points: Iterable[tuple[T, float, int]]) -> list[tuple[T, float, int]]:
    """The non-dominated points, by cost (ties of both objectives all kept): no other
    point is at most as bad in fitness and cost and better in one. Non-finite
    fitness (a diverged model) is never on the front. A point is (what, fitness,
    cost), usually a :data:`Point`."""
    ordered = sorted((p for p in points if math.isfinite(p[1])), key=lambda p: (p[2], p[1]))
    front: list[tuple[T, float, int]] = []
    best = math.inf  # lowest fitness among strictly cheaper points
    for _, group in groupby(ordered, key=lambda p: p[2]):
        same_cost = list(group)
        lowest = same_cost[0][1]
        if lowest < best:
            front.extend(p for p in same_cost if p[1] == lowest)
            best = lowest
    return front


def cost_spread(space: SearchSpace, rng: random.Random, n: int) -> list[Genome]:
    """Up to ``n`` distinct valid genomes spread over the whole cost range, budget
    aside: the uniform start, a cheapest and a dearest genome (walks of
    :meth:`~evocomp.spaces.base.SearchSpace.wander` long enough to cross the whole
    range), and walks from the start rising with probabilities evenly spaced in
    [0, 1] (half as long: their ends then spread evenly when the start sits
    mid-range); walks of random rise replace duplicates. Seeds the first
    population of multi-objective searches."""
    start = space.uniform()
    span = sum(space.n_levels(i) - 1 for i in range(len(space)))
    half = max(span // 2, 1)
    out = dict.fromkeys(
        [start, *(space.wander(start, rng, steps=span, rise=r) for r in (0.0, 1.0))]
    )
    inner = max(n - 3, 0)
    for k in range(inner):
        out[space.wander(start, rng, steps=half, rise=(k + 1) / (inner + 1))] = None
    for _ in range(20 * n):  # small spaces and crowded ends repeat genomes
        if len(out) >= n:
            break
        out[space.wander(start, rng, steps=half, rise=rng.random())] = None
    return list(out)[:n]


OPTIMIZERS: Registry[type[Optimizer]] = Registry("optimizer")
