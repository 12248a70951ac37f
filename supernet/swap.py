"""Applying a genome: swap weight tensors in place, restore them on exit."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager

import torch
from torch import nn

from evocomp.spaces.base import Genome, SearchSpace
from evocomp.spaces.units import Unit, VariantKey
from evocomp.supernet.database import VariantDatabase
from evocomp.supernet.shrink import narrowed
from evocomp.supernet.structured import KEPT
from evocomp.supernet.sublayers import skip, zeroed


class Swapper:
    """Assembles candidates from the variant database without copying the model.

    ``apply(genome)`` points each affected module's ``weight.data`` at a stored
    variant (moved once to the model's device and dtype, then cached by the
    database), and points it back at the original tensor on exit, so the dense
    model is restored bit for bit. Units whose level leaves them dense are not
    touched. A sublayer unit is skipped (depth), or, when the database holds
    width variants of it, narrowed to the stored heads or neurons (skipped when
    it keeps none); with ``export`` it keeps its size, the removed parts zeroed.
    """

    def __init__(self, model: nn.Module, space: SearchSpace, database: VariantDatabase | None):
        self.model = model
        self.space = space
        self.database = database
        self._modules = {u.name: model.get_submodule(u.name) for u in space.units}
        self._active = False

    def scored_as(self, genome: Genome) -> list[tuple[str, AbstractContextManager[nn.Module]]]:
        """The models a search scores ``genome`` as: the one it assembles (spaces
        whose genomes are scored as several models have appliers that say so)."""
        return [("", self.apply(genome))]

    @contextmanager
    def apply(self, genome: Genome, *, export: bool = False) -> Iterator[nn.Module]:
        if self._active:
            raise RuntimeError("Swapper.apply is not re-entrant")
        if len(genome) != len(self.space):
            raise ValueError(f"genome has {len(genome)} genes, space has {len(self.space)}")
        swapped: list[tuple[nn.Module, torch.Tensor]] = []
        removed: list[Unit] = []
        self._active = True
        try:
            with ExitStack() as narrowing:
                for unit, key in self.space.placements(genome):
                    module = self._modules[unit.name]
                    if unit.family == "sublayer":
                        if self._narrow(narrowing, unit, key, export=export):
                            continue
                        removed.append(unit)  # skipped (depth, or a width keeping nothing)
                        continue
                    if self.database is None:
                        raise RuntimeError("this space needs a variant database")
                    original = module.weight.data
                    variant = self.database.get(unit.name, key, device=original.device)
                    if variant.dtype != original.dtype:
                        variant = variant.to(original.dtype)
                    module.weight.data = variant
                    swapped.append((module, original))
                # Export zeroes removed sublayers' parameters so save_pretrained keeps the
                # removal; scoring skips their forward (no compute).
                with (zeroed if export else skip)(self.model, removed):
                    yield self.model
        finally:
            for module, original in reversed(swapped):
                module.weight.data = original
            self._active = False

    def removed(self, genome: Genome) -> list[Unit]:
        """The sublayers ``apply(genome)`` removes (skips, or zeroes for export)."""
        return [
            unit
            for unit, key in self.space.placements(genome)
            if unit.family == "sublayer" and self._kept(unit, key, "cpu") is None
        ]

    def narrowed(self, genome: Genome) -> list[tuple[Unit, torch.Tensor]]:
        """The sublayers ``apply(genome)`` narrows, each with the heads or neurons it
        keeps (what :func:`~evocomp.supernet.shrink.widened` needs)."""
        out = []
        for unit, key in self.space.placements(genome):
            if unit.family == "sublayer" and (kept := self._kept(unit, key, "cpu")) is not None:
                out.append((unit, kept))
        return out

    def _kept(self, unit: Unit, key: VariantKey, device: torch.device | str) -> torch.Tensor | None:
        """The heads or neurons sublayer ``unit`` keeps at width variant ``key``, or
        None when it is removed instead (no width variants: depth; or none kept)."""
        if self.database is None or not self.database.holds(unit.name):
            return None
        kept = self.database.get(unit.name, key, part=KEPT, device=device)
        return kept if kept.numel() else None

    def _narrow(self, stack: ExitStack, unit: Unit, key: VariantKey, *, export: bool) -> bool:
        """Narrow sublayer ``unit`` to its stored width variant ``key`` on ``stack``;
        False when it is to be skipped instead (see :meth:`_kept`)."""
        module = self._modules[unit.name]
        device = next(module.parameters()).device
        kept = self._kept(unit, key, device)
        if kept is None:
            return False
        assert self.database is not None  # _kept found variants in it
        weight = self.database.get(unit.name, key, device=device)
        stack.enter_context(narrowed(module, unit.kind, kept, weight, zero=export))
        return True
