"""Compact, exact encodings of the weights a variant database stores.

A stored weight is kept in the smallest of these forms that decodes to the very
same bits (checked when it is encoded; an inexact form is never chosen):

``dense``
    the tensor as it is (the only form of databases written before encodings).
``sparse``
    the entries that are not ``+0.0`` (piece ``values``, the weight's dtype) and a
    bitmask of where they are (piece ``mask``, 1 bit per entry, see :func:`pack`).
``codes``
    a quantized weight's integer codes on its stored grid (the variant's ``scale``
    and ``zero`` parts, see :class:`.QuantizedWeight`), packed at as few bits per
    code as its largest code needs (piece ``codes``); the float weight is not stored.

:func:`encode` picks the form, :func:`decode` inverts it; the database records
each form's :class:`dict` description (JSON) in its manifest.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from evocomp.supernet.quantizers import MAX_BITS, QuantizedWeight

__all__ = ["CODES", "DENSE", "PIECES", "SPARSE", "decode", "encode", "pack", "unpack"]

DENSE, SPARSE, CODES = "dense", "sparse", "codes"
PIECES: dict[str, tuple[str, ...]] = {DENSE: (), SPARSE: ("mask", "values"), CODES: ("codes",)}
"""The stored tensors of each encoding besides the variant's parts."""

_DTYPES = {str(t).removeprefix("torch."): t for t in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
)}


