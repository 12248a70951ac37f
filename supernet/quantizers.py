"""Per-layer weight quantizers: round-to-nearest (RTN) and GPTQ.

A quantizer's ``level`` is a bitwidth. Weights are quantized to an asymmetric
uniform grid per group of ``group_size`` consecutive input columns of each output
row (one group per row when ``group_size`` is None):
``ŵ = scale · (q − zero)`` with integer codes ``q ∈ [0, 2^bits − 1]`` and an
integer zero point, the layout of GPTQ / AutoGPTQ checkpoints, so a result can
later be packed into real low-bit kernels. ``compress(level)`` returns the
dequantized weight (what the model sees); ``quantize(level)`` also returns the
codes and the grid. ``quantize_weight(weight, level, keep)`` quantizes another
weight of the layer (e.g. a pruned one) with the same calibration, holding the
entries outside ``keep`` at exactly zero.
"""

from __future__ import annotations

import operator
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from pydantic import Field

from evocomp.errors import EvocompError
from evocomp.supernet.compressors import (
    COMPRESSORS,
    Grid,
    HessianCompressor,
    LayerCompressor,
    LayerCompressorParams,
    inverse_hessian_cholesky,
)

__all__ = [
    "GPTQ",
    "RTN",
    "GPTQFactor",
    "QuantizedWeight",
    "Quantizer",
    "quantize_dequantize",
]

MIN_BITS, MAX_BITS = 2, 16

GRID_PARTS = ("scale", "zero")
"""The database parts of a quantized variant besides its dequantized weight: its
grid, float32 ``[out, in / group_size]``, so that an export can pack the codes."""


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized ``[out, in]`` weight: ``scale · (codes − zero)`` per group.

    ``codes`` are int32 in ``[0, 2^bits − 1]``; ``scale`` and ``zero`` are float32
    ``[out, in / group_size]`` (``zero`` holds integers); group ``k`` of a row
    covers input columns ``k·group_size .. (k+1)·group_size − 1``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the model sees, ``[out, in]`` in ``dtype``."""
        rows, columns = self.codes.shape
        codes = self.codes.reshape(rows, -1, self.group_size).to(torch.float32)
        weight = _dequantize(codes, self.scale[..., None], self.zero[..., None])
        return weight.reshape(rows, columns).to(dtype)

    def stored(self, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """What a variant database stores: the weight in ``dtype`` and the grid parts."""
        grid = {"scale": self.scale.float().contiguous(), "zero": self.zero.float().contiguous()}
        return self.dequantize(dtype), grid

    @classmethod
    def recover(
        cls, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
    ) -> QuantizedWeight | None:
        """The codes of ``weight`` (``[out, in]``, dequantized from this grid) on the
        grid ``scale``/``zero`` (``[out, groups]``), or None when ``weight`` is not
        exactly on it (e.g. fine-tuned since)."""
        rows, columns = weight.shape
        group_size = columns // scale.shape[1]
        w = weight.float().reshape(rows, -1, group_size)
        s, z = scale.float()[..., None], zero.float()[..., None]
        codes = _codes(w, s, z, 2**bits - 1)
        if not torch.equal(_dequantize(codes, s, z).to(weight.dtype), weight.reshape(w.shape)):
            return None
        return cls(codes.reshape(rows, columns).to(torch.int32), scale.float(), zero.float(),
                   bits, group_size)


def quantize_dequantize(
    weight: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = False
) -> torch.Tensor:
    """Round-to-nearest quantize ``weight`` (``[out, in]``) and return it dequantized.

    Grid per group of ``group_size`` input columns of each row (None = whole row);
    computed in float32, returned as a new tensor in ``weight``'s dtype.
    """
    bits = _check_bits(bits)
    group_size = _check_group_size(weight.shape[-1], group_size)
    return _round_to_nearest(weight.float(), bits, group_size, symmetric).dequantize(weight.dtype)


class QuantizerParams(LayerCompressorParams):
    """Options of :class:`Quantizer`."""

    # 64, not the customary 128: 128 does not divide common widths such as
    # SmolLM2's 576, while 64 divides 576, 1536, 4096, 11008 and 14336.
    group_size: int | None = Field(
        default=64, ge=1, description="input columns per scale/zero; None = per row"
    )
    symmetric: bool = Field(default=False, description="zero point fixed at mid-grid")


class Quantizer(LayerCompressor):
    """A compressor whose level is the bitwidth (``2..16``) of every weight of the layer.

    Asymmetric grids span ``[min(w, 0), max(w, 0)]`` of each group, as in GPTQ, so
    zero is always exactly representable and the zero point is an integer code.
    Symmetric grids (``symmetric=True``) fix the zero point at ``2^(bits−1)`` and
    scale by ``max|w|``.
    """

    kind = "bits"
    parts = GRID_PARTS

    Params = QuantizerParams

    params: QuantizerParams

    def __init__(self, weight: torch.Tensor, params: QuantizerParams | None = None) -> None:
        super().__init__(weight, params)
        # Known at construction, so a bad group size fails before any calibration work.
        self.group_size = _check_group_size(self.columns, self.params.group_size)

    def compress(self, level: int) -> torch.Tensor:
        """Return a new weight quantized to ``level`` bits and dequantized (original dtype)."""
        return self.quantize(level).dequantize(self.dtype)

    def compress_parts(self, level: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The dequantized weight and its grid (parts ``scale`` and ``zero``)."""
        return self.quantize(level).stored(self.dtype)

    @classmethod
    def grid(cls, params: QuantizerParams, level: int) -> Grid:
        return Grid(_check_bits(level), params.group_size, params.symmetric)

    def quantize(self, level: int) -> QuantizedWeight:
        """Quantize to ``level`` bits; codes and grid in the original column order."""
        bits = _check_bits(level)
        self._require_calibration()
        return self._quantize(bits)

    def quantize_weight(
        self, weight: torch.Tensor, level: int, keep: torch.Tensor | None = None
    ) -> QuantizedWeight:
        """Quantize ``weight`` (``[out, in]``, this layer's shape, any dtype) to ``level`` bits
        with this layer's calibration statistics, e.g. a pruned version of the original.

        ``keep`` (bool, ``[out, in]``) marks the entries that may be nonzero; the others
        dequantize to exactly 0, and grids span only the kept values (and 0). Kept
        entries may still round to 0. ``weight`` is not modified.
        """
        bits = _check_bits(level)
        self._require_calibration()
        if weight.shape != self.weight.shape:
            raise ValueError(
                f"weight has shape {tuple(weight.shape)}, the layer {tuple(self.weight.shape)}"
            )
        if keep is not None:
            if keep.shape != weight.shape or keep.dtype != torch.bool:
                raise ValueError(f"keep must be a bool mask of shape {tuple(weight.shape)}")
            keep = keep.to(self.device)
        return self._quantize_weight(weight.to(self.device, torch.float32), bits, keep)

    def _quantize(self, bits: int) -> QuantizedWeight:
        return self._quantize_weight(self.weight, bits)

    @abstractmethod
    def _quantize_weight(
        self, weight: torch.Tensor, bits: int, keep: torch.Tensor | None = None
    ) -> QuantizedWeight:
        """Quantize ``weight`` (float32, ``[out, in]``, not modified) to ``bits``, entries
        outside ``keep`` held at 0; ``bits`` is already valid."""


