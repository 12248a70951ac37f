"""EvoPress: (1+λ) evolution with level-switch mutation and multi-stage selection
(Sieberling et al., 2024)."""

from __future__ import annotations

from collections.abc import Generator

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from evocomp.errors import choices
from evocomp.search.base import OPTIMIZERS, GeneratorOptimizer, Request
from evocomp.search.baselines import OneShot
from evocomp.spaces.base import Genome, SearchSpace


def _one_shot_names() -> list[str]:
    return [n for n in OPTIMIZERS.names() if issubclass(OPTIMIZERS.get(n), OneShot)]


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
        start_from: list[str] = Field(
            default_factory=list,
            description="one-shot baselines whose genomes also compete for the start "
            "(e.g. [shortgpt] for depth)",
        )
        stages: list[Stage] = Field(
            default_factory=lambda: [Stage(tokens=1024, keep=4), Stage(tokens=4096, keep=1)]
        )

        @field_validator("start_from")
        @classmethod
        def _one_shot(cls, names: list[str]) -> list[str]:
            for name in names:
                if name not in _one_shot_names():
                    raise ValueError(
                        f"start_from: {name!r} is not a one-shot baseline; "
                        f"choose {choices(_one_shot_names())}"
                    )
            return names

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
        return self._generation

    @property
    def progress(self) -> tuple[int, int]:
        return self.generation, self.params.generations

    def __init__(self, space: SearchSpace, params: BaseModel, *, seed: int = 0) -> None:
        super().__init__(space, params, seed=seed)
        self._seeded: list[Genome] | None = None  # the start_from genomes, once prepared
        self._generation = 0

    def prepare(self, model: nn.Module, calibration_tokens: torch.Tensor) -> None:
        """Compute the ``start_from`` baselines' genomes (ShortGPT measures the model)."""
        self._seeded = []
        for name in self.params.start_from:
            cls = OPTIMIZERS.get(name)
            baseline = cls(self.space, cls.Params(), seed=0)
            baseline.prepare(model, calibration_tokens)
            assert isinstance(baseline, OneShot)
            self._seeded.append(baseline.genome())

    def run(self) -> Generator[list[Request], list[float], None]:
        p = self.params
        final = p.stages[-1].tokens
        if p.start_from and self._seeded is None:
            raise RuntimeError("start_from needs prepare(model, calibration_tokens) first")
        seeded = [g for g in self._seeded or [] if g != self.space.uniform()]
        starts = [self.space.uniform(), *dict.fromkeys(seeded)] + [
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
