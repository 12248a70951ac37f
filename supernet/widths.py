"""Width variants of whole sublayers: build them block by block (structured OBS on each
sublayer's output projection, with Týr's propagation of calibration inputs), and
apply a stored one.

A width variant of an attention keeps some query heads, of an MLP some intermediate
neurons. It is stored as two tensors (see :mod:`.database`): the refit weight of the
output projection's kept columns (``o_proj`` / ``down_proj``, ``[hidden, kept]``) and
the kept head or neuron indices (part ``kept``); the rows of ``q/k/v`` and
``gate/up`` that go with them are slices of the dense weights, taken when applied.

Variant keys: an MLP's is the number of neurons kept; an attention's is
``(query heads, KV heads)`` kept, which names the GQA layout too (every KV head kept:
the same number of query heads in each group; fewer: whole groups go).

Propagation (``StructuredOBSParams.propagate``) decides what the NEXT sublayer's
calibration inputs are, one sublayer at a time (attention, then MLP, per block):

* ``dense``: the dense model's (every layer is pruned as if the rest were dense);
* ``level``: the model with the sublayers pruned so far at the search's starting
  variant (sequential pruning, as SparseGPT propagates);
* ``expectation`` (Týr-the-Pruner's expectation error accumulation): the mean of the
  sublayer's outputs over its variants and the dense sublayer, each weighted by its
  kept share of heads or neurons, ``X = Σ_e (1 − S_e) X_e / Σ_e (1 − S_e)``.

Each layer's statistics, removal order and refit come from the inputs so formed: the
refit fits the layer's own dense output on those inputs (Týr's ``G = H Wᵀ``). Fitting
the dense MODEL's output instead (inputs from the dense model as targets) was tried
and measured worse on SmolLM2: it overfits the calibration text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from evocomp.errors import EvocompError
from evocomp.spaces.units import SUBLAYER_KINDS, Unit, VariantKey, variant_key
from evocomp.supernet.shrink import narrowed, output_projection, output_weight
from evocomp.supernet.structured import StructuredOBS, StructuredOBSParams, gqa_kept_heads
from evocomp.supernet.sublayers import first_output, skip
from evocomp.supernet.units import sublayer_module

__all__ = [
    "Batch",
    "WidthVariant",
    "applied",
    "block_sublayers",
    "build_width_block",
    "propagates",
    "width_variant",
]


class Batch(NamedTuple):
    """One calibration batch at a block boundary."""

    hidden: torch.Tensor
    """What the model (pruned so far, as the propagation says) feeds the block here."""
    kwargs: dict[str, Any]
    """The block's other arguments (masks, rotary embeddings)."""


class WidthVariant(NamedTuple):
    """A stored width variant: kept heads / neurons and the output projection's weight."""

    kept: torch.Tensor
    weight: torch.Tensor


def width_variant(comp: StructuredOBS, unit: Unit, key: VariantKey) -> WidthVariant:
    """The variant ``key`` of ``unit`` from its calibrated output-projection compressor."""
    if unit.kind == "attn":
        if not isinstance(key, tuple) or len(key) != 2:
            raise EvocompError(f"an attention width key is (heads, kv_heads), got {key!r}")
        heads, kv = key
        layout = "per_group" if kv == unit.kv_groups else "whole_groups"
        kept = gqa_kept_heads(comp.removal_rank, unit.kv_groups, heads, layout)
        result = comp.refit(kept)
    else:
        if not isinstance(key, int):
            raise EvocompError(f"an MLP width key is a neuron count, got {key!r}")
        result = comp.prune(key)
    return WidthVariant(result.kept.to(torch.int64).cpu(), result.weight.contiguous().cpu())


@contextmanager
def applied(
    model: nn.Module, unit: Unit, variant: WidthVariant | None
) -> Iterator[None]:
    """``unit`` at ``variant`` (None: dense); keeping nothing skips the sublayer."""
    if variant is None:
        yield
    elif variant.kept.numel() == 0:
        with skip(model, [unit]):
            yield
    else:
        module = model.get_submodule(unit.name)
        with narrowed(module, unit.kind, variant.kept, variant.weight):
            yield


def block_sublayers(path: str, b: int, block: nn.Module) -> dict[str, Unit]:
    """Units for the attention and MLP of ``block`` (block ``b`` at ``path``), by kind,
    for :func:`~evocomp.supernet.sublayers.skip` (their sizes are not filled in)."""
    units = {}
    for kind in SUBLAYER_KINDS:
        found = sublayer_module(block, kind)
        if found is None:
            raise EvocompError(f"block {path}.{b} has no {kind} sublayer module")
        units[kind] = Unit(f"{path}.{b}.{found[0]}", kind, b, (0, 1))
    return units


