"""Per-layer bitwidths under an average-bits budget (EvoPress quantization search).

Two kinds of levels:

* plain bitwidths (``bits: [2, 3, 4, 5, 6, 8]``), built by a ``bits`` compressor
  (RTN, GPTQ); a level's database key is its bitwidth;
* with ``preset: gguf``, llama.cpp tensor types (``types: [Q4_0, Q4_1, Q5_0, Q5_1,
  Q8_0]``), built by the ``gguf`` compressor, which quantizes exactly as llama.cpp
  does so that a GGUF export reproduces the searched model; a level's database key
  is the type's ``GGMLQuantizationType`` id, and its size counts the block scales
  too (Q4_0 stores 4.5 bits per weight).

The two never share a compressor (:attr:`BitsSpace.compressor_kind` is ``bits`` or
``gguf``), so a bitwidth is never mistaken for a type id.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from evocomp.errors import EvocompError, choices
from evocomp.registry import StrictModel
from evocomp.spaces.base import SPACES, Genome, LevelSpace
from evocomp.spaces.gguf_types import GGUF_TYPES, QUANT_TYPES
from evocomp.spaces.units import Unit

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
"""The bitwidths of the plain space unless ``bits`` says otherwise."""



def _by_size(types: Sequence[str]) -> list[str]:
    """``types`` without repeats, cheapest (fewest bits per weight) first."""
    return sorted(set(types), key=lambda t: (GGUF_TYPES[t].bits_per_weight, t))


DEFAULT_GGUF_TYPES = tuple(_by_size([t for t in QUANT_TYPES if GGUF_TYPES[t].block_size == 32]))
"""The types of the ``gguf`` preset unless ``types`` says otherwise, cheapest first:
those whose blocks of 32 weights fit any row length that is a multiple of 32."""


class BitsParams(StrictModel):
    """Options of the ``bits`` space."""

    target: float = Field(
        3.0,
        gt=0,
        description="average bits per weight (preset gguf: stored bits, block scales included)",
    )
    bits: list[int] | None = Field(
        None,
        description=f"allowed bitwidths; default {list(DEFAULT_BITS)} (not with preset gguf)",
    )
    seed: int = Field(0, description="seed of the greedy start for off-level targets")
    preset: Literal["gguf"] | None = Field(
        None,
        description="gguf: the levels are llama.cpp tensor types (types), built by the gguf "
        "compressor so that a GGUF export is exact",
    )
    types: list[str] | None = Field(
        None,
        description="preset gguf: the allowed GGUF types, of "
        f"{', '.join(QUANT_TYPES)}; default {', '.join(DEFAULT_GGUF_TYPES)}",
    )

    @field_validator("bits")
    @classmethod
    def _sorted_unique(cls, bits: list[int] | None) -> list[int] | None:
        if bits is not None and (not bits or any(b < 2 or b > 16 for b in bits)):
            raise ValueError("bits must be a non-empty list of bitwidths in 2..16")
        return None if bits is None else sorted(set(bits))

    @field_validator("types")
    @classmethod
    def _known_types(cls, types: list[str] | None) -> list[str] | None:
        if types is None:
            return None
        if not types:
            raise ValueError(f"types must be a non-empty list of: {choices(QUANT_TYPES)}")
        for name in types:
            if name not in QUANT_TYPES:
                raise ValueError(
                    f"unknown GGUF type {name!r}; types allowed: {choices(QUANT_TYPES)}"
                )
        return _by_size(types)

    @model_validator(mode="after")
    def _levels_and_reach(self) -> BitsParams:
        # The unused list stays None, so a dumped config validates again unchanged.
        if self.preset == "gguf":
            if self.bits is not None:
                raise ValueError(
                    "bits does not go with preset gguf, whose levels are GGUF types: "
                    "set types instead"
                )
            if self.types is None:
                self.types = list(DEFAULT_GGUF_TYPES)
            sizes = [GGUF_TYPES[t].bits_per_weight for t in self.types]
            if not sizes[0] <= self.target <= sizes[-1]:
                raise ValueError(
                    f"target {self.target} bits per weight is outside the range of the "
                    f"GGUF types {self.types[0]} ({float(sizes[0]):g}) .. "
                    f"{self.types[-1]} ({float(sizes[-1]):g}); set target within it"
                )
            return self
        if self.types is not None:
            raise ValueError("types needs preset: gguf (plain bitwidths are set with bits)")
        if self.bits is None:
            self.bits = list(DEFAULT_BITS)
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

    With ``preset: gguf`` each layer picks a GGUF tensor type from ``types``
    instead (levels ordered by bits per weight); cost is the exact stored size of
    its blocks (``numel / block × bytes per block × 8``), a level's database key is
    the type id, its row reads ``{"bits": 4.5, "type": "Q4_0"}``, and the space
    needs the ``gguf`` compressor. Every searched layer's rows must be a whole
    number of blocks of every allowed type.
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
        self.compressor_kind = self.compressor_kind_for(params)
        if params.preset == "gguf":
            assert params.types is not None  # filled in by BitsParams
            self._check_rows(params.types)
            types = [GGUF_TYPES[t] for t in params.types]
            self._sizes = [t.bits_per_weight for t in types]
            self._keys: list[int | None] = [t.id for t in types]
            self._rows: list[dict[str, Any]] = [
                {"bits": float(t.bits_per_weight), "type": t.name} for t in types
            ]
        else:
            assert params.bits is not None  # filled in by BitsParams
            self._sizes = [Fraction(b) for b in params.bits]
            self._keys = [None if b >= 16 else b for b in params.bits]
            self._rows = [{"bits": b} for b in params.bits]
        # Exact integers: every unit's numel is a whole number of blocks (checked above).
        self._costs = [[int(u.numel * s) for s in self._sizes] for u in self.units]
        self._budget = int(params.target * sum(u.numel for u in self.units))
        self._start = self._greedy_start()

    @classmethod
    def compressor_kind_for(cls, params: BitsParams) -> str | None:
        """``gguf`` with the gguf preset (its keys are type ids), else ``bits``."""
        return "gguf" if params.preset == "gguf" else "bits"

    def _check_rows(self, types: Sequence[str]) -> None:
        for t in types:
            block = GGUF_TYPES[t].block_size
            bad = [u for u in self.units if u.shape[1] % block]
            if bad:
                fits = [x for x in QUANT_TYPES if bad[0].shape[1] % GGUF_TYPES[x].block_size == 0]
                raise EvocompError(
                    f"space.types: {t} stores rows in blocks of {block} weights, but "
                    f"{bad[0].name} has rows of {bad[0].shape[1]}; choose types that fit "
                    f"({choices(fits) if fits else 'none does'}) or leave such layers out "
                    "with units.ignore"
                )

    @property
    def has_uniform(self) -> bool:
        """Whether the target is itself a level's size (a true uniform baseline)."""
        return Fraction(self.params.target) in self._sizes

    @property
    def baseline_name(self) -> str:
        return "uniform" if self.has_uniform else "greedy-start"

    def _greedy_start(self) -> Genome:
        target = Fraction(self.params.target)
        if self.has_uniform:
            return (self._sizes.index(target),) * len(self)
        floor = max(i for i, s in enumerate(self._sizes) if s <= target)
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
        return len(self._sizes)

    def level_cost(self, gene: int, level: int) -> int:
        return self._costs[gene][level]

    @property
    def budget(self) -> int:
        return self._budget

    def uniform(self) -> Genome:
        return self._start

    def variant(self, gene: int, level: int) -> int | None:
        """The bitwidth (None for 16 bits: dense), or with preset gguf the GGUF type id."""
        return self._keys[level]

    def describe_level(self, gene: int, level: int) -> dict[str, Any]:
        """``{"bits": 4}``, or with preset gguf ``{"bits": 4.5, "type": "Q4_0"}``
        (bits per weight, block scales included)."""
        return dict(self._rows[level])

    def size_factor(self, gene: int, level: int) -> Fraction:
        """Bits per weight (with preset gguf, block scales included)."""
        return self._sizes[level]

    def average_bits(self, genome: Genome) -> float:
        return self.cost(genome) / sum(u.numel for u in self.units)
