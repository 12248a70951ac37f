"""Prefix reuse: a candidate that compresses its first ``k`` decoder blocks exactly as a
recently scored genome did starts its forward at block ``k``, from that genome's cached
hidden states.

EvoPress-style children differ from their parent in a few units, spread at random over
the depth, so on average a child shares a third or more of its blocks' forward with the
parent; the parent is scored again on more sequences than its children, so its states
are at hand when they are needed. Blocks before the start are not run: their
``forward`` returns the cached residual stream at the start instead. Everything after
the start runs the same operations on the same inputs as a full forward, so the logits
are bit for bit those of a full forward of the same row.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from evocomp.spaces.units import Unit
from evocomp.supernet.sublayers import _hidden_input, _structure, instance_forward
from evocomp.supernet.units import find_blocks

Signature = tuple[tuple[tuple[str, Hashable], ...], ...]
"""Per decoder block, the (unit, variant key) placements inside it: what decides the
block's function. Two genomes with equal signatures up to block ``k`` give the same
hidden states at block ``k``'s input."""

Forward = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]
"""``forward(batch, rows)``: float32 logits of the token rows ``batch``, which are rows
``rows`` of the evaluator's token set."""


def block_signature(n_blocks: int, placements: Iterable[tuple[Unit, Hashable]]) -> Signature:
    """The :data:`Signature` of a genome from its placements (units left dense are not
    placed, so they add nothing)."""
    per: list[list[tuple[str, Hashable]]] = [[] for _ in range(n_blocks)]
    for unit, key in placements:
        per[unit.block].append((unit.name, key))
    # Unit names are unique within a block, so sorting never compares keys.
    return tuple(tuple(sorted(p, key=lambda nk: nk[0])) for p in per)


def _common_prefix(a: Signature, b: Signature) -> int:
    n = 0
    for x, y in zip(a, b, strict=True):
        if x != y:
            break
        n += 1
    return n


def _returning(block: nn.Module, hidden: torch.Tensor) -> Any:
    """While active, ``block`` skips its compute and returns ``hidden`` in the structure
    its forward normally returns (a tensor, or a tuple starting with one)."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            n = _structure(block, original, args, kwargs)
            return hidden if n is None else (hidden,) + (None,) * (n - 1)

        return forward

    return instance_forward(block, make)


class PrefixCache:
    """Hidden states at every block boundary of recently scored (genome, row) pairs,
    least recently used dropped first beyond ``max_bytes``.

    An entry holds the input of each block and the output of the last one. A new entry
    shares (by reference, counted once) the states of the entry it started from up to
    its start, so a chain of descendants costs only what each one recomputed.
    ``logits(model, batch)`` is the plain forward; it is passed in because the evaluator
    layer owns it. Rows are run one at a time: a row's states are its own, and a single
    row gives the same bits as the full forward of that row alone.
    """

    def __init__(
        self,
        model: nn.Module,
        logits: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        *,
        max_bytes: int,
    ) -> None:
        self.model = model
        self._logits = logits
        _, self._blocks = find_blocks(model)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, Signature], list[torch.Tensor]] = OrderedDict()
        self._refs: dict[int, int] = {}  # id(state) -> entries holding it
        self.bytes = 0
        self.blocks_run = 0
        self.blocks_total = 0

    @property
    def n_blocks(self) -> int:
        return len(self._blocks)

    @property
    def share_run(self) -> float:
        """Block forwards run over those a full forward of every row would run."""
        return self.blocks_run / self.blocks_total if self.blocks_total else 1.0

    def forward(self, signature: Signature) -> Forward:
        """The :data:`Forward` of the genome with ``signature`` (already applied to the
        model while it is called)."""
        if len(signature) != self.n_blocks:
            raise ValueError(f"signature has {len(signature)} blocks, model has {self.n_blocks}")

        def run(batch: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
            out = [self._row(signature, row, batch[i : i + 1]) for i, row in enumerate(rows)]
            return out[0] if len(out) == 1 else torch.cat(out)

        return run

    def _match(self, row: int, signature: Signature) -> tuple[int, list[torch.Tensor] | None]:
        best, states, key = 0, None, None
        for k, st in self._entries.items():
            if k[0] == row and (p := _common_prefix(k[1], signature)) > best:
                best, states, key = p, st, k
        if key is not None:
            self._entries.move_to_end(key)
        return best, states

    def _row(self, signature: Signature, row: int, batch: torch.Tensor) -> torch.Tensor:
        n = self.n_blocks
        start, source = self._match(row, signature)
        captured: dict[int, torch.Tensor] = {}

        def keep(j: int) -> Callable[..., None]:
            def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                captured[j] = _hidden_input(args, kwargs).detach().clone()
            return hook

        def keep_last(_m: nn.Module, _args: Any, out: Any) -> None:
            first = out[0] if isinstance(out, tuple) else out
            captured[n] = first.detach().clone()

        with ExitStack() as stack:
            if source is not None:
                for j in range(start):
                    stack.enter_context(_returning(self._blocks[j], source[start]))
            if start < n:
                # The state at the start is the source's (shared below); capture after it.
                for j in range(start + (source is not None), n):
                    handle = self._blocks[j].register_forward_pre_hook(keep(j), with_kwargs=True)
                    stack.callback(handle.remove)
                handle = self._blocks[n - 1].register_forward_hook(keep_last)
                stack.callback(handle.remove)
            logits = self._logits(self.model, batch)
        self.blocks_run += n - start
        self.blocks_total += n
        if start < n:
            shared = source[: start + 1] if source is not None else []
            fresh = [captured[j] for j in range(len(shared), n + 1)]
            self._store((row, signature), shared + fresh)
        return logits

    def _store(self, key: tuple[int, Signature], states: list[torch.Tensor]) -> None:
        if key in self._entries:
            self._drop(key)
        self._entries[key] = states
        for t in states:
            if self._refs.get(id(t), 0) == 0:
                self.bytes += t.numel() * t.element_size()
            self._refs[id(t)] = self._refs.get(id(t), 0) + 1
        while self.bytes > self.max_bytes and self._entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[int, Signature]) -> None:
        for t in self._entries.pop(key):
            self._refs[id(t)] -= 1
            if self._refs[id(t)] == 0:
                del self._refs[id(t)]
                self.bytes -= t.numel() * t.element_size()

    def clear(self) -> None:
        """Forget every state (the model's weights changed under them)."""
        self._entries.clear()
        self._refs.clear()
        self.bytes = 0
