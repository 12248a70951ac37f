"""The gguf compressor reproduces gguf-py's (llama.cpp's) quantization exactly, and its
variants are fixed points of it: what makes a GGUF export of a searched model exact."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from evocomp.errors import EvocompError
from evocomp.spaces.gguf_types import QUANT_TYPES, gguf_type
from evocomp.supernet import COMPRESSORS, GGUFQuantizer

IDS = [gguf_type(t).id for t in QUANT_TYPES]


def _weight(seed: int = 0, rows: int = 24, cols: int = 512, scale: float = 0.02) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * scale
    w[0, :5] *= 40  # outliers, as in trained weights
    return w


def _roundtrip(w: np.ndarray, type_id: int) -> np.ndarray:
    q = GGMLQuantizationType(type_id)
    return dequantize(quantize(w, q), q)


def test_registered_as_the_gguf_kind():
    assert COMPRESSORS.get("gguf") is GGUFQuantizer
    assert GGUFQuantizer.kind == "gguf" and not GGUFQuantizer.needs_calibration


@pytest.mark.parametrize("type_id", IDS, ids=QUANT_TYPES)
def test_compress_is_gguf_py_bit_for_bit(type_id):
    w = _weight()
    out = GGUFQuantizer(w).compress(type_id)
    expected = torch.from_numpy(_roundtrip(w.numpy(), type_id))
    assert out.dtype == w.dtype and out.shape == w.shape
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))  # signs of 0 too
    assert not torch.equal(out, w)
    assert np.array_equal(GGUFQuantizer(w).quantize(type_id), quantize(w.numpy(), type_id))


@pytest.mark.parametrize("type_id", IDS, ids=QUANT_TYPES)
@pytest.mark.parametrize("scale", [0.02, 1.0, 300.0])
def test_requantizing_a_variant_gives_the_same_bytes(type_id, scale):
    """Quantizing the variant again reproduces its blocks byte for byte, so writing it
    to a GGUF file loses nothing."""
    w = _weight(seed=1, rows=64, scale=scale)
    variant = GGUFQuantizer(w).compress(type_id).numpy()
    q = GGMLQuantizationType(type_id)
    assert np.array_equal(quantize(variant, q), quantize(w.numpy(), q))
    assert np.array_equal(_roundtrip(variant, type_id), variant)


@pytest.mark.parametrize("type_id", IDS, ids=QUANT_TYPES)
def test_degenerate_blocks_requantize_to_the_same_values(type_id):
    """Blocks whose fp16 scale is zero: all-zero blocks (Q4_0 / Q5_0 store the scale
    -0.0 the first time, +0.0 the next) and blocks too small for an fp16 scale (Q8_0
    keeps codes under a scale that underflowed to 0). Their bytes may change when
    re-quantized, but every weight is 0 either way, so the values are a fixed point."""
    w = _weight(seed=2, rows=16)
    w[:4] = 0.0
    w[4:8, :256] = 0.0
    w[8:12] *= 1e-5  # 2e-7 weights: a Q8_0 scale of ~2e-9 is below fp16's smallest
    variant = GGUFQuantizer(w).compress(type_id).numpy()
    again = _roundtrip(variant, type_id)
    assert np.array_equal(again, variant)  # equal values (0.0 == -0.0)


def test_half_precision_models_get_their_dtype():
    w = _weight().to(torch.bfloat16)
    out = GGUFQuantizer(w).compress(gguf_type("Q8_0").id)
    assert out.dtype == torch.bfloat16
    expected = _roundtrip(w.float().numpy(), gguf_type("Q8_0").id)
    assert torch.equal(out, torch.from_numpy(expected).to(torch.bfloat16))


def test_bad_levels_are_refused():
    comp = GGUFQuantizer(_weight())
    for level in (12, 0, 1, 30, "Q4_0", 2.0, (2, 3)):  # Q4_K, F32, F16, BF16, ...
        with pytest.raises(EvocompError, match=r"allowed: 2 \(Q4_0\), 3 \(Q4_1\)"):
            comp.compress(level)
    with pytest.raises(EvocompError, match="Q4_0 quantizes rows in blocks of 32.*have 48"):
        GGUFQuantizer(torch.randn(4, 48)).compress(gguf_type("Q4_0").id)
    with pytest.raises(EvocompError, match="TQ2_0 quantizes rows in blocks of 256.*have 64"):
        GGUFQuantizer(torch.randn(4, 64)).compress(gguf_type("TQ2_0").id)


def test_check_variants_refuses_keys_that_are_no_gguf_type():
    GGUFQuantizer.check_variants(GGUFQuantizer.Params(), [(64, [2, 3, 8])])
    with pytest.raises(EvocompError, match="level 4 is not a GGUF type id"):
        GGUFQuantizer.check_variants(GGUFQuantizer.Params(), [(64, [2, 4])])
    with pytest.raises(EvocompError, match="not \\(0, 4\\)"):
        GGUFQuantizer.check_variants(GGUFQuantizer.Params(), [(64, [(0, 4)])])
