"""The ``gguf`` compressor: llama.cpp's own quantization, reproduced with gguf-py.

A level is a GGUF tensor type id (``GGMLQuantizationType``, e.g. 2 = Q4_0; see
:mod:`evocomp.spaces.gguf_types`); the variant is the weight quantized by
``gguf.quants.quantize`` (a port of ggml's reference quantizers) and dequantized
back. A float32 model's variant is therefore exactly what llama.cpp computes with
from a GGUF file holding that type, and quantizing the variant again gives the
same values (checked per type in the tests), so a GGUF export of a searched model
(:mod:`evocomp.gguf_export`) reproduces the searched weights bit for bit.

Models in float16 / bfloat16 store the variant rounded to their dtype, which is
in general off the type's grid: their export re-quantizes it and is close, not
exact.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from evocomp.errors import EvocompError
from evocomp.spaces.gguf_types import QUANT_TYPES, GGUFType, gguf_type
from evocomp.spaces.units import VariantKey
from evocomp.supernet.compressors import COMPRESSORS, LayerCompressor, LayerCompressorParams

__all__ = ["GGUFQuantizer", "GGUFQuantizerParams", "gguf_level_type"]


def _allowed() -> str:
    return ", ".join(f"{gguf_type(t).id} ({t})" for t in QUANT_TYPES)


def gguf_level_type(level: object) -> GGUFType:
    """The quantized GGUF type whose id is ``level``; anything else is refused with
    the allowed ids and names."""
    try:
        type_id = operator.index(level)  # type: ignore[arg-type]
    except TypeError:
        type_id = None
    match = [t for t in QUANT_TYPES if gguf_type(t).id == type_id]
    if not match:
        raise EvocompError(
            f"gguf compressor level {level!r} is not a GGUF type id it can quantize; "
            f"allowed: {_allowed()}"
        )
    return gguf_type(match[0])


class GGUFQuantizerParams(LayerCompressorParams):
    """Options of :class:`GGUFQuantizer` (none: each type fixes its own grid)."""


@COMPRESSORS.register("gguf")
class GGUFQuantizer(LayerCompressor):
    """Quantize to a GGUF tensor type exactly as llama.cpp does (gguf-py's port of
    ggml's reference quantizers); needs no calibration.

    ``compress(level)`` with ``level`` a ``GGMLQuantizationType`` id returns the
    dequantized weight in the original dtype; :meth:`quantize` returns the packed
    blocks as a GGUF file stores them. Rows (input features) must be a whole number
    of the type's blocks (32 weights; 256 for TQ1_0 / TQ2_0).
    """

    kind = "gguf"
    needs_calibration = False

    Params = GGUFQuantizerParams

    @classmethod
    def check_variants(
        cls, params: Any, needs: Sequence[tuple[int, Sequence[VariantKey]]]
    ) -> None:
        """Every key must be the id of a GGUF type this compressor quantizes."""
        for _numel, keys in needs:
            for key in keys:
                if isinstance(key, tuple):
                    raise EvocompError(
                        f"the gguf compressor's variant keys are GGUF type ids, not {key!r}; "
                        "use it with space.name: bits, preset: gguf"
                    )
                gguf_level_type(key)

    @classmethod
    def tensor_type(cls, params: Any, level: int) -> str:
        """The GGUF type named by ``level``: the variant lies on its grid."""
        return gguf_level_type(level).name

    def quantize(self, level: int) -> np.ndarray:
        """The weight as ``level``'s packed blocks: uint8 ``[out, bytes per row]``."""
        kind = self._type(level)
        return quantize(self.weight.cpu().numpy(), GGMLQuantizationType(kind.id))

    def compress(self, level: int) -> torch.Tensor:
        """The weight quantized to GGUF type ``level`` and dequantized (original dtype)."""
        values = dequantize(self.quantize(level), GGMLQuantizationType(self._type(level).id))
        return torch.from_numpy(values).to(device=self.device, dtype=self.dtype)

    def _type(self, level: int) -> GGUFType:
        kind = gguf_level_type(level)
        if self.columns % kind.block_size:
            raise EvocompError(
                f"GGUF type {kind.name} quantizes rows in blocks of {kind.block_size} weights, "
                f"but this layer's rows have {self.columns}"
            )
        return kind
