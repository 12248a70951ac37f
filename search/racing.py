"""Racing inside a selection stage: score the stage's candidates a few sequences at a
time and stop scoring one as soon as it is significantly worse than the candidate
that holds the last kept place.

A stage that scores its survivors on ``T`` tokens after the stage before scored
them on ``t`` is run as looks at ``t + s, t + 2s, ..., T`` tokens (``s``: the first
stage's tokens, one look's worth). Each look's candidates are compared in pairs
with the *bar*, the candidate ranked last among those kept so far. Per look, the
mean on the look's new tokens follows from the running means (``b_i f_i − b_{i−1}
f_{i−1}`` over ``b_i − b_{i−1}``), so a pair gives one paired difference per look
from the first stage on. A candidate is dropped when the mean of its ``j``
differences exceeds ``z·σ/√j`` (``z``: the normal quantile of ``confidence``), with
``σ`` the within-pair standard deviation of paired differences pooled over every
pair that ran a stage to its end earlier in the search (none is dropped before
``warmup`` degrees of freedom are pooled). A look costs only its new sequences
when the runner keeps the rows it scored
(:class:`~evocomp.evaluators.base.RowwiseEvaluator`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

from pydantic import Field

from evocomp.registry import StrictModel


class RaceParams(StrictModel):
    """``search.race``: drop a stage's candidates early once significantly worse."""

    confidence: float = Field(
        0.95, gt=0.5, lt=1.0,
        description="one-sided confidence that a dropped candidate is worse than the bar",
    )
    warmup: int = Field(
        8, ge=1,
        description="pooled degrees of freedom of paired differences before any drop",
    )


def look_budgets(before: int, tokens: int, step: int) -> list[int]:
    """The token budgets of a raced stage that scores ``tokens`` after the stage
    before scored ``before``: every ``step`` tokens, then ``tokens``."""
    return [*range(before + step, tokens, step), tokens]


def per_look(means: Sequence[tuple[int, float]]) -> list[float]:
    """The mean on each look's new tokens from running means ``(budget, mean)`` at
    growing budgets."""
    out, last_b, last_sum = [], 0, 0.0
    for b, f in means:
        total = b * f
        out.append((total - last_sum) / (b - last_b))
        last_b, last_sum = b, total
    return out


class Race:
    """The pooled variance of paired per-look differences and the drop rule (see the
    module docstring). Holds no genomes: callers pass each candidate's running means."""

    def __init__(self, params: RaceParams) -> None:
        self.params = params
        self._z = NormalDist().inv_cdf(params.confidence)
        self._squares = 0.0
        self._dof = 0
        self.dropped = 0
        """Candidates dropped before their stage's last look, so far."""

    @property
    def sigma(self) -> float | None:
        """The pooled within-pair standard deviation (``None`` before ``warmup``)."""
        if self._dof < self.params.warmup:
            return None
        return math.sqrt(self._squares / self._dof)

    @staticmethod
    def _diffs(a: Sequence[tuple[int, float]], b: Sequence[tuple[int, float]]) -> list[float]:
        if [x for x, _ in a] != [x for x, _ in b]:
            raise ValueError("paired candidates must be scored at the same budgets")
        return [x - y for x, y in zip(per_look(a), per_look(b), strict=True)]

    def observe(self, a: Sequence[tuple[int, float]], b: Sequence[tuple[int, float]]) -> None:
        """Pool the differences of a pair that ran a stage to its end."""
        d = self._diffs(a, b)
        if len(d) < 2 or not all(math.isfinite(x) for x in d):
            return
        mean = sum(d) / len(d)
        self._squares += sum((x - mean) ** 2 for x in d)
        self._dof += len(d) - 1

    def worse(self, c: Sequence[tuple[int, float]], bar: Sequence[tuple[int, float]]) -> bool:
        """Whether candidate ``c`` is significantly worse than ``bar`` (drop it)."""
        sigma = self.sigma
        d = self._diffs(c, bar)
        if sigma is None or len(d) < 2:
            return False
        mean = sum(d) / len(d)
        if not math.isfinite(mean):
            return mean > 0
        return mean > self._z * sigma / math.sqrt(len(d))
