"""Per-layer bitwidths under an average-bits budget (EvoPress quantization search)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from pydantic import Field, field_validator, model_validator

from evocomp.errors import EvocompError
from evocomp.registry import StrictModel
from evocomp.spaces.base import SPACES, Genome, LevelSpace
from evocomp.spaces.units import Unit


class BitsParams(StrictModel):
    """Options of the ``bits`` space."""

    target: float = Field(3.0, gt=0, description="average bits per weight")
    bits: list[int] = Field(
        default_factory=lambda: [2, 3, 4, 5, 6, 8], description="allowed bitwidths"
    )
    seed: int = Field(0, description="seed of the greedy start for off-level targets")

    @field_validator("bits")
    @classmethod
    def _sorted_unique(cls, bits: list[int]) -> list[int]:
        if not bits or any(b < 2 or b > 16 for b in bits):
            raise ValueError("bits must be a non-empty list of bitwidths in 2..16")
        return sorted(set(bits))

    @model_validator(mode="after")
    def _reachable(self) -> BitsParams:
        if not self.bits[0] <= self.target <= self.bits[-1]:
            raise ValueError(
                f"target {self.target} bits is outside the allowed bitwidths "
                f"{self.bits[0]}..{self.bits[-1]}"
            )
        return self


@SPACES.register("bits")
class BitsSpace(LevelSpace[BitsParams]):
    """Each linear layer picks a bitwidth from ``bits``; the budget is
    ``target`` bits per weight on average over all searched weights.

    Cost is the exact number of stored weight bits (``numel × bits``), so a level
    switch between layers of equal size keeps it unchanged. A target that is one
    of the bitwidths has a true uniform baseline; any other target (2.5, 3.25)
    starts from a seeded greedy allocation just under the budget, and
    :meth:`LevelSpace.repair` brings any genome back under it.
    """

    name = "bits"
    compressor_kind = "bits"

    Params = BitsParams
    joinable = True
    dense_variant = 16
    size_unit = "bits"

    def __init__(self, units: Sequence[Unit], params: BitsParams) -> None:
        super().__init__(units, params)
        if any(u.family != "linear" for u in units):
            raise EvocompError("the bits space applies to linear units only")
        self._budget = int(params.target * sum(u.numel for u in self.units))
        self._start = self._greedy_start()

    @property
    def has_uniform(self) -> bool:
        """Whether the target is itself a bitwidth (a true uniform baseline)."""
        return float(self.params.target) in {float(b) for b in self.params.bits}

    @property
    def baseline_name(self) -> str:
        return "uniform" if self.has_uniform else "greedy-start"

    def _greedy_start(self) -> Genome:
        bits = self.params.bits
        if self.has_uniform:
            return (bits.index(int(self.params.target)),) * len(self)
        floor = max(i for i, b in enumerate(bits) if b <= self.params.target)
        genome = [floor] * len(self)
        order = list(range(len(self)))
        random.Random(self.params.seed).shuffle(order)
        cost = self.cost(tuple(genome))
        for i in order:  # raise layers one level while the budget allows
            extra = self.level_cost(i, floor + 1) - self.level_cost(i, floor)
            if cost + extra <= self._budget:
                genome[i] += 1
                cost += extra
        return tuple(genome)

    def n_levels(self, gene: int) -> int:
        return len(self.params.bits)

    def level_cost(self, gene: int, level: int) -> int:
        return self.units[gene].numel * self.params.bits[level]

    @property
    def budget(self) -> int:
        return self._budget

    def uniform(self) -> Genome:
        return self._start

    def variant(self, gene: int, level: int) -> int | None:
        bits = self.params.bits[level]
        return None if bits >= 16 else bits

    def describe_level(self, gene: int, level: int) -> dict[str, Any]:
        return {"bits": self.params.bits[level]}

    def size_factor(self, gene: int, level: int) -> Fraction:
        """Bits per weight."""
        return Fraction(self.params.bits[level])

    def average_bits(self, genome: Genome) -> float:
        return self.cost(genome) / sum(u.numel for u in self.units)
