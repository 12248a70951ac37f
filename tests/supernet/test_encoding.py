import pytest
import torch
from conftest import random_weight

from evocomp.supernet.encoding import CODES, DENSE, SPARSE, decode, encode, pack, unpack
from evocomp.supernet.quantizers import _round_to_nearest


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


@pytest.mark.parametrize("bits", [*range(1, 9), 12, 16])
@pytest.mark.parametrize("count", [0, 1, 7, 13, 1001])
def test_pack_unpack_round_trip(bits, count):
    codes = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (count * bits + 7) // 8
    assert torch.equal(unpack(packed, bits, count).int(), codes.to(torch.int32))


def test_pack_lays_codes_out_least_significant_bit_first():
    assert pack(torch.tensor([1, 0, 1, 1]), 1).tolist() == [0b1101]
    # 5 = 101 and 3 = 011 give the stream 1,0,1, 1,1,0 (then zero padding).
    assert pack(torch.tensor([5, 3]), 3).tolist() == [0b011101]
    assert pack(torch.tensor([[255, 1]]), 8).tolist() == [255, 1]


def test_pack_refuses_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="outside"):
        pack(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="outside"):
        pack(torch.tensor([-1]), 8)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(torch.zeros(1, dtype=torch.uint8), 3, 3)


def test_a_sparse_weight_keeps_its_values_and_a_bitmask_exactly():
    w = random_weight(rows=24, cols=72)
    w[w.abs() < 1.0] = 0.0
    w[0, :3] = -0.0  # a sign bit torch.equal would not see
    meta, pieces = encode(w)
    assert meta == {"encoding": SPARSE, "shape": [24, 72]}
    assert pieces["mask"].numel() == 24 * 72 // 8
    assert pieces["values"].numel() == int((w != 0).sum()) + 3
    assert _bits_equal(decode(meta, pieces), w)


def test_a_dense_weight_stays_dense():
    meta, pieces = encode(random_weight())
    assert meta == {"encoding": DENSE} and pieces == {}


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantized_weight_is_stored_as_codes_at_its_bitwidth(symmetric, dtype):
    q = _round_to_nearest(random_weight(rows=24, cols=72), 3, 24, symmetric)
    w = q.dequantize(dtype)
    for stored, transposed in ((w, False), (w.T.contiguous(), True)):  # Conv1D: transposed
        meta, pieces = encode(stored, (q.scale, q.zero))
        assert meta["encoding"] == CODES and meta["transposed"] == transposed
        assert meta["bits"] <= 3 and pieces["codes"].numel() == (24 * 72 * meta["bits"] + 7) // 8
        assert _bits_equal(decode(meta, pieces, (q.scale, q.zero)), stored)


def test_a_square_transposed_weight_finds_its_layout():
    q = _round_to_nearest(random_weight(rows=48, cols=48), 4, 16, False)
    w = q.dequantize().T.contiguous()
    meta, pieces = encode(w, (q.scale, q.zero))
    assert meta["encoding"] == CODES and meta["transposed"]
    assert _bits_equal(decode(meta, pieces, (q.scale, q.zero)), w)


def test_a_weight_off_its_grid_is_not_stored_as_codes():
    q = _round_to_nearest(random_weight(rows=24, cols=72), 3, 24, False)
    w = q.dequantize()
    w[3, 5] += 1e-3  # e.g. fine-tuned since
    meta, _ = encode(w, (q.scale, q.zero))
    assert meta["encoding"] != CODES


def test_pruned_entries_of_a_quantized_weight_are_codes_too():
    weight = random_weight(rows=24, cols=72)
    keep = weight.abs() > 0.7
    q = _round_to_nearest(weight.masked_fill(~keep, 0.0), 2, 24, False)
    w = q.dequantize()
    meta, pieces = encode(w, (q.scale, q.zero))
    # 2-bit codes (432 bytes) beat a bitmask and the nonzero float32 values.
    assert meta["encoding"] == CODES and meta["bits"] == 2
    assert _bits_equal(decode(meta, pieces, (q.scale, q.zero)), w)
