"""Depth search: which attention and MLP sublayers to remove.

Design
------
* **Genes are sublayers, always.** One gene per ``attn`` / ``mlp`` unit (level 0 =
  kept, 1 = removed), whatever the granularity, so genomes, trial-store columns,
  ``describe()`` rows and the Swapper look the same for every granularity. Coarser
  granularities tie genes into *groups* (a block's attn + mlp; two consecutive
  blocks): a genome is valid only when each group is all kept or all removed, and
  the mutation moves whole groups.
* **Cost = number of removed sublayers; budget = ``remove``.** With the shared rule
  ``feasible <=> cost <= budget``, removing fewer than ``remove`` is feasible (the
  partial states of greedy baselines such as SLEB, and the dense model), removing
  more is not. The EvoPress mutation swaps one removed group with one kept group
  of the same size, so searches stay *exactly* on budget (``on_budget``). Note the
  direction: unlike sparsity (nonzeros kept), a higher depth cost means a smaller
  model; ``params_removed`` gives the size in parameters.
* **Same-kind swaps.** In ``swap: same-kind`` mode a removed group only trades
  places with a kept group of identical composition (attn with attn, mlp with mlp;
  a block with a block), so the number of removed attention and MLP sublayers is
  fixed by the start genome. ``uniform()`` (drop-last) decides that split: the last
  ``remove`` sublayers in execution order, or, with ``attn_fraction``, the last
  ``round(attn_fraction * remove)`` attention and the last remaining MLP
  sublayers. ``swap: any`` lets the search move removals between kinds.
  The mutation is a group swap written directly (``_switch``) rather than through
  the generic cost-table switch, because groups flip several genes at once.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, Literal

from pydantic import Field, model_validator

from evocomp.errors import EvocompError
from evocomp.registry import StrictModel
from evocomp.spaces.base import SPACES, CostAxis, Genome, LevelSpace
from evocomp.spaces.units import SUBLAYER_KINDS, Unit

_GROUP_BLOCKS = {"sublayer": 0, "block": 1, "pair": 2}


def _shown(counts: list[int]) -> str:
    cut = counts if len(counts) <= 8 else [*counts[:3], "...", counts[-1]]
    return ", ".join(map(str, cut)) or "none"


class DepthParams(StrictModel):
    """Options of the ``depth`` space."""

    remove: int | None = Field(None, ge=0, description="sublayers removed (exact)")
    remove_fraction: float | None = Field(
        None, ge=0.0, le=1.0, description="fraction of all sublayers removed"
    )
    granularity: Literal["sublayer", "block", "pair"] = Field(
        "sublayer", description="remove single sublayers, whole blocks, or pairs of blocks"
    )
    swap: Literal["same-kind", "any"] = Field(
        "same-kind", description="mutation trades attn with attn / mlp with mlp, or any"
    )
    attn_fraction: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="share of the removals that are attention (start genome; sublayer only)",
    )

    @model_validator(mode="after")
    def _one_budget(self) -> DepthParams:
        if (self.remove is None) == (self.remove_fraction is None):
            raise ValueError("give exactly one of remove (a count) or remove_fraction")
        if self.attn_fraction is not None and self.granularity != "sublayer":
            raise ValueError(
                f"attn_fraction needs granularity 'sublayer' (a {self.granularity} "
                "removes attention and MLP together)"
            )
        return self


@SPACES.register("depth")
class DepthSpace(LevelSpace[DepthParams]):
    """Remove exactly ``remove`` attention / MLP sublayers (see the module docstring
    for the cost, budget and granularity design)."""

    name = "depth"
    cost_is_size = False  # cost counts removed sublayers: the more, the smaller the model

    Params = DepthParams
    unit_family = "sublayer"
    joinable = True

    def __init__(self, units: Sequence[Unit], params: DepthParams) -> None:
        super().__init__(units, params)
        if not units or any(u.family != "sublayer" for u in units):
            raise EvocompError(
                "the depth space needs sublayer units (kinds 'attn' and 'mlp'; "
                "find them with evocomp.supernet.find_units)"
            )
        # Execution order: by block, attention before MLP.
        order = sorted(range(len(units)), key=lambda i: (units[i].block, units[i].kind != "attn"))
        self.groups: tuple[tuple[int, ...], ...] = self._make_groups(order)
        kinds = [
            tuple(sum(units[i].kind == k for i in grp) for k in SUBLAYER_KINDS)
            for grp in self.groups
        ]
        # Groups may trade places in a mutation only when their signatures match.
        self._signature: list[tuple[int, ...]] = (
            kinds if params.swap == "same-kind" else [(sum(c),) for c in kinds]
        )
        # Counts that dropping whole groups from the end reaches exactly.
        self._reachable = [0]
        for grp in reversed(self.groups):
            self._reachable.append(self._reachable[-1] + len(grp))
        self._remove = self._resolve_remove()
        self._uniform = self._drop_last()
        # Per-kind removal counts that greedy baselines must respect, only when the
        # user fixed the split (attn_fraction) and mutations keep it (same-kind).
        self.quota: dict[str, int] | None = None
        if params.attn_fraction is not None and params.swap == "same-kind":
            self.quota = self._kind_counts(self._uniform)

    # -- construction ------------------------------------------------------------------
    def _make_groups(self, order: list[int]) -> tuple[tuple[int, ...], ...]:
        per = _GROUP_BLOCKS[self.params.granularity]
        if per == 0:
            return tuple((i,) for i in order)
        by_block: dict[int, list[int]] = {}
        for i in order:
            by_block.setdefault(self.units[i].block, []).append(i)
        blocks = sorted(by_block)
        # Pairs are aligned to the last block, so drop-last removes whole pairs; with
        # an odd number of blocks the first block is a group on its own.
        chunks = [blocks[max(0, end - per) : end] for end in range(len(blocks), 0, -per)]
        return tuple(tuple(i for b in chunk for i in by_block[b]) for chunk in reversed(chunks))

    def _resolve_remove(self) -> int:
        """``remove`` (or the count nearest ``remove_fraction``) among the counts that
        dropping whole groups from the end can reach exactly."""
        reachable = self._reachable
        p = self.params
        if p.remove is None:
            assert p.remove_fraction is not None
            want = p.remove_fraction * len(self)
            return min(reachable, key=lambda r: (abs(r - want), r))
        if p.remove not in reachable:
            raise EvocompError(
                f"space.remove={p.remove} cannot be met with granularity {p.granularity!r} "
                f"over {len(self)} sublayers; allowed: {_shown(reachable)} "
                f"(a depth search itself: {_shown(self._searchable(reachable))})"
            )
        return p.remove

    def _searchable(self, reachable: list[int]) -> list[int]:
        """The counts a depth search can move from: some removed, some kept."""
        return [r for r in reachable if 0 < r < len(self)]

    def check_movable(self) -> None:
        """Removing nothing or everything leaves nothing to swap: say which counts work."""
        searchable = self._searchable(self._reachable)
        if self._remove not in searchable:
            raise EvocompError(
                f"space.remove={self._remove} leaves no removed and kept sublayers to swap; "
                f"a depth search needs one of: {_shown(searchable)} "
                "(0 works as a part of a joint space)"
            )
        super().check_movable()

    def _drop_last(self) -> Genome:
        g = [0] * len(self)
        p = self.params
        if p.attn_fraction is None:
            removed = 0
            for grp in reversed(self.groups):
                if removed == self._remove:
                    break
                for i in grp:
                    g[i] = 1
                removed += len(grp)
            return tuple(g)
        want = {"attn": round(p.attn_fraction * self._remove)}
        want["mlp"] = self._remove - want["attn"]
        for kind, n in want.items():
            genes = [grp[0] for grp in self.groups if self.units[grp[0]].kind == kind]
            if n > len(genes):
                raise EvocompError(
                    f"space.attn_fraction={p.attn_fraction} asks to remove {n} {kind} "
                    f"sublayers of {self._remove}, but there are only {len(genes)}"
                )
            for i in genes[len(genes) - n :]:
                g[i] = 1
        return tuple(g)

    # -- the SearchSpace contract --------------------------------------------------------
    def n_levels(self, gene: int) -> int:
        return 2

    def level_cost(self, gene: int, level: int) -> int:
        return level  # one per removed sublayer

    @property
    def budget(self) -> int:
        return self._remove

    def uniform(self) -> Genome:
        """Drop-last: the last sublayers (or groups) in execution order are removed."""
        return self._uniform

    def variant(self, gene: int, level: int) -> int | None:
        return 1 if level else None

    def variants(self) -> dict[str, list[int]]:
        """Empty: removing a sublayer needs no stored weights (the Swapper skips it)."""
        return {}

    def describe_level(self, gene: int, level: int) -> dict[str, Any]:
        return {"removed": bool(level)}

    def is_valid(self, genome: Genome) -> bool:
        """Valid levels, and every group all kept or all removed. (Feasible also
        means at most ``remove`` removed; fewer is allowed, see the module docstring.)"""
        return super().is_valid(genome) and all(
            len({genome[i] for i in grp}) == 1 for grp in self.groups
        )

    def steps(self, genome: Genome) -> list[dict[int, int]]:
        """Remove one kept group, or put back one removed group."""
        return [{i: 1 - genome[grp[0]] for i in grp} for grp in self.groups]

    def size_factor(self, gene: int, level: int) -> Fraction:
        """1 while the sublayer is kept, 0 once removed (its weights are gone)."""
        return Fraction(1 - level)

    def random_step(self, genome: Genome, rng: random.Random) -> dict[int, int] | None:
        """One group at random, toggled."""
        grp = rng.choice(self.groups)
        return {i: 1 - genome[grp[0]] for i in grp}

    def make_valid(self, genome: Genome) -> Genome:
        """Levels clamped to kept / removed, then each group made whole (:meth:`make_whole`)."""
        return self.make_whole(super().make_valid(genome))

    def make_whole(self, genome: Genome) -> Genome:
        """``genome`` with each group removed when at least half its genes are, else
        kept (levels outside 0/1 count as removed when positive)."""
        if len(genome) != len(self):
            raise ValueError(f"genome has {len(genome)} genes, space has {len(self)}")
        g = list(self.dense())
        for grp in self.groups:
            if 2 * sum(1 for i in grp if genome[i] > 0) >= len(grp):
                for i in grp:
                    g[i] = 1
        return tuple(g)

    def _switch(self, g: list[int], rng: random.Random) -> bool:
        """Put one removed group back and remove one kept group with the same
        signature, so the count (and, in same-kind mode, each kind's count) stays."""
        removed = [k for k, grp in enumerate(self.groups) if g[grp[0]]]
        if not removed:
            return False
        k = rng.choice(removed)
        partners = [
            h
            for h, grp in enumerate(self.groups)
            if not g[grp[0]] and self._signature[h] == self._signature[k]
        ]
        if not partners:
            return False
        h = rng.choice(partners)
        for i in self.groups[k]:
            g[i] = 0
        for i in self.groups[h]:
            g[i] = 1
        return True

    @property
    def baseline_name(self) -> str:
        return "drop-last"

    def cost_axis(self) -> CostAxis:
        return CostAxis(1.0, "cost (removed sublayers)")

    def repair(self, genome: Genome, rng: random.Random) -> Genome:
        """Any genome (e.g. after crossover) moved exactly onto the budget: each group
        is removed when at least half its genes are, random removed groups are put
        back while the count (or a kind's ``quota``) is exceeded, then random kept
        groups are removed (:meth:`can_remove`) until ``remove`` are gone."""
        g = list(self.make_valid(genome))
        while True:
            over = self._over(tuple(g))
            if over is None:
                break
            k = rng.choice(over)
            for i in self.groups[k]:
                g[i] = 0
        restarted = False
        while self.cost(tuple(g)) < self.budget:
            options = [k for k in range(len(self.groups)) if self.can_remove(tuple(g), k)]
            if not options:
                # Mixed group sizes (odd pairs): the rest is out of reach from here.
                # From dense it never is: can_remove keeps the remainder reachable.
                if restarted:
                    raise RuntimeError("depth repair: the budget is unreachable from dense")
                g, restarted = list(self.dense()), True
                continue
            for i in self.groups[rng.choice(options)]:
                g[i] = 1
        return tuple(g)

    def _over(self, genome: Genome) -> list[int] | None:
        """Removed groups to choose from when ``genome`` removes too many in total or
        of a kind beyond its quota; ``None`` when it does not."""
        removed = [k for k, grp in enumerate(self.groups) if genome[grp[0]]]
        if self.quota is not None:
            counts = self._kind_counts(genome)
            for kind, limit in self.quota.items():
                if counts[kind] > limit:
                    return [k for k in removed if self.units[self.groups[k][0]].kind == kind]
        return removed if self.cost(genome) > self.budget else None

    # -- helpers for greedy baselines and reports ----------------------------------------
    def dense(self) -> Genome:
        """Nothing removed (feasible: below the budget)."""
        return (0,) * len(self)

    def on_budget(self, genome: Genome) -> bool:
        """Feasible and removing exactly ``remove`` sublayers: a final answer."""
        return self.is_feasible(genome) and self.cost(genome) == self.budget

    def removed(self, genome: Genome) -> list[Unit]:
        return [u for u, g in zip(self.units, genome, strict=True) if g]

    def params_removed(self, genome: Genome) -> int:
        """Parameters of the removed sublayers (``Unit.numel`` is a parameter count)."""
        return sum(u.numel for u in self.removed(genome))

    def _kind_counts(self, genome: Genome) -> dict[str, int]:
        return {k: sum(1 for u in self.removed(genome) if u.kind == k) for k in SUBLAYER_KINDS}

    def remove_group(self, genome: Genome, group: int) -> Genome:
        """``genome`` with every sublayer of ``groups[group]`` removed as well."""
        g = list(genome)
        for i in self.groups[group]:
            g[i] = 1
        return tuple(g)

    def can_remove(self, genome: Genome, group: int) -> bool:
        """Whether a greedy step may remove ``groups[group]`` from ``genome`` and still
        end exactly on budget: the group is kept, the count stays within ``remove``,
        per-kind quotas (``quota``) hold, and the rest of the budget can still be
        filled exactly by the other kept groups."""
        grp = self.groups[group]
        if genome[grp[0]]:
            return False
        after = self.remove_group(genome, group)
        left = self.budget - self.cost(after)
        if left < 0:
            return False
        others = [h for h, o in enumerate(self.groups) if h != group and not after[o[0]]]
        if self.quota is not None:  # sublayer granularity: one gene per group
            counts = self._kind_counts(after)
            for kind, limit in self.quota.items():
                free = sum(1 for h in others if self.units[self.groups[h][0]].kind == kind)
                if not counts[kind] <= limit <= counts[kind] + free:
                    return False
            return True
        reach = 1  # bit r set: r more sublayers can be removed exactly (subset sum)
        for h in others:
            reach |= reach << len(self.groups[h])
        return bool(reach >> left & 1)
