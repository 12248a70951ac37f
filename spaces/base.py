"""The search-space contract: what a genome is, what it costs, how it may change.

A genome is a tuple of ints, one level per gene. Every space here is a
``LevelSpace``: each gene has a small table of integer costs (nonzeros kept,
bits stored, parameters kept), the cost of a genome is the sum, and the budget
is a bound on that sum. Integer costs make "exactly on budget" checkable, and
the EvoPress level switch (one gene up, another down by exactly the same cost)
is then generic across sparsity, bitwidth and depth spaces.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import nn

from evocomp.errors import EvocompError
from evocomp.registry import Registry
from evocomp.supernet.units import Unit, find_linear_units

Genome = tuple[int, ...]


class SearchSpace(ABC):
    """Units × levels plus a budget. Subclasses define the levels and their costs."""

    name: ClassVar[str]
    compressor_kind: ClassVar[str | None] = None
    """The kind of compressor whose variants the levels name (None: no database)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, units: Sequence[Unit]) -> None:
        self.units: tuple[Unit, ...] = tuple(units)

    @classmethod
    def find_units(
        cls, model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None
    ) -> list[Unit]:
        """The units this space searches in ``model`` (default: block linears)."""
        return find_linear_units(model, targets, ignore)

    # -- what subclasses provide -------------------------------------------------
    @abstractmethod
    def n_levels(self, gene: int) -> int:
        """How many levels gene ``gene`` has (levels are 0 .. n-1)."""

    @abstractmethod
    def level_cost(self, gene: int, level: int) -> int:
        """The integer cost of gene ``gene`` at ``level``."""

    @property
    @abstractmethod
    def budget(self) -> int:
        """A genome is feasible when ``cost(genome) <= budget``."""

    @abstractmethod
    def uniform(self) -> Genome:
        """The baseline: the same compression everywhere (feasible)."""

    @abstractmethod
    def variant(self, gene: int, level: int) -> int | None:
        """The database key of the compressed weight for this level, or ``None``
        when the level leaves the unit as in the dense model."""

    @abstractmethod
    def describe_level(self, gene: int, level: int) -> dict[str, Any]:
        """Readable values of one gene's level (e.g. ``{"sparsity": 0.55}``)."""

    # -- shared behaviour ----------------------------------------------------------
    def __len__(self) -> int:
        return len(self.units)

    def cost(self, genome: Genome) -> int:
        return sum(self.level_cost(i, g) for i, g in enumerate(genome))

    def is_feasible(self, genome: Genome) -> bool:
        return (
            len(genome) == len(self)
            and all(0 <= g < self.n_levels(i) for i, g in enumerate(genome))
            and self.cost(genome) <= self.budget
        )

    def random(self, rng: random.Random, *, steps: int | None = None) -> Genome:
        """A random feasible genome: a random walk of level switches from uniform,
        so it sits exactly on the budget."""
        genome = self.uniform()
        for _ in range(steps if steps is not None else 4 * len(self)):
            genome = self.mutate(genome, rng)
        return genome

    def mutate(self, genome: Genome, rng: random.Random, *, switches: int = 1) -> Genome:
        """EvoPress level switch, ``switches`` times: move one gene a level up or
        down and another gene the opposite way by exactly the same cost, so the
        total cost is unchanged. Returns ``genome`` unchanged if no switch exists."""
        g = list(genome)
        for _ in range(switches):
            for _attempt in range(64):
                if self._switch(g, rng):
                    break
        return tuple(g)

    def _switch(self, g: list[int], rng: random.Random) -> bool:
        i = rng.randrange(len(g))
        step = rng.choice((-1, 1))
        li = g[i] + step
        if not 0 <= li < self.n_levels(i):
            return False
        delta = self.level_cost(i, li) - self.level_cost(i, g[i])
        partners = [
            (j, g[j] + s)
            for j in range(len(g))
            if j != i
            for s in (-1, 1)
            if 0 <= g[j] + s < self.n_levels(j)
            and self.level_cost(j, g[j] + s) - self.level_cost(j, g[j]) == -delta
        ]
        if not partners:
            return False
        j, lj = rng.choice(partners)
        g[i], g[j] = li, lj
        return True

    def repair(self, genome: Genome, rng: random.Random) -> Genome:
        """Bring any genome under the budget, then spend what is left: lower
        random genes one level until feasible, then raise random genes one level
        while the budget allows. Used after crossover, and for targets that no
        uniform genome meets."""
        g = [min(max(0, x), self.n_levels(i) - 1) for i, x in enumerate(genome)]
        cost = sum(self.level_cost(i, x) for i, x in enumerate(g))
        order = list(range(len(g)))
        while cost > self.budget:
            i = rng.choice(order)
            # Levels are ordered by cost, but not always downwards: pick the cheaper side.
            options = [x for x in (g[i] - 1, g[i] + 1) if 0 <= x < self.n_levels(i)]
            x = min(options, key=lambda lv: self.level_cost(i, lv))
            if self.level_cost(i, x) < self.level_cost(i, g[i]):
                cost += self.level_cost(i, x) - self.level_cost(i, g[i])
                g[i] = x
            elif all(
                min(self.level_cost(j, lv) for lv in range(self.n_levels(j)))
                == self.level_cost(j, g[j])
                for j in order
            ):
                raise EvocompError(f"space {self.name!r}: the budget is below its cheapest genome")
        rng.shuffle(order)
        for i in order:
            for x in (g[i] + 1, g[i] - 1):
                if 0 <= x < self.n_levels(i):
                    extra = self.level_cost(i, x) - self.level_cost(i, g[i])
                    if extra > 0 and cost + extra <= self.budget:
                        g[i] = x
                        cost += extra
                        break
        return tuple(g)

    @property
    def baseline_name(self) -> str:
        """What :meth:`uniform` is, in reports."""
        return "uniform"

    def check_movable(self) -> None:
        """Fail early when no level switch exists from the uniform genome (a search
        could never move)."""
        rng = random.Random(0)
        if not any(self._switch(list(self.uniform()), rng) for _ in range(1000)):
            raise EvocompError(
                f"space {self.name!r} has no budget-preserving level switch: no two units "
                "can trade cost (add more units via model.targets, or more levels)"
            )

    def describe(self, genome: Genome) -> list[dict[str, Any]]:
        """One readable row per gene: unit name, block, level and its values."""
        return [
            {"unit": u.name, "block": u.block, "level": g, **self.describe_level(i, g)}
            for i, (u, g) in enumerate(zip(self.units, genome, strict=True))
        ]

    def variants(self) -> dict[str, list[int]]:
        """Every database key each unit needs; units that never leave the dense
        model are absent (an empty dict means no database is needed)."""
        out: dict[str, list[int]] = {}
        for i, unit in enumerate(self.units):
            keys = {self.variant(i, lvl) for lvl in range(self.n_levels(i))} - {None}
            if keys:
                out[unit.name] = sorted(k for k in keys if k is not None)
        return out

    def param_names(self) -> list[str]:
        """One name per gene, for trial stores and Optuna encodings."""
        return [u.name for u in self.units]


SPACES: Registry[type[SearchSpace]] = Registry("space")
