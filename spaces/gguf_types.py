"""The GGUF (llama.cpp) tensor types evocomp can produce, without importing gguf.

Spaces need each type's size (bits per weight) and id to build levels and
database keys; the compressor and the GGUF writer (which do import gguf-py) need
the same table, so it lives here, in the pure-Python layer. A test checks every
row against gguf-py's ``GGML_QUANT_SIZES`` and ``GGMLQuantizationType``.

Only the types gguf-py can both quantize and dequantize are listed as quantized
types (gguf 0.19: the legacy block types, the ternary TQ types and MXFP4; the
k-quants and i-quants it can only dequantize), because the compressor must
reproduce llama.cpp's quantization bit for bit to make an export exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from evocomp.errors import EvocompError, choices

__all__ = [
    "FLOAT_TYPES",
    "GGUF_TYPES",
    "QUANT_TYPES",
    "GGUFType",
    "gguf_type",
    "gguf_type_by_id",
]


@dataclass(frozen=True)
class GGUFType:
    """One GGUF tensor type: ``block_size`` weights (along a row) are stored in
    ``block_bytes`` bytes."""

    name: str
    """gguf-py's name (``GGMLQuantizationType[name]``), e.g. ``"Q4_0"``."""
    id: int
    """The ``GGMLQuantizationType`` value: the type id written in the file, and the
    database key of a ``gguf`` compressor variant."""
    block_size: int
    block_bytes: int
    quantized: bool
    """A block type with scales (False: a plain float type, one weight per block)."""

    @property
    def bits_per_weight(self) -> Fraction:
        """Stored bits per weight, scales included (Q4_0: 18 bytes / 32 = 4.5)."""
        return Fraction(self.block_bytes * 8, self.block_size)

    def stored_bits(self, numel: int) -> int:
        """Exact stored bits of ``numel`` weights (a multiple of :attr:`block_size`)."""
        if numel % self.block_size:
            raise EvocompError(
                f"{numel} weights are not a whole number of {self.name} blocks "
                f"({self.block_size} weights each)"
            )
        return numel // self.block_size * self.block_bytes * 8


_TABLE = (
    GGUFType("F32", 0, 1, 4, False),
    GGUFType("F16", 1, 1, 2, False),
    GGUFType("Q4_0", 2, 32, 18, True),
    GGUFType("Q4_1", 3, 32, 20, True),
    GGUFType("Q5_0", 6, 32, 22, True),
    GGUFType("Q5_1", 7, 32, 24, True),
    GGUFType("Q8_0", 8, 32, 34, True),
    GGUFType("BF16", 30, 1, 2, False),
    GGUFType("TQ1_0", 34, 256, 54, True),
    GGUFType("TQ2_0", 35, 256, 66, True),
    GGUFType("MXFP4", 39, 32, 17, True),
)

GGUF_TYPES: dict[str, GGUFType] = {t.name: t for t in _TABLE}
"""Every type evocomp writes, by name."""

QUANT_TYPES: tuple[str, ...] = tuple(t.name for t in _TABLE if t.quantized)
"""The quantized block types gguf-py both quantizes and dequantizes."""

FLOAT_TYPES: tuple[str, ...] = tuple(t.name for t in _TABLE if not t.quantized)
"""The plain float types (embeddings, norms and unsearched layers of an export)."""

_BY_ID = {t.id: t for t in _TABLE}


def gguf_type(name: str) -> GGUFType:
    """The type called ``name``; an unknown name lists the known ones."""
    try:
        return GGUF_TYPES[name]
    except KeyError:
        raise EvocompError(
            f"unknown GGUF type {name!r}; allowed: {choices(GGUF_TYPES)}"
        ) from None


def gguf_type_by_id(type_id: int) -> GGUFType:
    """The type whose ``GGMLQuantizationType`` value is ``type_id``."""
    try:
        return _BY_ID[type_id]
    except (KeyError, TypeError):
        allowed = ", ".join(f"{t.id} ({t.name})" for t in _TABLE)
        raise EvocompError(f"unknown GGUF type id {type_id!r}; allowed: {allowed}") from None
