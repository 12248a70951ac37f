"""Random search: the honest floor every optimizer must beat, and the
"best of N random feasible allocations" baseline."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from pydantic import Field

from evocomp.search.base import OPTIMIZERS, GeneratorOptimizer, OneBudgetParams, Request
from evocomp.spaces.base import SearchSpace


class RandomSearchParams(OneBudgetParams):
    """Options of :class:`RandomSearch`."""

    samples: int = Field(64, ge=1, description="random feasible genomes scored")
    batch: int = Field(8, ge=1, description="genomes per ask")


@OPTIMIZERS.register("random")
class RandomSearch(GeneratorOptimizer[RandomSearchParams]):
    """Scores ``samples`` random feasible genomes (random walks of level
    switches from the space's start, so each sits on the budget) at ``tokens``
    tokens, ``batch`` at a time, and keeps the best."""

    name = "random"

    Params = RandomSearchParams

    def __init__(
        self, space: SearchSpace[Any], params: RandomSearchParams, *, seed: int = 0
    ) -> None:
        super().__init__(space, params, seed=seed)
        self._done = 0

    @property
    def progress(self) -> tuple[int, int]:
        return self._done, self.params.samples

    def run(self) -> Generator[list[Request], list[float], None]:
        p = self.params
        while self._done < p.samples:
            n = min(p.batch, p.samples - self._done)
            genomes = [self.space.random(self.rng) for _ in range(n)]
            scores = yield [Request(g, p.tokens) for g in genomes]
            for g, score in zip(genomes, scores, strict=True):
                self.consider(g, score)
            self._done += n
