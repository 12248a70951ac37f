"""Models larger than the accelerator: the blocks' weights stay in CPU memory and
each block is copied to the device only while it works.

:func:`offload_blocks` puts everything outside the transformer blocks (embeddings,
final norm, head, rotary tables) on the device and keeps the blocks on the CPU;
a block's forward then copies its parameters and buffers to the device, runs, and
points them back at their CPU tensors (the device copies are dropped, never
copied back: a forward does not change weights). A variant database build holds
each block on the device for all its work, statistics, compression and
propagation, with :func:`blocks_on_device`.

The device copies are transient: the CPU tensors stay the model's weights, so a
swap that points ``weight.data`` at a variant between forwards (the Swapper) is
what the next forward copies, and the model's fingerprint does not depend on
where it runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MethodType
from typing import Any

import torch
from torch import nn

from evocomp.supernet.units import find_blocks

__all__ = ["Offload", "block_on_device", "blocks_on_device", "offload_blocks", "offloaded"]

_ATTR = "_evocomp_offload"


@dataclass
class Offload:
    """How a model is offloaded: the device its blocks visit, and which visit now."""

    device: torch.device
    resident: set[int] = field(default_factory=set)
    """ids of the blocks whose tensors are on the device now."""
    visits: int = 0
    """Block visits so far (what tests and benchmarks count)."""


def offloaded(model: nn.Module) -> Offload | None:
    """The model's offload state (:func:`offload_blocks`), or None when it is not offloaded."""
    return getattr(model, _ATTR, None)


def offload_blocks(model: nn.Module, device: torch.device | str) -> Offload:
    """Keep ``model``'s blocks on the CPU, everything else on ``device``, and make
    every block forward run on ``device`` (its tensors copied there for the call).

    Returns the offload state, also found later with :func:`offloaded`.
    """
    state = offloaded(model)
    if state is not None:
        return state
    state = Offload(torch.device(device))
    _, blocks = find_blocks(model)
    inside = {id(m) for block in blocks for m in block.modules()}
    cpu = torch.device("cpu")
    for block in blocks:
        _move_tensors(block.modules(), cpu)
    # Only the outside modules' own tensors: a tied weight (embedding = head) is one
    # Parameter, moved once.
    _move_tensors((m for m in model.modules() if id(m) not in inside), state.device)
    for block in blocks:
        setattr(block, _ATTR, state)
        # A bound method, not a closure: deepcopy rebinds it to the copied block.
        block.forward = MethodType(_streamed_forward, block)  # type: ignore[method-assign]
    setattr(model, _ATTR, state)
    return state


@contextmanager
def block_on_device(model: nn.Module, block: nn.Module) -> Iterator[None]:
    """``block``'s tensors on the offload device for the duration (its forwards copy
    nothing more), pointed back at their CPU tensors afterwards; nothing happens
    when ``model`` is not offloaded."""
    state = offloaded(model)
    if state is None or id(block) in state.resident:
        yield
        return
    with _visiting(block, state):
        yield


def blocks_on_device(
    model: nn.Module, blocks: Sequence[nn.Module], indices: Iterable[int]
) -> Iterator[int]:
    """``indices`` again, block ``b`` held on the device (:func:`block_on_device`)
    while the caller works on it, until it asks for the next index: a block-by-block
    loop written ``for b in blocks_on_device(model, blocks, range(n))``."""
    for b in indices:
        with block_on_device(model, blocks[b]):
            yield b


def _streamed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # The forward itself, not a pre-hook: a hook that stops the forward early (the
    # database's input capture) then leaves no block behind on the device.
    state: Offload = getattr(self, _ATTR)
    if id(self) in state.resident:
        return type(self).forward(self, *args, **kwargs)
    with _visiting(self, state):
        return type(self).forward(self, *args, **kwargs)


@contextmanager
def _visiting(block: nn.Module, state: Offload) -> Iterator[None]:
    """Point every parameter and buffer of ``block`` at a copy on the device, and
    back at its CPU tensor afterwards. Always a copy, also to the CPU, so a test on
    the CPU sees which block is visiting."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: set[int] = set()
    for t in _tensors(block.modules()):
        if id(t) not in seen:  # a tensor shared within the block is copied once
            seen.add(id(t))
            saved.append((t, t.data))
            t.data = t.data.to(state.device, copy=True)
    state.resident.add(id(block))
    state.visits += 1
    try:
        yield
    finally:
        state.resident.discard(id(block))
        for t, original in saved:
            t.data = original


def _tensors(modules: Iterable[nn.Module]) -> Iterator[torch.Tensor]:
    for m in modules:
        yield from (t for t in m._parameters.values() if t is not None)
        yield from (t for t in m._buffers.values() if t is not None)


def _move_tensors(modules: Iterable[nn.Module], device: torch.device) -> None:
    for t in _tensors(modules):
        if t.device != device:
            t.data = t.data.to(device)
