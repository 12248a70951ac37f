"""Per-layer compressors: accumulate calibration statistics for one linear layer,
then produce its compressed weight at any level.

The maths follows SparseGPT / Wanda / magnitude pruning; nothing here touches
modules, hooks or files, so callers decide where inputs come from and where
weights go. Every compressor works in float32 on the weight's device and
returns a new tensor in the weight's original dtype.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Generic, Literal, NamedTuple, TypeVar

import torch
from pydantic import Field, model_validator

from evocomp.errors import EvocompError
from evocomp.registry import Registry, StrictModel
from evocomp.spaces.units import UnitFamily, VariantKey

__all__ = [
    "COMPRESSORS",
    "CholeskyFactor",
    "Grid",
    "InputNormPruner",
    "LayerCompressor",
    "LayerCompressorParams",
    "Magnitude",
    "Pruner",
    "PrunerParams",
    "SparseGPT",
    "Wanda",
    "inverse_hessian_cholesky",
]


class Grid(NamedTuple):
    """An integer quantization grid: ``ŵ = scale · (code − zero)`` per group of
    ``group_size`` consecutive input columns of a row (None: one group per row),
    codes in ``[0, 2^bits − 1]``; ``symmetric`` grids have ``zero = 2^(bits−1)``."""

    bits: int
    group_size: int | None
    symmetric: bool


class LayerCompressorParams(StrictModel):
    """Per-compressor options, validated from the config."""


class LayerCompressor(ABC):
    """One linear layer: accumulate calibration statistics, then produce compressed weights.

    ``weight`` is in ``[out_features, in_features]`` layout (callers transpose
    GPT-2's Conv1D). The compressor keeps its own float32 copy; the caller's
    tensor is never modified. ``compress(level)`` may be called many times, each
    call starting from the original weight.
    """

    kind: ClassVar[str]
    needs_calibration: ClassVar[bool]
    unit_family: ClassVar[UnitFamily] = "linear"
    """The units whose variants it builds: linear layers, or whole sublayers (width)."""
    parts: ClassVar[tuple[str, ...]] = ()
    """Tensors stored with every variant besides its weight (e.g. kept indices)."""

    Params = LayerCompressorParams

    def __init__(self, weight: torch.Tensor, params: LayerCompressorParams | None = None) -> None:
        if weight.ndim != 2:
            raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
        if params is None:
            params = self.Params()
        elif not isinstance(params, self.Params):
            raise EvocompError(
                f"{type(self).__name__} expects {type(self).__name__}.Params, "
                f"got {type(params).__name__}"
            )
        self.params = params
        self.dtype = weight.dtype
        self.device = weight.device
        self.weight = weight.detach().to(dtype=torch.float32, copy=True)
        self.rows, self.columns = self.weight.shape
        self.nsamples = 0  # calibration tokens seen

    @classmethod
    def check_variants(cls, params: Any, needs: Sequence[tuple[int, Sequence[VariantKey]]]) -> None:
        """Called once before a variant database is built, with the options (a
        ``cls.Params``) and each unit's weight count and the keys it needs: refuse,
        with a message naming the config field, keys this compressor cannot produce
        with ``params`` (e.g. zero counts that are no N:M pattern). Every key is
        fine by default."""
        return None

    @classmethod
    def needs_gradients(cls, params: Any) -> bool:
        """Whether the compressor with ``params`` reads per-weight gradient norms, which
        its builder then hands over with :meth:`add_gradient` before compressing."""
        return False

    def add_gradient(self, gradient: torch.Tensor) -> None:
        """Per-weight gradient norms ``[out, in]`` (see
        :mod:`evocomp.supernet.gradients`); only for compressors that need them."""
        raise NotImplementedError(f"{type(self).__name__} reads no gradients")

    @classmethod
    def needs_start(cls, params: Any) -> bool:
        """Whether a database build with ``params`` propagates its calibration inputs
        through the search's starting variants (which the build is then given)."""
        return False

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Accumulate statistics from layer inputs ``[..., in_features]`` (any dtype)."""
        if inputs.shape[-1] != self.columns:
            raise ValueError(
                f"inputs have {inputs.shape[-1]} features, the layer expects {self.columns}"
            )
        x = inputs.detach().reshape(-1, self.columns).to(device=self.device, dtype=torch.float32)
        if x.shape[0] == 0:
            return
        self._accumulate(x)
        self.nsamples += x.shape[0]

    def _accumulate(self, x: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """Fold ``x`` ([tokens, in_features], float32) into the running statistics.

        Called before ``nsamples`` is increased, so running means can reweight.
        """

    @abstractmethod
    def compress(self, level: int) -> torch.Tensor:
        """Return a new weight at ``level``: same shape, dtype and device as the original."""

    def compress_parts(self, level: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weight at ``level`` (as :meth:`compress`) and the :attr:`parts` stored
        beside it in a variant database, by part name; called once per variant by a
        database build. No parts by default."""
        return self.compress(level), {}

    @classmethod
    def tensor_type(cls, params: Any, level: Any) -> str | None:
        """The llama.cpp tensor type (``"Q4_0"``) whose grid the weight of ``level``
        lies on, which a GGUF export writes it as exactly; None (the default): none."""
        return None

    @classmethod
    def grid(cls, params: Any, level: Any) -> Grid | None:
        """The integer grid the weight of ``level`` lies on, with ``params`` (a
        ``cls.Params``): what an export packs, reading the grid's ``scale`` and
        ``zero`` parts from the database. None (the default): stored as floats."""
        return None

    def _require_calibration(self) -> None:
        if self.needs_calibration and self.nsamples == 0:
            raise EvocompError(
                f"{type(self).__name__} needs calibration inputs: "
                "call add_batch() before compress()"
            )


COMPRESSORS: Registry[type[LayerCompressor]] = Registry("compressor", LayerCompressor)


class PrunerParams(LayerCompressorParams):
    """Options of :class:`Pruner`."""

    nm_group: int | None = Field(
        default=None, ge=1, description="m of N:M sparsity; None = unstructured"
    )


class Pruner(LayerCompressor):
    """A compressor whose level is the EXACT number of zeros in the returned weight.

    ``level`` ranges over ``0..numel``. With ``Params.nm_group = m`` the zeros are
    N:M structured: every group of ``m`` consecutive input columns of every row
    holds exactly ``k = level * m / numel`` zeros, so ``level`` must be a multiple
    of ``numel / m`` (``level = numel / 2`` with ``m = 4`` is 2:4 sparsity).

    Exactness assumes the original weight has no zeros outside the pruned set
    (true for trained weights); a kept weight that would round to zero in a
    narrow dtype is replaced by the smallest subnormal of its sign.
    """

    kind = "sparsity"

    Params = PrunerParams

    params: PrunerParams

    @classmethod
    def check_variants(
        cls, params: PrunerParams, needs: Sequence[tuple[int, Sequence[VariantKey]]]
    ) -> None:
        """With ``nm_group = m``, every zero count must be a multiple of ``numel / m``."""
        m = params.nm_group
        if m is not None and any(int(z) * m % n for n, keys in needs for z in keys):
            raise EvocompError(
                f"compressor.nm_group={m} needs space levels that are multiples of 1/{m} "
                f"(set space.target and space.step to multiples of {1 / m:g})"
            )

    @property
    def numel(self) -> int:
        """Number of weights, the largest level."""
        return self.rows * self.columns

    @property
    def level_step(self) -> int:
        """Valid levels are the multiples of this: ``numel / m`` with N:M, else 1."""
        m = self.params.nm_group
        return 1 if m is None else self.numel // m

    def compress(self, level: int) -> torch.Tensor:
        """Return a new weight with exactly ``level`` zeros (see the class docstring)."""
        level = self._check_level(level)
        self._require_calibration()
        weight, pruned = self._prune(level)
        return self._finish(weight, pruned)

    @abstractmethod
    def _prune(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return float32 weights and a boolean mask with exactly ``level`` True (pruned)."""

    def _check_level(self, level: int) -> int:
        level = operator.index(level)
        if not 0 <= level <= self.numel:
            raise EvocompError(f"sparsity level {level} is outside [0, {self.numel}]")
        m = self.params.nm_group
        if m is not None:
            if self.columns % m:
                raise EvocompError(
                    f"N:M group size {m} does not divide the {self.columns} input features"
                )
            step = self.level_step
            if level % step:
                valid = ", ".join(str(k * step) for k in range(m + 1))
                raise EvocompError(
                    f"level {level} is not N:{m} structured; valid levels are multiples of "
                    f"{step}: {valid}"
                )
        return level

    def _zeros_per_group(self, level: int) -> int:
        assert self.params.nm_group is not None
        return level * self.params.nm_group // self.numel

    def _finish(self, weight: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
        out = weight.masked_fill(pruned, 0.0).to(self.dtype).contiguous()
        # A kept weight that underflows to zero in the target dtype would break the
        # exact zero count; nudge it to the smallest subnormal instead.
        lost = ~pruned & (out == 0) & (weight != 0)
        if lost.any():
            info = torch.finfo(self.dtype)
            tiny = torch.tensor(info.tiny * info.eps, dtype=self.dtype, device=out.device)
            out[lost] = torch.where(weight[lost] < 0, -tiny, tiny)
        return out


class _RankedPruner(Pruner):
    """A pruner whose scores do not depend on the level: rank once, then each level
    is a threshold on the ranks (many levels per layer cost one sort).

    A caller that compresses once (one-shot pruning) sets :attr:`single_level`: a
    level that gives every comparison group the same count is then picked by a
    partial sort (``topk``, ~4x faster than ranking every weight), with ties
    falling to one of the tied weights (repeatable, not necessarily the lowest
    column)."""

    per_row: ClassVar[bool]  # compare within output rows rather than the whole layer
    single_level: bool = False

    def __init__(self, weight: torch.Tensor, params: PrunerParams | None = None) -> None:
        super().__init__(weight, params)
        self._ranks: torch.Tensor | None = None  # [groups, group size], rank within the group

    @abstractmethod
    def _scores(self) -> torch.Tensor:
        """Saliency of every weight, ``[out, in]``; the lowest are pruned first."""

    def _groups(self) -> torch.Tensor:
        """The scores, one comparison group per row."""
        scores = self._scores()
        m = self.params.nm_group
        if m is not None:
            return scores.reshape(-1, m)
        return scores if self.per_row else scores.reshape(1, -1)

    def _prune(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ranks is None and self.single_level:
            groups = self._groups()
            k, rest = divmod(level, groups.shape[0])
            if rest == 0:
                pruned = torch.zeros_like(groups, dtype=torch.bool)
                if k:
                    lowest = groups.topk(k, dim=1, largest=False, sorted=False).indices
                    pruned.scatter_(1, lowest, True)
                return self.weight, pruned.reshape(self.weight.shape)
        if self._ranks is None:
            groups = self._groups()
            # Stable sort: ties go to the lower column, so the count is exact and repeatable.
            order = groups.argsort(dim=1, stable=True)
            positions = torch.arange(groups.shape[1], dtype=torch.int32, device=order.device)
            self._ranks = torch.empty_like(order, dtype=torch.int32).scatter_(
                1, order, positions.expand_as(order)
            )
        n_groups = self._ranks.shape[0]
        # Spread the zeros evenly; the first level % n_groups groups take one more.
        counts = level // n_groups + (
            torch.arange(n_groups, device=self._ranks.device) < level % n_groups
        )
        pruned = self._ranks < counts[:, None]
        return self.weight, pruned.reshape(self.weight.shape)


@COMPRESSORS.register("magnitude")
class Magnitude(_RankedPruner):
    """Zero the ``level`` smallest ``|W|`` of the layer; needs no calibration.

    Comparison is layer-wise (all weights of the layer compete), the classic
    magnitude baseline; it also keeps this metric distinct from Wanda's
    per-output grouping. With ``nm_group`` the comparison is per N:M group.
    Ties are broken by position, so results are deterministic.
    """

    needs_calibration = False
    per_row = False

    def _scores(self) -> torch.Tensor:
        return self.weight.abs()


class InputNormPruner(_RankedPruner):
    """A ranked pruner that reads each input channel's activation level: a running
    mean of squared calibration inputs (Wanda's statistic; the ``X`` of metrics)."""

    needs_calibration = True
    per_row = True

    def __init__(self, weight: torch.Tensor, params: PrunerParams | None = None) -> None:
        super().__init__(weight, params)
        self._mean_sq = torch.zeros(self.columns, device=self.device)

    def _accumulate(self, x: torch.Tensor) -> None:
        total = self.nsamples + x.shape[0]
        self._mean_sq.mul_(self.nsamples / total).add_(x.square().sum(0), alpha=1 / total)
        self._ranks = None

    @property
    def input_rms(self) -> torch.Tensor:
        """Each input channel's RMS over the calibration tokens (``[in]``, float32)."""
        return self._mean_sq.sqrt()


@COMPRESSORS.register("wanda")
class Wanda(InputNormPruner):
    """Wanda (Sun et al. 2023): score ``|W_ij| * ||X_j||_2``, compared per output row.

    Row ``r`` gets ``level // rows`` zeros, plus one for the first ``level % rows``
    rows, so the layer total is exact. With ``nm_group`` the comparison is per
    N:M group. Input norms come from a running mean of squared activations.
    """

    def _scores(self) -> torch.Tensor:
        # The RMS differs from the L2 norm by a constant, which cannot change a ranking.
        return self.weight.abs() * self.input_rms


class CholeskyFactor(NamedTuple):
    """What :func:`inverse_hessian_cholesky` returns, and SparseGPT caches per layer."""

    hinv: torch.Tensor
    """Upper Cholesky factor ``U`` of the dampened ``H⁻¹`` (``Uᵀ U = H⁻¹``), float32."""
    dead: torch.Tensor
    """Bool ``[in]``: inputs that were always zero (their diagonal was set to 1)."""


def inverse_hessian_cholesky(
    hessian: torch.Tensor, dampening: float, retries: int = 4
) -> CholeskyFactor:
    """Upper Cholesky factor of the dampened inverse Hessian, as in SparseGPT / GPTQ.

    Returns ``(U, dead)`` with ``U`` float32 upper-triangular (``Uᵀ U = H⁻¹``) and
    ``dead`` marking inputs that were always zero (their diagonal is set to 1 so
    they decouple from the rest). ``dampening`` is a fraction of the mean diagonal;
    if factorisation fails it is retried with dampening ×10, up to ``retries`` times.
    """
    # float64 costs little at this size and saves many near-singular layers.
    h = hessian.to(torch.float64, copy=True)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    mean_diag = h.diagonal().mean()
    damp = dampening
    for _ in range(retries + 1):
        damped = h + torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * (damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0 and torch.isfinite(upper).all():
                return CholeskyFactor(upper.to(torch.float32), dead)
        damp *= 10
    raise EvocompError(
        f"the calibration Hessian is not positive definite even with dampening {damp / 10:g}; "
        "use more calibration tokens or a larger dampening"
    )


_FactorT = TypeVar("_FactorT", bound=tuple)  # a NamedTuple of tensors


class HessianCompressor(LayerCompressor, Generic[_FactorT]):
    """Second-order compressors (SparseGPT, GPTQ): accumulate ``H = 2/n Σ xᵀx`` as
    a running mean, and drop any cached factorisation when more data arrives.
    Put it first among the bases (``class SparseGPT(HessianCompressor[...], Pruner)``);
    its parameter is the named tuple the subclass caches as its factorisation of H."""

    def __init__(self, weight: torch.Tensor, params: LayerCompressorParams | None = None) -> None:
        super().__init__(weight, params)
        self._hessian = torch.zeros(self.columns, self.columns, device=self.device)
        self._factor: _FactorT | None = None  # the subclass's cached factorisation of H

    @property
    def hessian(self) -> torch.Tensor:
        """The accumulated ``2/n Σ xᵀx`` (float32, ``[in, in]``); read-only by convention."""
        return self._hessian

    def _accumulate(self, x: torch.Tensor) -> None:
        total = self.nsamples + x.shape[0]
        self._hessian.mul_(self.nsamples / total)
        self._hessian.addmm_(x.T, x, alpha=2 / total)
        self._factor = None


class SparseGPTParams(PrunerParams):
    """Options of :class:`SparseGPT`."""

    dampening: float = Field(default=0.01, gt=0, description="fraction of mean diag(H)")
    blocksize: int = Field(default=128, ge=1, description="columns per lazy-update block")
    propagate: Literal["level", "dense"] = Field(
        default="level",
        description="a variant database's next-block calibration inputs: level = through the "
        "search's starting variants (for a uniform start, SparseGPT's own one-shot order), "
        "dense = the dense model's (EvoPress's)",
    )

    @model_validator(mode="after")
    def _blocks_hold_whole_groups(self) -> SparseGPTParams:
        if self.nm_group is not None and self.blocksize % self.nm_group:
            raise ValueError(
                f"blocksize {self.blocksize} must be a multiple of nm_group {self.nm_group}"
            )
        return self


@COMPRESSORS.register("sparsegpt")
class SparseGPT(HessianCompressor[CholeskyFactor], Pruner):
    """SparseGPT (Frantar & Alistarh 2023): blockwise OBS pruning with lazy updates.

    Hessian ``H = 2/n Σ xᵀx`` is a running mean over calibration tokens. Columns
    are processed in blocks of ``blocksize``; each block's mask is chosen
    adaptively from ``w² / [H⁻¹]_jj²`` over all rows × block columns, and the
    pruning error is propagated into not-yet-processed columns. The layer's
    ``level`` zeros are apportioned to blocks in proportion to their width
    (cumulative floor, so the total is exact). With ``nm_group = m`` the mask is
    chosen per row in each group of ``m`` columns just before that group is
    processed (``blocksize`` must be a multiple of ``m``). Dead inputs score 0, so
    they are pruned first at no cost. The Cholesky factor is cached, so many levels
    per layer cost one factorisation.
    """

    needs_calibration = True

    Params = SparseGPTParams

    params: SparseGPTParams

    @classmethod
    def needs_start(cls, params: SparseGPTParams) -> bool:
        """With ``propagate: level``: a block's layers are calibrated on what the blocks
        before it, compressed as the search starts, hand on (measured on SmolLM2 at 50%,
        held-out perplexity of the uniform start: see benchmarks/sparsegpt_uniform.py)."""
        return params.propagate == "level"

    def _prune(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._factor is None:
            hinv, dead = inverse_hessian_cholesky(self._hessian, self.params.dampening)
            self._factor = CholeskyFactor(hinv, dead)
        hinv, dead = self._factor
        # Work on Wᵀ so that each input column is a contiguous row: the per-column
        # rank-1 updates below are then ~3x faster on CPU.
        wt = self.weight.T.contiguous()
        pruned = torch.zeros_like(wt, dtype=torch.bool)
        m = self.params.nm_group
        k = self._zeros_per_group(level) if m is not None else 0
        for i1 in range(0, self.columns, self.params.blocksize):
            i2 = min(i1 + self.params.blocksize, self.columns)
            w1, mask1 = wt[i1:i2], pruned[i1:i2]  # views: updates land in wt / pruned
            h1 = hinv[i1:i2, i1:i2]
            d, dead1 = h1.diagonal(), dead[i1:i2]
            err = torch.empty_like(w1)
            if m is None:
                # Cumulative floor apportions the zeros to blocks by width, exactly.
                n_zero = level * i2 // self.columns - level * i1 // self.columns
                scores = _obs_scores(w1, d, dead1).flatten()
                mask1.view(-1)[scores.topk(n_zero, largest=False, sorted=False).indices] = True
            for i in range(i2 - i1):
                if m is not None and i % m == 0:
                    g = slice(i, i + m)
                    scores = _obs_scores(w1[g], d[g], dead1[g]).T  # [rows, m]
                    picks = scores.topk(k, dim=1, largest=False, sorted=False).indices
                    mask1[g].T.scatter_(1, picks, True)
                e = (w1[i] * mask1[i]) / d[i]
                # Column i itself is updated too; the final mask zeroes its pruned
                # entries exactly, and kept entries see e == 0.
                w1[i:].addr_(h1[i, i:], e, alpha=-1)
                err[i] = e
            wt[i2:].addmm_(hinv[i1:i2, i2:].T, err, alpha=-1)
        return wt.T, pruned.T


def _obs_scores(w: torch.Tensor, d: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """SparseGPT's saliency ``w² / d²`` for ``w`` in ``[in, out]`` layout; dead inputs
    cost nothing to prune."""
    return (w.square() / d.square()[:, None]).masked_fill(dead[:, None], 0.0)