_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` (integers in ``[0, 2^bits)``, any shape) as a flat uint8 bit stream:
    code ``i`` occupies bits ``i·bits .. (i+1)·bits − 1``, least significant first,
    bit ``j`` of the stream being bit ``j mod 8`` of byte ``j // 8``; the last byte is
    zero-padded. ``ceil(numel · bits / 8)`` bytes."""
    _check(bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes outside [0, 2^{bits}) cannot be packed at {bits} bits")
    n = flat.numel()
    size = math.ceil(n * bits / 8)
    if bits > 8:
        return _pack_planes(flat, bits)[:size]
    if 8 % bits == 0:  # whole codes per byte (masks, 2-, 4-, 8-bit codes): uint8 only
        per = 8 // bits
        groups = torch.zeros(size * per, dtype=torch.uint8, device=codes.device)
        groups[:n] = flat
        groups = groups.view(size, per)
        packed = groups[:, 0].clone()
        for i in range(1, per):
            packed |= groups[:, i] << (i * bits)
        return packed
    # Eight codes fill ``bits`` whole bytes: one int64 word per eight codes, split
    # into its bytes (little-endian, so the stream is least significant bit first).
    groups = torch.zeros(math.ceil(n / 8) * 8, dtype=torch.int64, device=codes.device)
    groups[:n] = flat
    shifts = torch.arange(0, 8 * bits, bits, device=codes.device)
    words = (groups.view(-1, 8) << shifts).sum(dim=1)  # the codes' bits do not overlap
    octets = torch.arange(0, 8 * bits, 8, device=codes.device)
    return ((words[:, None] >> octets) & 0xFF).to(torch.uint8).reshape(-1)[:size]


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes of ``bits`` bits each in ``packed`` (see :func:`pack`),
    flat: uint8 up to 8 bits, int32 above."""
    _check(bits)
    if packed.dtype != torch.uint8 or packed.numel() * 8 < count * bits:
        raise ValueError(f"{packed.numel()} {packed.dtype} bytes cannot hold {count}×{bits} bits")
    if bits > 8:
        return _unpack_planes(packed, bits, count)
    if 8 % bits == 0:
        # One lookup per byte: decoding sits on a search's variant switches, and each
        # torch op costs a thread-pool round trip.
        table = _byte_table(bits, packed.device)
        return table[packed[: math.ceil(count * bits / 8)].long()].reshape(-1)[:count]
    words_n = math.ceil(count / 8)
    octets = torch.zeros(words_n * bits, dtype=torch.int64, device=packed.device)
    used = min(packed.numel(), octets.numel())
    octets[:used] = packed[:used]
    shifts = torch.arange(0, 8 * bits, 8, device=packed.device)
    words = (octets.view(words_n, bits) << shifts).sum(dim=1)
    positions = torch.arange(0, 8 * bits, bits, device=packed.device)
    codes = (words[:, None] >> positions) & (2**bits - 1)
    return codes.reshape(-1)[:count].to(torch.uint8)


_TABLES: dict[tuple[int, str], torch.Tensor] = {}


def _byte_table(bits: int, device: torch.device) -> torch.Tensor:
    """uint8 ``[256, 8 // bits]``: the codes each byte value holds, in stream order."""
    key = (bits, str(device))
    if key not in _TABLES:
        shifts = torch.arange(0, 8, bits, dtype=torch.int64)
        table = (torch.arange(256)[:, None] >> shifts) & (2**bits - 1)
        _TABLES[key] = table.to(device=device, dtype=torch.uint8)
    return _TABLES[key]


def _check(bits: int) -> None:
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")


def _pack_planes(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack` for codes wider than a byte (rare: levels above 8 bits), one bit
    plane at a time; the stream padded to whole bytes."""
    n = flat.numel()
    stream = torch.zeros(math.ceil(n * bits / 8) * 8, dtype=torch.uint8, device=flat.device)
    planes = stream[: n * bits].view(n, bits)
    for i in range(bits):
        planes[:, i] = (flat >> i) & 1
    stream = stream.view(-1, 8)
    packed = torch.zeros(stream.shape[0], dtype=torch.uint8, device=flat.device)
    for j in range(8):
        packed |= stream[:, j] << j
    return packed


def _unpack_planes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    stream = torch.empty(packed.numel(), 8, dtype=torch.uint8, device=packed.device)
    for j in range(8):
        stream[:, j] = (packed >> j) & 1
    planes = stream.view(-1)[: count * bits].view(count, bits)
    codes = torch.zeros(count, dtype=torch.int32, device=packed.device)
    for i in range(bits):
        codes |= planes[:, i].to(torch.int32) << i
    return codes


def _nonzero(tensor: torch.Tensor) -> torch.Tensor:
    """Flat bool mask of the entries whose bits are not all zero: ``-0.0`` counts as
    nonzero, so that a sparse encoding restores its sign bit."""
    flat = tensor.contiguous().reshape(-1)
    return flat.view(_INTS[flat.element_size()]).ne(0)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` have one dtype and shape and the very same bytes (stricter than
    ``torch.equal``, which takes ``-0.0`` for ``0.0``)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = _INTS[a.element_size()]
    return torch.equal(a.contiguous().reshape(-1).view(ints), b.contiguous().reshape(-1).view(ints))


def _codes(
    weight: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, bool] | None:
    """``weight``'s codes on ``grid`` (``[out, in]`` layout, int32) and whether the
    weight is stored transposed (Conv1D); None when it is not on the grid."""
    scale, zero = grid
    if weight.dim() != 2 or scale.shape != zero.shape or scale.dim() != 2:
        return None
    # Try the stored layout first; a transposed (Conv1D) weight fits only the other,
    # and a square one matches its grid in one layout only (checked by recover).
    for transposed, w in ((False, weight), (True, weight.T)):
        rows, columns = w.shape
        if rows != scale.shape[0] or scale.shape[1] == 0 or columns % scale.shape[1]:
            continue
        q = QuantizedWeight.recover(w, scale, zero, MAX_BITS)
        if q is not None:
            return q.codes, transposed
    return None


def encode(
    weight: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The smallest exact encoding of ``weight`` (a stored tensor, contiguous, on the
    CPU): its description and its pieces by name (:data:`PIECES`). ``grid``, the
    variant's ``(scale, zero)`` parts, allows ``codes``. Each candidate is decoded
    and compared bit for bit before it is chosen; ``dense`` is the fallback."""
    n, item = weight.numel(), weight.element_size()
    # (bytes, rank, form): the smallest first, ties to the simpler form
    candidates: list[tuple[int, int, str]] = [(n * item, 0, DENSE)]
    mask = _nonzero(weight)
    kept = int(mask.sum())
    candidates.append((math.ceil(n / 8) + kept * item, 1, SPARSE))
    found = None
    if grid is not None and weight.dtype in _DTYPES.values():
        found = _codes(weight, grid)
    if found is not None:
        bits = max(1, int(found[0].max()).bit_length()) if n else 1
        candidates.append((math.ceil(n * bits / 8), 2, CODES))
    for _, _, form in sorted(candidates):
        if form == DENSE:
            return {"encoding": DENSE}, {}
        if form == SPARSE:
            meta = {"encoding": SPARSE, "shape": list(weight.shape)}
            pieces = {"mask": pack(mask, 1), "values": weight.reshape(-1)[mask]}
        else:
            assert found is not None and grid is not None
            codes, transposed = found
            meta = {"encoding": CODES, "shape": list(weight.shape), "bits": bits,
                    "dtype": str(weight.dtype).removeprefix("torch."), "transposed": transposed}
            pieces = {"codes": pack(codes, bits)}
        if _same_bits(decode(meta, pieces, grid), weight):
            return meta, pieces
    raise AssertionError("unreachable: dense is always a candidate")


def decode(
    meta: dict[str, Any],
    pieces: dict[str, torch.Tensor],
    grid: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The tensor :func:`encode` encoded as ``meta`` and ``pieces`` (``grid``: the
    variant's scale and zero parts, for ``codes``), on the pieces' device."""
    form = meta["encoding"]
    shape = tuple(meta.get("shape", ()))
    if form == SPARSE:
        values = pieces["values"]
        n = math.prod(shape)
        mask = unpack(pieces["mask"], 1, n).view(torch.bool)  # codes 0 and 1
        out = torch.zeros(n, dtype=values.dtype, device=values.device)
        return out.masked_scatter_(mask, values).view(shape)
    if form == CODES:
        if grid is None:
            raise ValueError("a codes encoding needs its grid (scale, zero)")
        scale, zero = grid
        rows, columns = shape[::-1] if meta["transposed"] else shape
        codes = unpack(pieces["codes"], meta["bits"], rows * columns).view(rows, columns)
        q = QuantizedWeight(codes, scale.float(), zero.float(), meta["bits"],
                            columns // scale.shape[1])
        w = q.dequantize(_DTYPES[meta["dtype"]])
        return (w.T if meta["transposed"] else w).contiguous()
    raise ValueError(f"unknown stored encoding {form!r}")
