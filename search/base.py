"""The optimizer contract: ask for genomes (at a token budget), tell their fitness."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Generator
from dataclasses import dataclass
from typing import ClassVar

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
        if fitness < self.best_fitness:
            self.best_genome, self.best_fitness = genome, fitness


OPTIMIZERS: Registry[type[Optimizer]] = Registry("optimizer")
