"""Surrogate pre-screening: a cheap model of fitness fitted on the search's own
evaluations, so that an optimizer can generate many more children than it scores and
score only those the model ranks best.

The model is additive over units, as layer-wise compression error nearly is: each gene's
level offset from the uniform genome ``d`` enters with its own linear and quadratic
terms, and with terms shared by the genes of one role (``q_proj``, ``down_proj``…) and
of one block, so that a level a gene has never taken is still predicted from its
neighbours'. Ridge regression (solved in the dual: observations are few, features many)
keeps it sane on the few dozen evaluations of an early search.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import Field

from evocomp.registry import StrictModel
from evocomp.spaces.base import Genome, SearchSpace


class SurrogateParams(StrictModel):
    """``search.surrogate``: pre-screen children with an additive model of fitness."""

    pool: int = Field(
        64, ge=1, description="children generated per generation; only the `offspring` "
        "the model ranks best (and a few at random, see explore) are scored",
    )
    explore: float = Field(
        0.25, ge=0, le=1,
        description="share of the scored children drawn at random from the pool instead "
        "(keeps the model's blind spots in view)",
    )
    ridge: float = Field(1e-2, gt=0, description="ridge penalty (fitness units squared)")
    warmup: int = Field(
        16, ge=2, description="evaluations at the screening budget before the model is used"
    )


class AdditiveSurrogate:
    """Fitness ≈ intercept + Σ_genes f_gene(d) + Σ_roles f_role(d) + Σ_blocks f_block(d),
    each f a linear plus quadratic term in the level offset ``d`` from uniform."""

    def __init__(self, space: SearchSpace[Any], *, ridge: float = 1e-2) -> None:
        self.ridge = ridge
        self._center = np.array(space.uniform(), dtype=float)
        n = len(space)
        roles = sorted({u.name.rsplit(".", 1)[-1] for u in space.units})
        blocks = sorted({u.block for u in space.units})
        # Each gene adds its d and d^2 to three groups: itself, its role, its block.
        self._groups = np.zeros((n, 3), dtype=int)
        for i, u in enumerate(space.units):
            self._groups[i] = (
                i, n + roles.index(u.name.rsplit(".", 1)[-1]),
                n + len(roles) + blocks.index(u.block),
            )
        self._n_groups = n + len(roles) + len(blocks)
        self._x: list[np.ndarray] = []
        self._y: list[float] = []
        self._coef: np.ndarray | None = None
        self._mean = 0.0
        self._feat_mean: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._y)

    def features(self, genome: Genome) -> np.ndarray:
        d = np.asarray(genome, dtype=float) - self._center
        out = np.zeros(2 * self._n_groups)
        for col, power in ((0, 1), (self._n_groups, 2)):
            np.add.at(out, col + self._groups.ravel(), np.repeat(d**power, 3))
        return out

    def add(self, genome: Genome, fitness: float) -> None:
        """Record one evaluation (non-finite fitness is left out: it says nothing
        additive)."""
        if np.isfinite(fitness):
            self._x.append(self.features(genome))
            self._y.append(float(fitness))
            self._coef = None

    def fit(self) -> None:
        x = np.stack(self._x)
        y = np.asarray(self._y)
        self._feat_mean = x.mean(0)
        self._mean = float(y.mean())
        xc = x - self._feat_mean
        # Dual ridge: w = X^T (X X^T + λI)^-1 (y - ȳ); n observations << features.
        gram = xc @ xc.T + self.ridge * np.eye(len(y))
        self._coef = xc.T @ np.linalg.solve(gram, y - self._mean)

    def predict(self, genomes: Sequence[Genome]) -> np.ndarray:
        if self._coef is None:
            self.fit()
        assert self._coef is not None and self._feat_mean is not None
        x = np.stack([self.features(g) for g in genomes]) - self._feat_mean
        return self._mean + x @ self._coef


class Screening:
    """How an optimizer uses the surrogate: generate :meth:`size` children instead of
    ``k``, :meth:`pick` the ``k`` to score, :meth:`observe` every score at the
    screening budget. Before ``warmup`` observations it is transparent (``k``
    children, all scored). Deterministic given the optimizer's ``rng``, so a resumed
    search replays it."""

    def __init__(self, space: SearchSpace[Any], params: SurrogateParams) -> None:
        self.params = params
        self.model = AdditiveSurrogate(space, ridge=params.ridge)

    @property
    def ready(self) -> bool:
        return len(self.model) >= self.params.warmup

    def size(self, k: int) -> int:
        """How many children to generate when ``k`` are to be scored."""
        return max(self.params.pool, k) if self.ready else k

    def observe(self, genomes: Sequence[Genome], fitness: Sequence[float]) -> None:
        for g, f in zip(genomes, fitness, strict=True):
            self.model.add(g, f)

    def pick(
        self,
        candidates: Sequence[Genome],
        k: int,
        rng: random.Random,
        *,
        exclude: Genome | None = None,
    ) -> list[Genome]:
        """``k`` of ``candidates`` to score: the ones the model ranks best, and an
        ``explore`` share at random from the rest. Duplicates and ``exclude`` (the
        parent) are dropped first when there are enough others."""
        if not self.ready:
            return list(candidates[:k])
        unique = [g for g in dict.fromkeys(candidates) if g != exclude]
        if len(unique) < k:
            return list(candidates[:k])
        predicted = self.model.predict(unique)
        ranked = [unique[i] for i in sorted(range(len(unique)), key=lambda i: (predicted[i], i))]
        n_model = k - round(self.params.explore * k)
        chosen, rest = ranked[:n_model], ranked[n_model:]
        return chosen + rng.sample(rest, k - len(chosen))
