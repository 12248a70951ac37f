"""Random search: the honest floor every optimizer must beat, and the
"best of N random feasible allocations" baseline."""

from __future__ import annotations

from collections.abc import Generator

from pydantic import BaseModel, ConfigDict, Field

from evocomp.search.base import OPTIMIZERS, GeneratorOptimizer, Request


@OPTIMIZERS.register("random")
class RandomSearch(GeneratorOptimizer):
    """Scores ``samples`` random feasible genomes (random walks of level
    switches from the space's start, so each sits on the budget) at ``tokens``
    tokens, ``batch`` at a time, and keeps the best."""

    name = "random"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        samples: int = Field(64, ge=1)
        tokens: int = Field(2048, gt=0)
        batch: int = Field(8, ge=1, description="genomes per ask")

    params: Params

    @property
    def progress(self) -> tuple[int, int]:
        return getattr(self, "_done", 0), self.params.samples

    def run(self) -> Generator[list[Request], list[float], None]:
        p = self.params
        self._done = 0
        while self._done < p.samples:
            n = min(p.batch, p.samples - self._done)
            genomes = [self.space.random(self.rng) for _ in range(n)]
            scores = yield [Request(g, p.tokens) for g in genomes]
            for g, score in zip(genomes, scores, strict=True):
                self.consider(g, score)
            self._done += n
