"""Sublayers for depth search: find a model's attention and MLP sublayers, skip them
without copying weights, and score how much each one changes the residual stream.

A decoder block adds two sublayers to the residual stream: ``h -> h + attn(norm(h))``
and then ``h -> h + mlp(norm(h))``. Removing a sublayer means its contribution
becomes zero, which is what :func:`skip` does by replacing the module's ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from evocomp.errors import EvocompError
from evocomp.spaces.units import Unit
from evocomp.supernet.units import find_blocks, find_sublayer_units, sublayer_module

# -- skipping ------------------------------------------------------------------------

# How each sublayer class returns its output, learnt once per class by running the
# real forward on its first skipped call: ``None`` for a plain tensor, ``n`` for a
# tuple of ``n`` items whose first is the output (Llama / GPT-2 attention return
# ``(attn_output, attn_weights)``). Output structure is a property of the code, not of
# the weights, so one probe per class and process is enough, and every later call
# skips the compute entirely.
_STRUCTURE: dict[type[nn.Module], int | None] = {}


def _hidden_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise EvocompError("cannot find the hidden-states input of a skipped sublayer")


def _structure(
    module: nn.Module, original: Callable[..., Any], args: Any, kwargs: Any
) -> int | None:
    cls = type(module)
    if cls not in _STRUCTURE:
        with torch.no_grad():
            out = original(*args, **kwargs)
        hidden = _hidden_input(args, kwargs)
        first = out[0] if isinstance(out, tuple) and out else out
        if not isinstance(first, torch.Tensor) or first.shape != hidden.shape:
            raise EvocompError(
                f"cannot skip {cls.__name__}: its forward returns {type(out).__name__}, "
                "not a tensor (or tuple starting with one) shaped like its input"
            )
        _STRUCTURE[cls] = len(out) if isinstance(out, tuple) else None
    return _STRUCTURE[cls]


def _zero_forward(module: nn.Module, original: Callable[..., Any]) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        n = _structure(module, original, args, kwargs)
        zeros = torch.zeros_like(_hidden_input(args, kwargs))
        # Extra tuple items (attention weights) are None, as when they are not requested.
        return zeros if n is None else (zeros,) + (None,) * (n - 1)

    return forward


@contextmanager
def skip(model: nn.Module, units: Sequence[Unit]) -> Iterator[nn.Module]:
    """While active, each sublayer in ``units`` adds nothing to the residual stream
    and its compute is skipped: the module's instance ``forward`` returns zeros
    shaped like its input, in the structure the module normally returns. No weight
    is copied or changed, and on exit (also after an exception) each module's
    instance ``__dict__`` is put back exactly, so the model is bit-identical.

    Meant for scoring full sequences (what the evaluators do): a skipped attention
    writes nothing into a KV cache, so generation with a cache is not supported
    while skipping (export removes the modules instead).
    """
    with ExitStack() as stack:
        for unit in units:
            module = model.get_submodule(unit.name)
            stack.enter_context(instance_forward(module, partial(_zero_forward, module)))
        yield model


@contextmanager
def instance_forward(
    module: nn.Module, make: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Iterator[None]:
    """While active, ``module.forward`` is ``make(current forward)`` on the instance;
    on exit (also after an exception) the instance ``__dict__`` is put back exactly.
    A forward may already live on the instance (accelerate's hooks put one there):
    it is what ``make`` receives, and what is restored."""
    missing = object()
    previous = module.__dict__.get("forward", missing)
    module.forward = make(module.forward)
    try:
        yield
    finally:
        if previous is missing:
            del module.forward
        else:
            module.forward = previous


@contextmanager
def zeroed(model: nn.Module, units: Sequence[Unit]) -> Iterator[nn.Module]:
    """While active, every parameter of each sublayer in ``units`` points at zeros,
    so the sublayer outputs exactly zero (all weights and biases zero: MLPs give
    ``act(0) * 0``, attention averages zero values) and ``save_pretrained`` writes a
    model in which plain ``from_pretrained`` has those sublayers removed in effect.
    For export; to score candidates use :func:`skip`, which also skips the compute.
    The original tensors are pointed back at on exit, bit for bit."""
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        for unit in units:
            for param in model.get_submodule(unit.name).parameters():
                saved.append((param, param.data))
                param.data = torch.zeros_like(param.data)
        yield model
    finally:
        for param, data in reversed(saved):
            param.data = data


# -- importance ----------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class _ResidualRecorder:
    """Rebuilds the residual stream of every sublayer boundary from forward hooks and
    sums ``cos(before span, after span)`` over tokens, per span.

    Boundary ``t`` is the residual before sublayer ``t`` (the attention of block ``b``
    is sublayer ``2b``, its MLP ``2b + 1``; ``t = 2·blocks`` is after the last). The
    residual where a span starts is kept until every span starting there has ended,
    and is freed then. Residuals are rebuilt in float64, so that a small contribution
    does not vanish in ``h + out`` (bf16 models).
    """

    def __init__(self, bounds: Sequence[tuple[int, int]]) -> None:
        self.bounds = list(bounds)
        self.ending: dict[int, list[int]] = {}  # boundary -> spans ending there
        for k, (_, end) in enumerate(self.bounds):
            self.ending.setdefault(end, []).append(k)
        self.starts = {s for s, _ in self.bounds}
        self.sums = [0.0] * len(self.bounds)
        self.tokens = 0
        self._kept: dict[int, torch.Tensor] = {}  # boundary -> residual there
        self._pending: dict[int, int] = {}  # boundary -> spans from it not yet ended
        self._block_input: dict[int, torch.Tensor] = {}  # block -> its input residual
        self._mid: dict[int, torch.Tensor] = {}  # block -> residual after its attention

    def start_batch(self) -> None:
        """Forget the previous batch's residuals; every span is pending again."""
        self._pending.update({s: sum(1 for b0, _ in self.bounds if b0 == s) for s in self.starts})
        self._kept.clear()

    def end_batch(self, tokens: int) -> None:
        """A batch of ``tokens`` tokens went through the model."""
        self.tokens += tokens

    def reach(self, t: int, state: torch.Tensor, *, end: bool, start: bool) -> None:
        """The residual at boundary ``t`` is ``state``: close the spans ending here
        (if ``end``) and keep it for the spans starting here (if ``start``)."""
        if end:
            for k in self.ending.get(t, []):
                s = self.bounds[k][0]
                cos = F.cosine_similarity(self._kept[s], state, dim=-1)
                self.sums[k] += cos.sum().item()
                self._pending[s] -= 1
                if self._pending[s] == 0:
                    del self._kept[s]  # free activations as soon as no span needs them
        if start and t in self.starts:
            self._kept[t] = state.detach()

    def block_input(self, b: int, _m: nn.Module, args: Any, kwargs: Any) -> None:
        """Forward pre-hook of block ``b``: the residual before its attention."""
        x = _hidden_input(args, kwargs).double()
        self._block_input[b] = x
        self.reach(2 * b, x, end=False, start=True)  # ends here are reached by the previous mlp

    def attn_output(self, b: int, _m: nn.Module, _a: Any, out: Any) -> None:
        """Forward hook of block ``b``'s attention: the residual before its MLP."""
        self._mid[b] = self._block_input.pop(b) + first_output(out).double()
        self.reach(2 * b + 1, self._mid[b], end=True, start=True)

    def mlp_output(self, b: int, _m: nn.Module, _a: Any, out: Any) -> None:
        """Forward hook of block ``b``'s MLP: the residual after the block."""
        self.reach(2 * b + 2, self._mid.pop(b) + first_output(out).double(), end=True, start=False)

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        """Register the hooks on every block of ``model``; the caller removes them."""
        # Every block has both sublayers (find_sublayer_units checks); all are looked
        # up before the first hook goes on, so a failure leaves no hook behind.
        blocks = [
            (block, _sublayer(block, "attn"), _sublayer(block, "mlp"))
            for block in find_blocks(model)[1]
        ]
        handles = []
        for b, (block, attn, mlp) in enumerate(blocks):
            handles += [
                block.register_forward_pre_hook(partial(self.block_input, b), with_kwargs=True),
                attn.register_forward_hook(partial(self.attn_output, b)),
                mlp.register_forward_hook(partial(self.mlp_output, b)),
            ]
        return handles


def first_output(out: Any) -> torch.Tensor:
    """A module's main output: the first item of a tuple, or the tensor itself."""
    return out[0] if isinstance(out, tuple) else out


def _sublayer(block: nn.Module, kind: str) -> nn.Module:
    found = sublayer_module(block, kind)
    if found is None:
        raise EvocompError(f"block {type(block).__name__} has no {kind} sublayer module")
    return found[1]


def span_importance(
    model: nn.Module, tokens: torch.Tensor, spans: Sequence[Sequence[Unit]], batch_size: int = 4
) -> list[float]:
    """For each span of sublayers (consecutive in execution order, e.g. one block),
    ``1 - mean cosine similarity`` between the residual stream before its first and
    after its last sublayer, over every token of ``tokens`` (``[sequences, length]``).

    For a one-sublayer span this is ShortGPT's Block Influence for that sublayer,
    ``1 - cos(h, h + out)``; for a whole block it is ShortGPT's Block Influence.
    Values lie in ``[0, 2]``; larger means the span changes the stream more.

    The residual after each sublayer is rebuilt from hooks as ``h + out`` (block
    input plus the sublayer outputs), which is exact for pre-norm blocks (Llama
    family, GPT-2); for blocks that normalise the output again before adding it
    (Gemma 2's post-norms) the contribution is taken before that norm.
    """
    all_units = find_sublayer_units(model)
    pos = {u.name: i for i, u in enumerate(all_units)}
    bounds: list[tuple[int, int]] = []
    for span in spans:
        if not span:
            raise ValueError("an importance span needs at least one sublayer")
        idx = sorted(pos[u.name] for u in span)
        bounds.append((idx[0], idx[-1] + 1))
    recorder = _ResidualRecorder(bounds)
    handles = recorder.attach(model)
    try:
        device = _device(model)
        with torch.no_grad():
            for i in range(0, tokens.shape[0], batch_size):
                batch = tokens[i : i + batch_size].to(device)
                recorder.start_batch()
                model(batch, use_cache=False)
                recorder.end_batch(batch.numel())
    finally:
        for h in handles:
            h.remove()
    if recorder.tokens == 0:
        raise EvocompError("importance needs at least one calibration sequence")
    return [1.0 - s / recorder.tokens for s in recorder.sums]


def sublayer_importance(
    model: nn.Module, tokens: torch.Tensor, units: Sequence[Unit], batch_size: int = 4
) -> dict[str, float]:
    """ShortGPT-style importance of each sublayer: ``1 - mean cos(h, h + out)``
    between the residual stream before and after it, over every calibration token.
    In ``[0, 2]``; sublayers that barely change the stream score near 0."""
    scores = span_importance(model, tokens, [(u,) for u in units], batch_size)
    return {u.name: s for u, s in zip(units, scores, strict=True)}


@contextmanager
def without_blocks(model: nn.Module, blocks: set[int]) -> Iterator[nn.Module]:
    """Physically drop whole decoder blocks (for export): the block list, the
    config's layer count and per-layer lists, and the attention modules' cache
    indices are rewritten so ``save_pretrained`` writes a smaller model that
    plain transformers loads; all of it is restored on exit."""
    path, layers = find_blocks(model)
    if not blocks:
        yield model
        return
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    kept = [layer for i, layer in enumerate(layers) if i not in blocks]
    config = model.config
    saved = {
        k: getattr(config, k)
        for k in ("num_hidden_layers", "layer_types")
        if getattr(config, k, None) is not None
    }
    indices = [(m, m.layer_idx) for m in model.modules() if hasattr(m, "layer_idx")]
    setattr(parent, attr, nn.ModuleList(kept))
    config.num_hidden_layers = len(kept)
    if "layer_types" in saved:
        config.layer_types = [t for i, t in enumerate(saved["layer_types"]) if i not in blocks]
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    try:
        yield model
    finally:
        setattr(parent, attr, layers)
        for key, value in saved.items():
            setattr(config, key, value)
        for module, index in indices:
            module.layer_idx = index
