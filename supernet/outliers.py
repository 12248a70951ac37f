"""OWL's Layerwise Outlier Distribution (Yin et al., 2024): how many of the Wanda
scores ``|W_ij|·‖X_j‖₂`` of a group of linear layers are outliers, measured on the
dense model. Blocks with many outliers hold more of what matters and are pruned
less (:class:`~evocomp.search.allocation.OWL`)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from evocomp.errors import EvocompError
from evocomp.spaces.units import Unit
from evocomp.supernet.database import unit_weight
from evocomp.supernet.units import find_linear_units


def covered_linears(span: Sequence[Unit], linears: Sequence[Unit]) -> list[Unit]:
    """The linear layers (of ``linears``) that the units of ``span`` cover: a linear
    unit itself, every linear inside a sublayer unit."""
    names = [u.name for u in span]
    return [
        lin for lin in linears if any(lin.name == n or lin.name.startswith(n + ".") for n in names)
    ]


def outlier_ratios(
    model: nn.Module,
    tokens: torch.Tensor,
    spans: Sequence[Sequence[Unit]],
    *,
    factor: float = 5.0,
    mean: Literal["span", "unit"] = "span",
    batch_size: int = 4,
) -> list[float]:
    """For each span of units, the share of the Wanda scores ``|W_ij|·‖X_j‖₂`` of
    every linear weight it covers that exceed ``factor`` times the mean score: the
    mean over all of the span's weights (``mean="span"``, as OWL's code compares a
    whole block), or over each weight's own layer (``"unit"``). Input norms are
    over every token of ``tokens`` (``[sequences, length]``) run through the dense
    model, so every layer sees dense inputs. In ``[0, 1]``.
    """
    linears = find_linear_units(model)
    parts = [covered_linears(span, linears) for span in spans]
    for span, covered in zip(spans, parts, strict=True):
        if not covered:
            raise EvocompError(f"no linear layer in {', '.join(u.name for u in span)}")
    needed = {u.name: u for covered in parts for u in covered}
    # Only per-column sums of squared inputs are kept (not a compressor per layer,
    # which would hold a float32 copy of every weight at once).
    sums: dict[str, torch.Tensor] = {}

    def accumulate(name: str, _m: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        sq = x.reshape(-1, x.shape[-1]).float().square().sum(0)
        sums[name] = sums[name] + sq if name in sums else sq

    handles = [
        model.get_submodule(n).register_forward_pre_hook(partial(accumulate, n)) for n in needed
    ]
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            for i in range(0, tokens.shape[0], batch_size):
                model(tokens[i : i + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not sums:
        raise EvocompError("outlier ratios need at least one calibration sequence")
    out = []
    for covered in parts:
        # Scale does not matter (outliers are relative to a mean), so sqrt of the sum
        # of squares stands for the L2 norm over tokens.
        scores = [unit_weight(model, u).abs().float() * sums[u.name].sqrt() for u in covered]
        if mean == "span":
            total = sum(s.sum().item() for s in scores) / sum(s.numel() for s in scores)
            counts = [(s > factor * total).sum().item() for s in scores]
        else:
            counts = [(s > factor * s.mean()).sum().item() for s in scores]
        out.append(sum(counts) / sum(s.numel() for s in scores))
    return out
