"""Structured width pruning of one linear layer: remove whole groups of INPUT columns
(attention heads of ``o_proj``, neurons of ``down_proj``) and refit what is kept.

The maths follows ZipLM / DarwinLM (greedy group OBS) and Týr-the-Pruner (least-squares
refit of the kept columns to the dense output). As in :mod:`.compressors`, statistics
come first (``add_batch``), then any number of ``prune`` calls; nothing here touches
modules, hooks or files, and the returned weights are new tensors in the original dtype.

Also here: which query-head counts a grouped-query-attention layout can keep
(:func:`gqa_head_levels`) and which heads those are (:func:`gqa_kept_heads`).
"""

from __future__ import annotations

import operator
from typing import Literal, NamedTuple, get_args

import torch
from pydantic import Field

from evocomp.errors import EvocompError
from evocomp.supernet.compressors import COMPRESSORS, HessianCompressor, LayerCompressorParams

__all__ = [
    "KEPT",
    "PROPAGATIONS",
    "GQALayout",
    "Propagation",
    "StructuredOBS",
    "StructuredOBSParams",
    "StructuredResult",
    "gqa_head_levels",
    "gqa_kept_heads",
    "group_columns",
]


def group_columns(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Input columns of ``groups`` (LongTensor of group indices) when group ``g`` is the
    contiguous block ``[g * group_size, (g + 1) * group_size)``; e.g. the ``o_proj``
    columns of query heads with ``group_size = head_dim``. Keeps the groups' order."""
    offsets = torch.arange(group_size, device=groups.device)
    return (groups[:, None] * group_size + offsets).reshape(-1)


class StructuredResult(NamedTuple):
    """What :meth:`StructuredOBS.prune` and :meth:`StructuredOBS.refit` return."""

    kept: torch.Tensor
    """Kept group indices, ascending (LongTensor ``[k]``)."""
    columns: torch.Tensor
    """Kept input columns, ascending (LongTensor ``[k * group_size]``): slice the
    layer's inputs (and the producing layer's outputs) with these."""
    weight: torch.Tensor
    """The new weight for the kept columns only, ``[out, k * group_size]``, original dtype."""
    removed: torch.Tensor
    """Removed group indices: in removal order from ``prune``, ascending from ``refit``."""


class _Removal(NamedTuple):
    """The cached greedy removal, one pass for every level."""

    order: torch.Tensor
    """All groups, first removed first (LongTensor ``[groups]``)."""
    losses: torch.Tensor
    """OBS score of each group when it was removed, in removal order (float32)."""


Propagation = Literal["expectation", "dense", "level"]
"""How a width database build forms the next block's calibration inputs (see
:mod:`evocomp.supernet.widths`)."""
PROPAGATIONS: tuple[str, ...] = get_args(Propagation)


class StructuredOBSParams(LayerCompressorParams):
    """Options of :class:`StructuredOBS`."""

    dampening: float = Field(default=0.01, gt=0, description="fraction of mean diag(H)")
    propagate: Propagation = Field(
        default="expectation",
        description="next block's calibration inputs: expectation = kept-share-weighted mean "
        "of the block's variants' outputs (Tyr), dense = the dense model's, level = through "
        "the search's starting variants",
    )


KEPT = "kept"
"""The database part (see :attr:`.LayerCompressor.parts`) holding a width variant's kept
head / neuron indices, beside its refit output-projection weight."""


@COMPRESSORS.register("structured-obs")
class StructuredOBS(HessianCompressor[_Removal]):
    """Remove whole groups of input columns by greedy OBS, then refit the kept ones.

    ``weight`` is ``[out, in]``; group ``g`` is the input columns
    ``[g * group_size, (g + 1) * group_size)`` (``group_size``: ``head_dim`` for an
    ``o_proj``, 1 or a chunk of neurons for a ``down_proj``). ``add_batch`` accumulates
    ``H = 2/n Σ xᵀx`` exactly like SparseGPT.

    Removal (ZipLM / DarwinLM): ``H`` is damped by ``dampening`` × its mean diagonal
    (inputs that were always zero get diagonal 1 and their weights count as zero, as in
    SparseGPT, so they go first at no cost). Then, one group at a time, the remaining
    group with the smallest ``Σ_rows W_g (Hinv_gg)⁻¹ W_gᵀ`` is removed, the other weights
    take the OBS update ``W -= W_g (Hinv_gg)⁻¹ Hinv[g, :]`` and ``Hinv`` is downdated to
    the inverse of the remaining columns' Hessian. Ties go to the lower group.

    The order is computed once (on the first ``prune``) and cached until more data
    arrives, so the levels are NESTED: the groups kept with ``k`` are a subset of those
    kept with ``k + 1``, and ``prune(k)`` for every ``k`` costs one greedy pass plus one
    ``k``-column solve each.

    The weights for a kept set are refit Týr-style, ``W_k = W H[:, k] H[k, k]⁻¹``: the
    least-squares fit of the kept columns to the DENSE layer's output. With the damped
    ``H`` used here this is, in exact arithmetic, the very weight the greedy OBS updates
    reach (the downdated ``Hinv`` is ``H[k, k]⁻¹`` by the Schur complement), but solved
    once in float64 rather than accumulated through float32 downdates, and it needs no
    stored weights per level. ``prune(k, refit=False)`` returns the greedy's own weights
    (DarwinLM's) for comparison.

    ``compress(level)`` (the :class:`LayerCompressor` contract) removes ``level`` groups
    and returns the full ``[out, in]`` weight with the removed columns zeroed, which a
    model of unchanged shape can run.
    """

    kind = "width"
    needs_calibration = True
    unit_family = "sublayer"
    parts = (KEPT,)

    @classmethod
    def needs_start(cls, params: StructuredOBSParams) -> bool:
        return params.propagate == "level"

    Params = StructuredOBSParams

    params: StructuredOBSParams

    def __init__(
        self,
        weight: torch.Tensor,
        params: StructuredOBSParams | None = None,
        *,
        group_size: int = 1,
    ) -> None:
        super().__init__(weight, params)
        if group_size < 1 or self.columns % group_size:
            raise EvocompError(
                f"group size {group_size} does not divide the {self.columns} input features"
            )
        self.group_size = group_size
        self.groups = self.columns // group_size
    @property
    def removal_order(self) -> torch.Tensor:
        """Every group, first removed first (LongTensor ``[groups]``); runs the greedy
        pass if it is not cached."""
        return self._removal().order

    @property
    def removal_losses(self) -> torch.Tensor:
        """The OBS score of each group at the step it was removed, in removal order
        (twice the predicted increase of the layer's squared output error)."""
        return self._removal().losses

    @property
    def removal_rank(self) -> torch.Tensor:
        """Per group, the step at which it is removed (LongTensor ``[groups]``): higher
        is more important. Pass it as the head scores of :func:`gqa_kept_heads`."""
        order = self.removal_order
        steps = torch.arange(self.groups, device=order.device)
        return torch.empty_like(order).scatter_(0, order, steps)

    def prune(self, keep_groups: int, *, refit: bool = True) -> StructuredResult:
        """Keep the ``keep_groups`` groups the greedy removal keeps longest.

        With ``refit`` (the default) the weight is the least-squares refit of the kept
        columns (cheap: the order is cached). ``refit=False`` returns instead the greedy
        OBS-updated weights of DarwinLM, which costs a greedy pass down to this level.
        """
        keep_groups = operator.index(keep_groups)
        if not 0 <= keep_groups <= self.groups:
            raise EvocompError(f"cannot keep {keep_groups} of {self.groups} groups")
        self._require_calibration()
        removed = self.removal_order[: self.groups - keep_groups]
        if refit:
            return self._refit(self._kept(removed), removed)
        order, weight, _ = self._greedy(stop=keep_groups)
        kept = self._kept(order)
        columns = group_columns(kept, self.group_size)
        return StructuredResult(kept, columns, weight[:, columns].to(self.dtype), order)

    def refit(self, kept: torch.Tensor) -> StructuredResult:
        """Least-squares refit of an arbitrary kept set (group indices, any order), e.g.
        a GQA-respecting choice of heads from :func:`gqa_kept_heads`."""
        kept = torch.as_tensor(kept, dtype=torch.long, device=self.device).unique()
        if kept.numel() and not 0 <= int(kept[0]) <= int(kept[-1]) < self.groups:
            raise EvocompError(f"kept groups must lie in [0, {self.groups})")
        self._require_calibration()
        alive = torch.ones(self.groups, dtype=torch.bool, device=self.device)
        alive[kept] = False
        return self._refit(kept, alive.nonzero().squeeze(1))

    def compress(self, level: int) -> torch.Tensor:
        """Remove ``level`` groups; return the full ``[out, in]`` weight, removed columns zero."""
        level = operator.index(level)
        if not 0 <= level <= self.groups:
            raise EvocompError(f"width level {level} is outside [0, {self.groups}]")
        result = self.prune(self.groups - level)
        out = torch.zeros(self.rows, self.columns, dtype=self.dtype, device=self.device)
        out[:, result.columns] = result.weight
        return out

    def _kept(self, removed: torch.Tensor) -> torch.Tensor:
        alive = torch.ones(self.groups, dtype=torch.bool, device=self.device)
        alive[removed] = False
        return alive.nonzero().squeeze(1)

    def _removal(self) -> _Removal:
        self._require_calibration()
        if self._factor is None:
            order, _, losses = self._greedy(stop=0)
            self._factor = _Removal(order, losses)
        return self._factor

    def _refit(self, kept: torch.Tensor, removed: torch.Tensor) -> StructuredResult:
        columns = group_columns(kept, self.group_size)
        if columns.numel() == 0:
            empty = self.weight.new_zeros(self.rows, 0, dtype=self.dtype)
            return StructuredResult(kept, columns, empty, removed)
        # The DAMPED H, on purpose: (1) the calibration H is singular whenever there are
        # fewer tokens than kept columns, or dead / collinear inputs, and the undamped
        # solve would then be arbitrary in the unseen directions; damping makes it a ridge
        # regression that pulls those directions back to the dense weights (so keeping
        # every group returns the dense weight exactly), which is what generalises to
        # other tokens; (2) it is the objective the greedy order was scored with, so the
        # order and the weights optimise the same thing.
        h, _ = _damped_hessian(self._hessian, self.params.dampening)
        w = self.weight.to(torch.float64)
        chol, info = torch.linalg.cholesky_ex(h[columns][:, columns])
        if info != 0:  # pragma: no cover - a damped PSD matrix is positive definite
            raise EvocompError("the damped Hessian of the kept columns is not positive definite")
        # W_k = G_k H_kk⁻¹ with G = W H; solved as H_kk W_kᵀ = (W H[:, k])ᵀ.
        weight = torch.cholesky_solve((w @ h[:, columns]).T, chol).T
        return StructuredResult(kept, columns, weight.to(self.dtype).contiguous(), removed)

    def _greedy(self, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Greedy OBS removal until ``stop`` groups remain: (removal order, OBS-updated
        float32 weight with removed columns zero, each removed group's score)."""
        c, n = self.group_size, self.groups
        h, dead = _damped_hessian(self._hessian, self.params.dampening)
        hinv = _inverse(h, torch.ones_like(dead))
        # Dead inputs never reach the output, so their weights count as zero (SparseGPT
        # does the same): their groups score 0 and go first.
        w = self.weight.masked_fill(dead, 0.0)
        alive = torch.ones(n, dtype=torch.bool, device=self.device)
        order: list[int] = []
        losses: list[float] = []
        for _ in range(n - stop):
            idx = alive.nonzero().squeeze(1)
            chol, info = torch.linalg.cholesky_ex(_diagonal_blocks(hinv, idx, c))
            if info.any():
                # float32 downdates drifted on an ill-conditioned layer: start again from
                # the exact inverse of the remaining columns' Hessian.
                hinv = _inverse(h, alive.repeat_interleave(c))
                chol = torch.linalg.cholesky(_diagonal_blocks(hinv, idx, c))
            # Σ_rows W_g A⁻¹ W_gᵀ = ||L⁻¹ W_gᵀ||² with A = L Lᵀ.
            wg = w.view(self.rows, n, c)[:, idx].permute(1, 2, 0)
            scores = torch.linalg.solve_triangular(chol, wg, upper=False).square().sum((1, 2))
            pick = int(scores.argmin())
            g = int(idx[pick])
            cols = slice(g * c, (g + 1) * c)
            # OBS: W -= W_C A⁻¹ Hinv[C, :] and Hinv -= Hinv[:, C] A⁻¹ Hinv[C, :]; both
            # leave the group's own columns (and Hinv's rows) at zero up to rounding.
            row = torch.cholesky_solve(hinv[cols], chol[pick])
            w.addmm_(w[:, cols].clone(), row, alpha=-1)
            hinv.addmm_(hinv[:, cols].clone(), row, alpha=-1)
            w[:, cols] = 0.0
            hinv[:, cols] = 0.0
            hinv[cols] = 0.0
            alive[g] = False
            order.append(g)
            losses.append(float(scores[pick]))
        return (
            torch.tensor(order, dtype=torch.long, device=self.device),
            w,
            torch.tensor(losses, dtype=torch.float32, device=self.device),
        )


def _damped_hessian(hessian: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H + dampening · mean diag(H) · I, dead)`` in float64, dead inputs' diagonal set
    to 1 first, as in :func:`.compressors.inverse_hessian_cholesky`. That function is not
    reused because its retries raise the dampening silently, while the refit needs the
    very H the greedy used; in float64, a damped PSD matrix factorises without retries."""
    h = hessian.to(torch.float64, copy=True)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(dampening * h.diagonal().mean())
    return h, dead


def _diagonal_blocks(hinv: torch.Tensor, groups: torch.Tensor, c: int) -> torch.Tensor:
    """The ``c × c`` diagonal blocks of ``hinv`` for ``groups``: ``[len(groups), c, c]``."""
    n = hinv.shape[0] // c
    return hinv.view(n, c, n, c).diagonal(dim1=0, dim2=2).permute(2, 0, 1)[groups]


def _inverse(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """float32 ``[in, in]``: ``H[keep, keep]⁻¹`` at the kept rows and columns, zero elsewhere."""
    cols = keep.nonzero().squeeze(1)
    out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    sub = torch.cholesky_inverse(torch.linalg.cholesky(h[cols][:, cols]))
    out[cols[:, None], cols] = sub.to(torch.float32)
    return out


GQALayout = Literal["per_group", "whole_groups"]
"""How kept query heads may sit in a grouped-query-attention layer: ``per_group`` keeps
the same number of query heads in every KV group (K/V untouched); ``whole_groups``
keeps or drops whole KV groups (their K/V heads go with them)."""


def _heads_per_group(n_heads: int, n_kv: int) -> int:
    if n_kv < 1 or n_heads < 1 or n_heads % n_kv:
        raise EvocompError(f"{n_heads} query heads do not split into {n_kv} KV groups")
    return n_heads // n_kv


def gqa_head_levels(n_heads: int, n_kv: int, layout: GQALayout = "per_group") -> list[int]:
    """The kept query-head counts ``layout`` allows, ascending, 0 and ``n_heads`` included.

    ``per_group``: multiples of ``n_kv``; ``whole_groups``: multiples of
    ``n_heads / n_kv``. SmolLM2-135M (9 heads, 3 KV groups): ``[0, 3, 6, 9]`` either way;
    32 heads / 8 KV: ``[0, 8, 16, 24, 32]`` per group, ``[0, 4, ..., 32]`` whole groups.
    """
    per = _heads_per_group(n_heads, n_kv)
    return list(range(0, n_heads + 1, n_kv if layout == "per_group" else per))


def gqa_kept_heads(
    scores: torch.Tensor, n_kv: int, keep: int, layout: GQALayout = "per_group"
) -> torch.Tensor:
    """The ``keep`` query heads to keep, ascending (LongTensor), given a score per head
    (higher = more important, e.g. :attr:`StructuredOBS.removal_rank`).

    Query head ``h`` reads KV head ``h // (n_heads / n_kv)`` (Hugging Face's layout).
    ``per_group`` keeps the top ``keep / n_kv`` heads of every KV group; ``whole_groups``
    keeps the ``keep / (n_heads / n_kv)`` KV groups with the highest total score. Ties
    go to the lower index. Map heads to ``o_proj`` columns with
    ``group_columns(heads, head_dim)``.
    """
    n_heads = scores.numel()
    per = _heads_per_group(n_heads, n_kv)
    keep = operator.index(keep)
    levels = gqa_head_levels(n_heads, n_kv, layout)
    if keep not in levels:
        raise EvocompError(
            f"cannot keep {keep} of {n_heads} query heads in {n_kv} KV groups ({layout}); "
            f"valid counts: {', '.join(map(str, levels))}"
        )
    grouped = scores.detach().reshape(n_kv, per).to(torch.float64)
    if layout == "per_group":
        top = grouped.argsort(dim=1, descending=True, stable=True)[:, : keep // n_kv]
        heads = top + torch.arange(n_kv, device=top.device)[:, None] * per
    else:
        top = grouped.sum(1).argsort(descending=True, stable=True)[: keep // per]
        heads = group_columns(top, per)
    return heads.reshape(-1).sort().values
