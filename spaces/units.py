"""Units and variant keys: what a space names in the model, without the model.

A :class:`Unit` is a frozen record of one compressible piece (a linear layer or
a sublayer), found in the module tree by :mod:`evocomp.supernet.units`; spaces,
optimizers, trial stores and analysis only ever see these records, so none of
them needs torch.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Literal, SupportsIndex

from evocomp.errors import EvocompError

LINEAR = "linear"
"""The kind of a weight-matrix unit (the unit of sparsity and bitwidth search)."""

SUBLAYER_KINDS = ("attn", "mlp")
"""The kinds of sublayer units (depth search), in execution order within a block."""

UnitFamily = Literal["linear", "sublayer"]
"""What a space searches over: linear layers, or attention/MLP sublayers."""


@dataclass(frozen=True)
class Unit:
    """A compressible piece of the model.

    ``kind`` is ``"linear"`` for a weight matrix (the unit of sparsity and
    bitwidth search); sublayer kinds (``"attn"``, ``"mlp"``) are for depth search.
    ``shape`` is always ``(out_features, in_features)``; ``transposed`` marks
    modules that store the weight as ``(in, out)`` (GPT-2's Conv1D). A sublayer's
    shape is ``(parameters, 1)``, so ``numel`` is its parameter count.
    """

    name: str
    kind: str
    block: int
    shape: tuple[int, int]
    transposed: bool = False
    groups: int = 0
    """Width search: the sublayer's removable groups, query heads (``attn``) or
    intermediate neurons (``mlp``); 0 where its layout is not understood."""
    group_numel: int = 0
    """Width search: the parameters that go with one group (a query head's
    ``q_proj`` rows and ``o_proj`` columns; a neuron's gate/up rows and down column)."""
    kv_groups: int = 0
    """Width search, attention: KV heads, each read by ``groups / kv_groups`` query heads."""

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def family(self) -> UnitFamily:
        """``"sublayer"`` for attention / MLP sublayers, else ``"linear"``."""
        return "sublayer" if self.kind in SUBLAYER_KINDS else "linear"


@dataclass(frozen=True)
class UnitQuery:
    """Units a space searches: every unit of ``family`` in the model's blocks,
    narrowed by the config's ``units.targets`` / ``units.ignore`` when ``filtered``."""

    family: UnitFamily
    filtered: bool = True


def matches(name: str, pattern: str) -> bool:
    """``re:<regex>`` is matched against the whole name; a plain pattern matches the
    name itself or any dotted suffix of it (``down_proj``, ``mlp.down_proj``)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def select_units(
    units: list[Unit], targets: list[str] | None, ignore: list[str] | None, *, what: str
) -> list[Unit]:
    """The units matching any of ``targets`` (all when empty) and none of ``ignore``;
    selecting nothing is an error that shows what names look like."""
    selected = [
        u
        for u in units
        if (not targets or any(matches(u.name, p) for p in targets))
        and not any(matches(u.name, p) for p in ignore or [])
    ]
    if not selected:
        examples = ", ".join(u.name for u in units[:4])
        raise EvocompError(
            f"units.targets={targets} / units.ignore={ignore} select no {what}; "
            f"names look like: {examples}"
        )
    return selected


VariantKey = int | tuple[int, ...]
"""A stored variant of a unit: a level (e.g. a zero count or a bitwidth), or a tuple
of levels for composite compressors (e.g. ``(zeros, bits)``)."""


def variant_key(key: object) -> VariantKey:
    """``key`` as a hashable VariantKey: JSON brings tuples back as lists."""
    try:
        if isinstance(key, (tuple, list)) and key:
            return tuple(operator.index(k) for k in key)
        if isinstance(key, SupportsIndex):
            return operator.index(key)
    except TypeError:
        pass
    raise EvocompError(f"a variant key is an int or a non-empty tuple of ints, got {key!r}")


@dataclass(frozen=True)
class TimingRequest:
    """Widths of one sublayer whose forward time a space's costs need (see
    :meth:`~evocomp.spaces.base.SearchSpace.timings_needed`)."""

    unit: Unit
    counts: tuple[int, ...]
    """Query heads or neurons kept, one timing each (0: removed)."""
    whole_groups: bool = False
    """Attention: whole KV groups go (with their K/V heads), not heads within each."""
