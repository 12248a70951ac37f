"""Per-layer unstructured (or N:M) sparsity around a target, EvoPress style."""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from pydantic import Field, model_validator

from evocomp.errors import EvocompError
from evocomp.registry import StrictModel
from evocomp.spaces.base import SPACES, Genome, LevelSpace
from evocomp.spaces.units import Unit


class SparsityParams(StrictModel):
    """Options of the ``sparsity`` space."""

    target: float = Field(0.5, gt=0.0, lt=1.0, description="average sparsity")
    step: float = Field(0.05, gt=0.0, lt=1.0, description="sparsity between levels")
    levels: int = Field(4, ge=1, le=64, description="levels on each side of target")
    refine: int = Field(
        1, ge=1, le=64,
        description="levels lie step/refine apart (levels·refine on each side); "
        "coarse-to-fine search sets it for its finest grid",
    )

    @model_validator(mode="after")
    def _levels_fit(self) -> SparsityParams:
        lo = self.target - self.levels * self.step
        hi = self.target + self.levels * self.step
        if lo < -1e-9 or hi > 1 + 1e-9:
            room = min(self.target, 1 - self.target)
            fit = int(room / self.step + 1e-9)
            hint = (
                f"at most {fit} levels fit on each side" if fit >= 1 else "no level fits"
            ) + f"; or use step <= {room / self.levels:.4g} for levels={self.levels}"
            raise ValueError(
                f"levels={self.levels} with step={self.step} around target={self.target} "
                f"reaches sparsity {lo:.3g}..{hi:.3g}, outside [0, 1]; {hint}"
            )
        return self


@SPACES.register("sparsity")
class SparsitySpace(LevelSpace[SparsityParams]):
    """Each linear layer picks a sparsity ``target + k * step`` for
    ``k in -levels .. levels``; the budget is the uniform total of nonzeros.

    Zero counts are ``round(target * n) + k * round(step * n)`` for a layer of
    ``n`` weights, so layers of equal size have identical cost tables and a switch
    between them keeps the total number of nonzeros exactly on budget.
    """

    name = "sparsity"
    compressor_kind = "sparsity"

    Params = SparsityParams
    joinable = True
    dense_variant = 0

    def __init__(self, units: Sequence[Unit], params: SparsityParams) -> None:
        super().__init__(units, params)
        if any(u.family != "linear" for u in units):
            raise EvocompError("the sparsity space applies to linear units only")
        self._center = params.levels * params.refine
        self._zeros = [
            [self._zeros_at(u.numel, k) for k in range(-self._center, self._center + 1)]
            for u in self.units
        ]
        self._budget = self.cost(self.uniform())

    def _zeros_at(self, numel: int, k: int) -> int:
        base = round(self.params.target * numel)
        step = round(self.params.step / self.params.refine * numel)
        return min(numel, max(0, base + k * step))

    def n_levels(self, gene: int) -> int:
        return 2 * self._center + 1

    def level_cost(self, gene: int, level: int) -> int:
        return self.units[gene].numel - self._zeros[gene][level]

    @property
    def budget(self) -> int:
        return self._budget

    def uniform(self) -> Genome:
        return (self._center,) * len(self)

    def variant(self, gene: int, level: int) -> int | None:
        zeros = self._zeros[gene][level]
        return zeros if zeros > 0 else None

    def describe_level(self, gene: int, level: int) -> dict[str, Any]:
        numel = self.units[gene].numel
        zeros = self._zeros[gene][level]
        return {"sparsity": round(zeros / numel, 6), "nonzeros": numel - zeros}

    def size_factor(self, gene: int, level: int) -> Fraction:
        """The kept fraction of the layer's weights."""
        numel = self.units[gene].numel
        return Fraction(numel - self._zeros[gene][level], numel)

    def position(self, gene: int, level: int) -> float:
        """The kept share of the layer's weights (1 - sparsity)."""
        return 1 - self._zeros[gene][level] / self.units[gene].numel

    @property
    def grid_step(self) -> float:
        return self.params.step

    @classmethod
    def refined(cls, params: SparsityParams, factor: int) -> SparsityParams:
        return params.model_copy(update={"refine": params.refine * factor})

    def sparsity(self, genome: Genome) -> float:
        """Overall sparsity of the searched units."""
        total = sum(u.numel for u in self.units)
        return 1 - self.cost(genome) / total
