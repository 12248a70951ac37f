"""EvoPress: (1+λ) evolution with level-switch mutation and multi-stage selection
(Sieberling et al., 2024)."""

from __future__ import annotations

from collections.abc import Generator

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evocomp.search.base import OPTIMIZERS, GeneratorOptimizer, Request


class Stage(BaseModel):
    """One selection step: score the pool on ``tokens`` tokens, keep the best ``keep``."""

    model_config = ConfigDict(extra="forbid")
    tokens: int = Field(gt=0)
    keep: int = Field(gt=0)


@OPTIMIZERS.register("evopress")
class EvoPress(GeneratorOptimizer):
    """Each generation mutates the parent into ``offspring`` children (each with
    1..``max_switches`` level switches), then sieves parent + children through
    the stages: cheap, few-token stages discard most children, the last stage
    picks the next parent. The parent competes at every stage, so the search
    never gets worse, and its scores are reused from the trial store."""

    name = "evopress"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        generations: int = Field(50, ge=0)
        offspring: int = Field(16, ge=1)
        max_switches: int = Field(3, ge=1)
        init_samples: int = Field(
            0, ge=0, description="start from the best of uniform + N random feasible genomes"
        )
        stages: list[Stage] = Field(
            default_factory=lambda: [Stage(tokens=1024, keep=4), Stage(tokens=4096, keep=1)]
        )

        @model_validator(mode="after")
        def _stages_sieve(self) -> EvoPress.Params:
            if not self.stages:
                raise ValueError("stages must list at least one {tokens, keep} step")
            keeps = [s.keep for s in self.stages]
            if keeps[-1] != 1 or any(a < b for a, b in zip(keeps, keeps[1:], strict=False)):
                raise ValueError(f"stage keep counts must shrink to 1, got {keeps}")
            tokens = [s.tokens for s in self.stages]
            if tokens != sorted(tokens):
                raise ValueError(f"stage token budgets must grow, got {tokens}")
            return self

    params: Params

    @property
    def generation(self) -> int:
        return getattr(self, "_generation", 0)

    @property
    def progress(self) -> tuple[int, int]:
        return self.generation, self.params.generations

    def run(self) -> Generator[list[Request], list[float], None]:
        p = self.params
        final = p.stages[-1].tokens
        starts = [self.space.uniform()] + [
            self.space.random(self.rng) for _ in range(p.init_samples)
        ]
        scores = yield [Request(g, final) for g in starts]
        best = min(range(len(starts)), key=scores.__getitem__)
        parent = starts[best]
        self.consider(parent, scores[best])
        for gen in range(p.generations):
            pool = [parent] + [
                self.space.mutate(parent, self.rng, switches=self.rng.randint(1, p.max_switches))
                for _ in range(p.offspring)
            ]
            for stage in p.stages:
                scores = yield [Request(g, stage.tokens) for g in pool]
                # sorted() is stable, so the parent (first) wins ties.
                ranked = sorted(range(len(pool)), key=scores.__getitem__)[: stage.keep]
                pool = [pool[i] for i in ranked]
                best_score = scores[ranked[0]]
            parent = pool[0]
            self.consider(parent, best_score)
            self._generation = gen + 1
