"""Per-weight gradient norms over calibration data: the gradient term of GBLM-Pruner
and the ``G`` terminal of Pruner-Zero's metric expressions.

For each linear unit, ``G = sqrt(sum_s (scale * dL_s/dW)**2)`` where ``s`` runs over
the calibration sequences one at a time and ``L_s`` is the mean next-token
cross-entropy of sequence ``s``. Per-sequence gradients matter: the norm of
per-sample gradients is not the norm of the batch gradient (opposite signs across
sequences cancel in the latter, not in the former).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from evocomp.errors import EvocompError
from evocomp.spaces.units import Unit

log = logging.getLogger("evocomp")

DEFAULT_SCALE = 100.0
"""GBLM-Pruner and Pruner-Zero multiply gradients by 100 (against fp16 underflow);
keeping their factor keeps G comparable with theirs."""


def _check_linear(units: Sequence[Unit]) -> None:
    for unit in units:
        if unit.family != "linear":
            raise ValueError(
                f"gradient norms are defined for linear units only; {unit.name} is a "
                f"{unit.kind} sublayer"
            )


def _unit_weights(model: nn.Module, units: Sequence[Unit]) -> dict[str, nn.Parameter]:
    """Each linear unit's weight parameter, by unit name (duplicates once)."""
    _check_linear(units)
    weights: dict[str, nn.Parameter] = {}
    for unit in units:
        if unit.name in weights:
            continue
        try:
            weight = model.get_submodule(unit.name).weight
        except AttributeError as e:
            raise EvocompError(f"the model has no weight at {unit.name}: {e}") from e
        if not isinstance(weight, nn.Parameter):
            raise EvocompError(f"{unit.name}.weight is not a parameter of the model")
        layout = tuple(weight.shape[::-1]) if unit.transposed else tuple(weight.shape)
        if layout != tuple(unit.shape):
            raise EvocompError(
                f"{unit.name} has shape {tuple(weight.shape)} in the model but the unit "
                f"says {unit.shape} (transposed={unit.transposed}): units of another model?"
            )
        if weight.is_inference():
            # Inference tensors can never require grad, whatever mode we switch to.
            raise EvocompError(
                f"{unit.name}.weight was created under torch.inference_mode() and cannot "
                "take gradients; load the model outside inference mode"
            )
        weights[unit.name] = weight
    return weights


def _check_calibration(calibration: torch.Tensor) -> None:
    if calibration.ndim != 2 or calibration.is_floating_point() or calibration.is_complex():
        raise ValueError(
            "calibration must be a [n_sequences, seq_len] tensor of token ids, got "
            f"{calibration.dtype} of shape {tuple(calibration.shape)}"
        )
    if calibration.shape[0] < 1 or calibration.shape[1] < 2:
        raise ValueError(
            "calibration needs at least one sequence of at least 2 tokens (a next-token "
            f"loss needs a target), got shape {tuple(calibration.shape)}"
        )