@COMPRESSORS.register("rtn")
class RTN(Quantizer):
    """Round-to-nearest onto each group's min-max grid; needs no calibration."""

    needs_calibration = False

    def _quantize_weight(
        self, weight: torch.Tensor, bits: int, keep: torch.Tensor | None = None
    ) -> QuantizedWeight:
        if keep is not None:
            # 0 is on every grid (see _grid), so the pruned entries come back exactly 0.
            weight = weight.masked_fill(~keep, 0.0)
        return _round_to_nearest(weight, bits, self.group_size, self.params.symmetric)


class GPTQFactor(NamedTuple):
    """GPTQ's cached factorisation of a layer's Hessian, shared by every bitwidth and mask."""

    perm: torch.Tensor | None
    """The order columns are quantized in (``act_order``); None: their own order."""
    hinv: torch.Tensor
    """Upper Cholesky factor of the dampened ``H⁻¹`` in that order, float32."""


class _Grids(NamedTuple):
    """GPTQ's grids, group-major: group ``k``'s are ``scale[k]`` and ``zero[k]`` (``[rows]``)."""

    scale: torch.Tensor
    zero: torch.Tensor
    lazy: bool
    """Not computed yet: the sweep fills in each group's grid, from the updated
    weights, when it reaches the group's first column."""


class GPTQParams(QuantizerParams):
    """Options of :class:`GPTQ`."""

    dampening: float = Field(default=0.01, gt=0, description="fraction of mean diag(H)")
    blocksize: int = Field(default=128, ge=1, description="columns per lazy-update block")
    act_order: bool = Field(default=False, description="quantize by decreasing diag(H)")