def propagates(params: StructuredOBSParams) -> bool:
    """Whether the next blocks' inputs depend on this block's variants (so a resumed
    build recomputes the variants of finished blocks, without writing them)."""
    return params.propagate != "dense"


def build_width_block(
    model: nn.Module,
    path: str,
    b: int,
    block: nn.Module,
    units: Sequence[Unit],
    batches: list[Batch],
    params: StructuredOBSParams,
    variants: dict[str, list[VariantKey]],
    through: dict[str, VariantKey] | None = None,
) -> tuple[dict[str, dict[VariantKey, WidthVariant]], list[Batch]]:
    """Every width variant of ``units`` (the searched sublayers of block ``b``, at
    ``path.b``), from ``batches`` (its calibration inputs), and the next block's
    batches, formed as ``params.propagate`` says (``through``: the start variants,
    for ``level``). Sublayers not in ``units`` stay dense and are propagated as such.
    """
    searched = {u.kind: u for u in units}
    sublayers = block_sublayers(path, b, block)
    out: dict[str, dict[VariantKey, WidthVariant]] = {}
    for kind in SUBLAYER_KINDS:
        other = sublayers["mlp" if kind == "attn" else "attn"]
        unit = searched.get(kind)
        # The block's forward with the other sublayer skipped is this sublayer's
        # residual update, h + sublayer(norm(h)), for pre-norm blocks.
        with skip(model, [other]):
            if unit is None:
                batches = [_forward(block, x) for x in batches]
                continue
            built, batches = _sublayer(model, block, unit, batches, params, variants, through)
            out[unit.name] = built
    return out, batches


def _forward(block: nn.Module, x: Batch) -> Batch:
    return Batch(first_output(block(x.hidden, **x.kwargs)), x.kwargs)


def _sublayer(
    model: nn.Module,
    block: nn.Module,
    unit: Unit,
    batches: list[Batch],
    params: StructuredOBSParams,
    variants: dict[str, list[VariantKey]],
    through: dict[str, VariantKey] | None,
) -> tuple[dict[VariantKey, WidthVariant], list[Batch]]:
    module = model.get_submodule(unit.name)
    proj = output_projection(module, unit.kind)
    group = int(module.head_dim) if unit.kind == "attn" else 1
    comp = StructuredOBS(output_weight(module, unit.kind), params, group_size=group)
    seen: list[torch.Tensor] = []
    handle = proj.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    outputs: list[torch.Tensor] = []
    try:
        for x in batches:
            outputs.append(first_output(block(x.hidden, **x.kwargs)))
            comp.add_batch(seen.pop())
    finally:
        handle.remove()
    built = {
        variant_key(k): width_variant(comp, unit, variant_key(k)) for k in variants[unit.name]
    }
    del comp
    if params.propagate == "level":
        start = (through or {}).get(unit.name)
        with applied(model, unit, None if start is None else built[variant_key(start)]):
            outputs = [first_output(block(x.hidden, **x.kwargs)) for x in batches]
    elif params.propagate == "expectation":
        outputs = _expectation(model, block, unit, batches, built, dense=outputs)
    return built, [Batch(h, x.kwargs) for h, x in zip(outputs, batches, strict=True)]


EXPECTATION_POINTS = 9
"""Variants Týr's expectation averages over at most (its 9-level grid)."""


def _expectation(
    model: nn.Module,
    block: nn.Module,
    unit: Unit,
    batches: list[Batch],
    built: dict[VariantKey, WidthVariant],
    dense: list[torch.Tensor],
) -> list[torch.Tensor]:
    """Týr's expectation: the kept-share-weighted mean output over the variants and
    ``dense``, the outputs with the sublayer dense. Over at most
    :data:`EXPECTATION_POINTS` variants spread evenly by width: a fine grid (coarse-to-
    fine's) would otherwise cost a block forward per level for nearly the same mean."""
    ordered = list(built.values())
    if len(ordered) > EXPECTATION_POINTS:
        ordered.sort(key=lambda v: v.kept.numel())
        last, n = len(ordered) - 1, EXPECTATION_POINTS
        ordered = [ordered[i] for i in sorted({round(k * last / (n - 1)) for k in range(n)})]
    options = [(v.kept.numel() / unit.groups, v) for v in ordered]
    total = 1.0 + sum(w for w, _ in options)
    acc = [d / total for d in dense]
    for weight, variant in options:
        if weight == 0:
            continue
        with applied(model, unit, variant):
            for a, x in zip(acc, batches, strict=True):
                a.add_(first_output(block(x.hidden, **x.kwargs)), alpha=weight / total)
    return acc
