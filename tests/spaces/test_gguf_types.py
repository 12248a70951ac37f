from fractions import Fraction

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from evocomp.errors import EvocompError
from evocomp.spaces.gguf_types import (
    FLOAT_TYPES,
    GGUF_TYPES,
    QUANT_TYPES,
    gguf_type,
    gguf_type_by_id,
)


@pytest.mark.parametrize("name", sorted(GGUF_TYPES))
def test_the_table_matches_gguf_py(name):
    t = GGUF_TYPES[name]
    enum = GGMLQuantizationType[name]
    assert t.id == int(enum)
    assert (t.block_size, t.block_bytes) == GGML_QUANT_SIZES[enum]
    assert gguf_type_by_id(t.id) is t


@pytest.mark.parametrize("name", sorted(GGUF_TYPES))
def test_gguf_py_quantizes_and_dequantizes_every_listed_type(name):
    w = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    enum = GGMLQuantizationType[name]
    packed = quantize(w, enum)
    assert packed.nbytes == w.size // GGUF_TYPES[name].block_size * GGUF_TYPES[name].block_bytes
    assert dequantize(packed, enum).shape == w.shape


def test_unlisted_types_are_the_ones_gguf_py_cannot_quantize():
    """A type gguf-py learns to quantize in a later version should join the table."""
    w = np.zeros((1, 256), dtype=np.float32)
    for enum in GGMLQuantizationType:
        if enum.name in GGUF_TYPES or 256 % GGML_QUANT_SIZES[enum][0]:
            continue
        with pytest.raises(NotImplementedError):
            quantize(w, enum)


def test_sizes_and_lookups():
    assert QUANT_TYPES[:5] == ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
    assert set(FLOAT_TYPES) == {"F32", "F16", "BF16"}
    assert gguf_type("Q4_0").bits_per_weight == Fraction(9, 2)
    assert gguf_type("Q8_0").stored_bits(64) == 2 * 34 * 8
    with pytest.raises(EvocompError, match="whole number of Q8_0 blocks"):
        gguf_type("Q8_0").stored_bits(48)
    with pytest.raises(EvocompError, match="unknown GGUF type 'Q4_K'.*'Q4_0'"):
        gguf_type("Q4_K")
    with pytest.raises(EvocompError, match="unknown GGUF type id 12"):
        gguf_type_by_id(12)