def gradient_norms(
    model: nn.Module,
    units: Sequence[Unit],
    calibration: torch.Tensor,
    *,
    scale: float = DEFAULT_SCALE,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-weight L2 norms over ``calibration`` of the scaled LM-loss gradients.

    ``model`` is a Hugging Face style causal LM (``model(input_ids=..., labels=...)``
    returns ``.loss``, the mean next-token cross-entropy); ``units`` are linear
    units of it; ``calibration`` is a ``[n_sequences, seq_len]`` LongTensor of token
    ids. Each sequence is a batch of its own (per-sample gradients, as GBLM-Pruner
    computes them), and for each unit

        ``G = sqrt(sum over sequences of (scale * dL_s/dW)**2)``

    squared sums accumulated in float32 whatever the model's dtype. Returns
    ``{unit.name: G}``, float32 CPU tensors in ``[out_features, in_features]``
    layout (GPT-2 Conv1D gradients transposed).

    Runs the model in eval mode (no dropout) with gradients enabled, even if the
    caller is inside ``torch.no_grad()`` or ``torch.inference_mode()``; only the
    units' weights take gradients. The model is left as it was: weights,
    ``requires_grad`` flags, any ``.grad`` (none is written) and train/eval mode.

    Raises ValueError for a non-linear unit or malformed calibration, and
    :class:`~evocomp.errors.EvocompError` for units that do not fit the model.
    """
    weights = _unit_weights(model, units)
    _check_calibration(calibration)
    if not weights:
        return {}
    transposed = {u.name: u.transposed for u in units}
    names = list(weights)
    params = [weights[n] for n in names]
    device = next(model.parameters()).device

    # Flags are remembered per parameter object (not by name) so that tied or shared
    # parameters come back exactly once, as they were.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        # inference_mode(False) first: enable_grad alone does not leave inference mode.
        with torch.inference_mode(False), torch.enable_grad():
            for p, _ in flags:
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            model.eval()
            # Made here, not under a caller's inference mode, where they could not be
            # updated in place.
            sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
            for i in tqdm(
                range(calibration.shape[0]), disable=not progress, desc="gradients", unit="seq"
            ):
                # A copy, so that ids made under inference mode are ordinary tensors.
                seq = calibration[i : i + 1].to(device, copy=True)
                loss = model(input_ids=seq, labels=seq, use_cache=False).loss
                # autograd.grad rather than backward: nothing is accumulated into .grad.
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for acc, grad in zip(sums, grads, strict=True):
                    if grad is not None:  # a unit the forward pass skipped has zero gradient
                        acc.add_((grad.float() * scale).square())
                del loss, grads
            # Still outside inference mode, so callers get ordinary tensors back.
            out: dict[str, torch.Tensor] = {}
            for name, acc in zip(names, sums, strict=True):
                g = acc.sqrt_()
                out[name] = (g.t() if transposed[name] else g).contiguous().cpu()
            del sums
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return out


def _load(path: Path, units: Sequence[Unit]) -> dict[str, torch.Tensor] | None:
    """The stored norms of ``units`` if ``path`` holds every one of them, well formed;
    None (after a warning for an unreadable file) otherwise."""
    if not path.is_file():
        return None
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = set(f.keys())
            for unit in units:
                if unit.name not in stored:
                    log.info("%s lacks %s; recomputing gradient norms", path, unit.name)
                    return None
                t = f.get_tensor(unit.name)
                # A norm is finite and non-negative: cheap evidence of damaged data.
                if (
                    tuple(t.shape) != tuple(unit.shape)
                    or t.dtype != torch.float32
                    or not bool(torch.isfinite(t).all())
                    or bool((t < 0).any())
                ):
                    log.warning(
                        "%s holds a malformed tensor for %s (%s %s); recomputing",
                        path, unit.name, t.dtype, tuple(t.shape),
                    )
                    return None
                out[unit.name] = t
    except Exception as e:  # any unreadable cache is recomputed, never fatal
        log.warning("cannot read gradient norms from %s (%s); recomputing", path, e)
        return None
    return out


def cached_gradient_norms(
    model: nn.Module,
    units: Sequence[Unit],
    calibration: torch.Tensor,
    root: Path,
    key: str,
    *,
    scale: float = DEFAULT_SCALE,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """:func:`gradient_norms`, stored at ``root / f"gradients-{key}.safetensors"``.

    ``key`` must identify everything the norms depend on; the caller builds it from
    the model's fingerprint, the calibration tokens' fingerprint and ``scale``
    (this function cannot check that a stored file matches the model). A file
    holding every unit's tensor with the unit's shape is loaded without running the
    model; a missing, incomplete or unreadable one is computed afresh and written
    atomically (a ``.tmp`` sibling, then ``os.replace``), tensors named by unit name.
    A damaged file is logged as a warning and overwritten, never an error.
    """
    _check_linear(units)
    if not key or "/" in key or os.sep in key:
        raise ValueError(f"key must be a plain file-name part, got {key!r}")
    root = Path(root)
    path = root / f"gradients-{key}.safetensors"
    loaded = _load(path, units)
    if loaded is not None:
        return loaded
    norms = gradient_norms(model, units, calibration, scale=scale, progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    # The pid keeps two processes computing the same key from writing one temp file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        save_file({n: t.contiguous() for n, t in norms.items()}, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return norms