@COMPRESSORS.register("gptq")
class GPTQ(HessianCompressor[GPTQFactor], Quantizer):
    """GPTQ (Frantar et al. 2023): column-by-column quantization with error feedback.

    Hessian ``H = 2/n Σ xᵀx`` is a running mean over calibration tokens. Columns are
    quantized in order; each column's rounding error, scaled by the Cholesky
    factor of ``H⁻¹``, is pushed onto the columns not yet quantized (lazily, one
    ``blocksize`` block at a time). A group's grid is taken from the group's
    *updated* weights when its first column is reached, as in the reference;
    blocks are cut at group boundaries so that every column of the group has
    received all earlier updates by then.

    With ``act_order`` columns go in order of decreasing ``diag(H)`` (the most
    active inputs first, while many columns remain to absorb their error). Groups
    still cover the ORIGINAL consecutive columns, so that the result keeps the
    ordinary grouped layout; since a group's columns are then scattered over the
    order, all grids are computed up front from the original weight ("static
    groups" of the reference). The permutation and the Cholesky factor are cached,
    so quantizing at several bitwidths costs one factorisation.

    Inputs that were always zero keep their weights (rounded to nearest): they do
    not affect the calibration loss, but may be active at inference.

    With a ``keep`` mask (``quantize_weight``) the entries outside it are
    constrained to 0: each is set to 0 when its column is reached, and what error
    feedback it had received up to then is passed on to the later columns like a
    rounding error (as SparseGPT does when it prunes and quantizes jointly). Grids
    are computed with those entries at 0. The factorisation does not depend on
    the mask, so it is shared by every mask and bitwidth.
    """

    needs_calibration = True

    Params = GPTQParams

    params: GPTQParams

    def _factorise(self) -> GPTQFactor:
        if self._factor is None:
            h, perm = self._hessian, None
            if self.params.act_order:
                # Stable, so that ties (e.g. dead inputs) keep a reproducible order.
                perm = torch.argsort(h.diagonal(), descending=True, stable=True)
                h = h[perm][:, perm]
            hinv, _ = inverse_hessian_cholesky(h, self.params.dampening)
            self._factor = GPTQFactor(perm, hinv)
        return self._factor

    def _quantize_weight(
        self, weight: torch.Tensor, bits: int, keep: torch.Tensor | None = None
    ) -> QuantizedWeight:
        factor, maxq = self._factorise(), 2**bits - 1
        grids = self._grids(weight, keep, maxq, permuted=factor.perm is not None)
        codes = self._sweep(weight, keep, factor, grids, maxq)
        return QuantizedWeight(
            codes=codes.to(torch.int32).contiguous(),
            scale=grids.scale.T.contiguous(),
            zero=grids.zero.T.contiguous(),
            bits=bits,
            group_size=self.group_size,
        )

    def _grids(
        self, weight: torch.Tensor, keep: torch.Tensor | None, maxq: int, *, permuted: bool
    ) -> _Grids:
        """The grids of ``weight`` (entries outside ``keep`` at 0) before the sweep:
        computed here for one grid per row and for static groups (``permuted``), left
        for the sweep to fill in (``lazy``) otherwise."""
        g = self.group_size
        n_groups = self.columns // g
        if g < self.columns and not permuted:
            scale = torch.empty(n_groups, self.rows, device=self.device)
            return _Grids(scale, torch.empty_like(scale), lazy=True)
        # one grid per row, or static groups: all grids from the given weight
        start = weight if keep is None else weight.masked_fill(~keep, 0.0)
        scale, zero = _grid(start.reshape(self.rows, n_groups, g), maxq, self.params.symmetric)
        return _Grids(scale[..., 0].T.contiguous(), zero[..., 0].T.contiguous(), lazy=False)

    def _sweep(
        self,
        weight: torch.Tensor,
        keep: torch.Tensor | None,
        factor: GPTQFactor,
        grids: _Grids,
        maxq: int,
    ) -> torch.Tensor:
        """Quantize ``weight``'s columns one by one in the factor's order, pushing each
        column's error onto the columns not yet quantized (lazily, one block at a time);
        return the codes (float32, ``[out, in]``, original column order). Lazy grids are
        filled in as their groups are reached. ``weight`` is not modified."""
        perm, hinv = factor
        g, sym = self.group_size, self.params.symmetric
        order = torch.arange(self.columns) if perm is None else perm.cpu()
        group_of = (order // g).tolist()  # group of the i-th processed column

        # Work on Wᵀ so that each input column is a contiguous row: the per-column
        # rank-1 updates are then much faster on CPU. Always a copy (a [1, n] weight's
        # transpose is already contiguous), so the caller's weight is never updated.
        wt = (weight if perm is None else weight[:, perm]).T.clone(
            memory_format=torch.contiguous_format
        )
        keep_t = None
        if keep is not None:
            keep_t = (keep if perm is None else keep[:, perm]).T.contiguous()
        codes_t = torch.empty_like(wt)
        for i1, i2 in _blocks(self.columns, self.params.blocksize, g if grids.lazy else None):
            w1, h1 = wt[i1:i2], hinv[i1:i2, i1:i2]  # views: updates land in wt
            d = h1.diagonal()
            err = torch.empty_like(w1)
            for j in range(i2 - i1):
                i = i1 + j
                if grids.lazy and i % g == 0:
                    block = wt[i : i + g]
                    if keep_t is not None:
                        block = block.masked_fill(~keep_t[i : i + g], 0.0)
                    s, z = _grid(block, maxq, sym, dim=0)
                    grids.scale[i // g], grids.zero[i // g] = s[0], z[0]
                s, z = grids.scale[group_of[i]], grids.zero[group_of[i]]
                col = w1[j]
                # A pruned entry takes the code of 0, which dequantizes to exactly 0; its
                # error (the feedback it had received) still flows on through e.
                q = _codes(col if keep_t is None else col.masked_fill(~keep_t[i], 0.0), s, z, maxq)
                codes_t[i] = q
                e = (col - _dequantize(q, s, z)) / d[j]
                w1[j + 1 :].addr_(h1[j, j + 1 :], e, alpha=-1)
                err[j] = e
            wt[i2:].addmm_(hinv[i1:i2, i2:].T, err, alpha=-1)

        codes = codes_t.T if perm is None else torch.empty_like(codes_t.T)
        if perm is not None:
            codes[:, perm] = codes_t.T
        return codes


# --- shared maths: RTN and GPTQ use the same grid and rounding ---------------------


def _grid(
    w: torch.Tensor, maxq: int, symmetric: bool, dim: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of the min-max grid of ``w`` along ``dim`` (kept).

    Zero is always on the grid: the range includes 0 and the zero point is an
    integer code in ``[0, maxq]``, so a 0 entry gets code ``zero`` and
    dequantizes to ``scale · 0 = 0`` exactly (asymmetric and symmetric alike).
    """
    lo = w.amin(dim, keepdim=True).clamp(max=0)
    hi = w.amax(dim, keepdim=True).clamp(min=0)
    if symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    # An all-zero group would give scale 0; any grid represents it exactly.
    empty = (lo == 0) & (hi == 0)
    lo, hi = lo.masked_fill(empty, -1.0), hi.masked_fill(empty, 1.0)
    scale = (hi - lo) / maxq
    zero = torch.full_like(scale, (maxq + 1) // 2) if symmetric else torch.round(-lo / scale)
    return scale, zero


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Nearest integer codes (as float32) of ``w`` on the grid, clamped to ``[0, maxq]``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    # One formula everywhere, so GPTQ's error feedback sees exactly the returned weight.
    return scale * (codes - zero)


def _round_to_nearest(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> QuantizedWeight:
    rows, columns = w.shape
    groups = w.reshape(rows, columns // group_size, group_size)
    maxq = 2**bits - 1
    scale, zero = _grid(groups, maxq, symmetric)
    codes = _codes(groups, scale, zero, maxq)
    return QuantizedWeight(
        codes=codes.reshape(rows, columns).to(torch.int32),
        scale=scale[..., 0],
        zero=zero[..., 0],
        bits=bits,
        group_size=group_size,
    )


def _blocks(columns: int, blocksize: int, group_size: int | None) -> Iterator[tuple[int, int]]:
    """Lazy-update blocks ``[i1, i2)``; with ``group_size``, no group straddles two
    blocks unless it starts one, so a group's columns are up to date at its start."""
    i1 = 0
    while i1 < columns:
        i2 = min(i1 + blocksize, columns)
        if group_size is not None:
            if group_size <= blocksize:
                i2 = min(columns, (i1 + blocksize) // group_size * group_size)
            else:
                i2 = min(i2, (i1 // group_size + 1) * group_size)
        yield i1, i2
        i1 = i2


def _check_bits(level: object) -> int:
    try:
        bits = operator.index(level)  # type: ignore[arg-type]
    except TypeError:
        raise EvocompError(f"bitwidth must be an integer, got {level!r}") from None
    if not MIN_BITS <= bits <= MAX_BITS:
        raise EvocompError(f"bitwidth {level!r} is outside {MIN_BITS}..{MAX_BITS}")
    return bits


def _check_group_size(columns: int, group_size: int | None) -> int:
    """The effective group size (``columns`` for None); must divide ``columns``."""
    if group_size is None:
        return columns
    if group_size < 1 or columns % group_size:
        valid = ", ".join(str(d) for d in range(1, columns + 1) if columns % d == 0)
        raise EvocompError(
            f"group_size {group_size} does not divide the {columns} input features; "
            f"valid choices: None (one group per output row), {valid}"
        )
    return group_size
