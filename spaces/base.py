"""The search-space contract: what a genome is, what it costs, how it may change.

A genome is a tuple of ints, one level per gene. :class:`SearchSpace` is the
contract every space keeps (cost, budget, feasible start, budget-keeping
mutation, repair, and what a genome puts where in the model), plus the
unconstrained operators of multi-objective searches, which trade cost against
quality instead of keeping a budget: :meth:`~SearchSpace.make_valid` and the
directed random walk :meth:`~SearchSpace.wander`.
:class:`LevelSpace` implements it for spaces whose cost is a sum over genes:
each gene has a small table of integer costs (nonzeros kept, bits stored,
sublayers removed), so "exactly on budget" is checkable and the EvoPress level
switch (one gene up, another down by exactly the same cost) is generic across
sparsity, bitwidth and depth. Joint spaces (:mod:`evocomp.spaces.joint`) keep
the contract with a cost that multiplies their parts' size factors instead.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from random import Random
from typing import Any, ClassVar, Generic, Literal, TypeVar

from evocomp.errors import EvocompError
from evocomp.registry import Registry, StrictModel
from evocomp.spaces.units import TimingRequest, Unit, UnitFamily, UnitQuery, VariantKey

Genome = tuple[int, ...]

GenomeKind = Literal["levels", "expression"]

P = TypeVar("P", bound=StrictModel)

Step = dict[int, int]
"""A small valid change of a genome: gene -> new level."""

_DRAWS = 24
"""Random draws before a step search falls back to listing every option."""


SizeUnit = Literal["fraction", "bits"]
"""What a size factor measures per weight: the kept fraction, or stored bits."""

SIZE_LABELS: dict[SizeUnit, str] = {
    "fraction": "kept weights (fraction of dense)",
    "bits": "stored bits per weight",
}

KEY_ORDER = ("sparsity", "bits")
"""Compressor kinds in the order composite variant keys list them: ``(zeros, bits)``."""


@dataclass(frozen=True)
class CostAxis:
    """How reports and plots show a space's cost: ``cost / scale``, labelled ``label``."""

    scale: float
    label: str


class SearchSpace(ABC, Generic[P]):
    """Units × levels plus a budget: the contract optimizers, the Swapper and the
    runner rely on. A genome is feasible when it is valid (:meth:`is_valid`) and
    ``cost(genome) <= budget``.

    When each hook is called:

    * :meth:`unit_queries` (a classmethod), before the space exists: the runner
      finds these units in the model and passes them to the constructor.
    * ``__init__(units, params)``: once per run (and again by analysis, from the
      run's ``units.json``, with no model loaded).
    * :meth:`variants`: once, before the search, to build or open the variant
      database; :meth:`placements`: for every candidate, by the Swapper.
    * :meth:`uniform`, :meth:`random`, :meth:`mutate`, :meth:`repair`,
      :meth:`steps`, :meth:`wander`, :meth:`make_valid`: by optimizers, as often as
      they like; they must be cheap and, given the ``rng``, deterministic.
    * :meth:`cost`, :meth:`is_feasible`: by the runner for every request, and by
      optimizers.
    * :meth:`describe`, :meth:`cost_axis`, :attr:`baseline_name`: for reports.
    """

    name: ClassVar[str]
    Params: ClassVar[type[StrictModel]] = StrictModel
    """The options of this space (``space:`` in a config), validated by pydantic."""
    compressor_kind: str | None = None
    """The kind of compressor whose variants the levels name (None: no database). A
    class attribute, which an instance may override where its options choose the
    kind (the bits space's ``gguf`` preset); :meth:`compressor_kind_for` says which
    before the space exists."""
    cost_is_size: ClassVar[bool] = True
    """Whether cost grows with the model's size, so that multi-objective searches can
    trade it against quality (False for depth, whose cost counts removed sublayers)."""
    unit_family: ClassVar[UnitFamily] = "linear"
    """The units the space searches, unless :meth:`unit_queries` says otherwise."""
    genome_kind: ClassVar[GenomeKind] = "levels"
    """What a genome's ints are: one level per gene (every space but one), or the
    prefix code of a metric expression (``metric``), which is applied by pruning
    one-shot rather than from a variant database. Optimizers say which kind they
    search (:attr:`~evocomp.search.base.Optimizer.genome_kind`)."""

    def __init__(self, units: Sequence[Unit], params: P) -> None:
        self.units: tuple[Unit, ...] = tuple(units)
        self.params: P = params

    @classmethod
    def unit_queries(cls, params: P) -> tuple[UnitQuery, ...]:
        """Which units of the model the space searches (called before it exists):
        by default every unit of :attr:`unit_family`, narrowed by ``units.targets``."""
        return (UnitQuery(cls.unit_family),)

    @classmethod
    def compressor_kind_for(cls, params: P) -> str | None:
        """The :attr:`compressor_kind` a space built with ``params`` will have (called
        before it exists, e.g. by a joint space checking its parts); the class's own
        unless options change it."""
        return cls.compressor_kind

    @classmethod
    def timings_needed(cls, units: Sequence[Unit], params: P) -> dict[str, TimingRequest]:
        """Called by the runner before the space exists: sublayer widths whose measured
        forward time the space's costs need, by a key of the space's choosing (empty:
        none). The runner times them on the model (cached per machine) and
        builds the space with :meth:`with_timings`' params instead."""
        return {}

    @classmethod
    def with_timings(cls, params: P, timings: dict[str, dict[int, int]]) -> P:
        """``params`` holding measured nanoseconds per :meth:`timings_needed` key and
        kept count; called only for spaces that asked for timings."""
        raise NotImplementedError(f"{cls.__name__} does not use measured timings")

    @classmethod
    def refined(cls, params: P, factor: int) -> P:
        """``params`` for a grid ``factor`` times finer over the same range (levels
        that round to the same variant merge): the finest grid of a coarse-to-fine
        search, called by the runner before the space exists. Spaces whose levels
        lie on no continuous axis (bits, depth) refuse."""
        grids = [n for n in SPACES.names() if _refinable(SPACES.get(n))]
        raise EvocompError(
            f"space.name={cls.name!r} has no level grid to refine; a coarse-to-fine "
            f"search needs space.name one of: {', '.join(grids)}"
        )

    # -- what every space provides -------------------------------------------------
    def __len__(self) -> int:
        """The number of genes (one per unit unless a space says otherwise)."""
        return len(self.units)

    @abstractmethod
    def n_levels(self, gene: int) -> int:
        """How many levels gene ``gene`` has (levels are 0 .. n-1)."""

    @abstractmethod
    def cost(self, genome: Genome) -> int:
        """The integer cost of ``genome`` (nonzeros, stored bits, removed sublayers...)."""

    @property
    @abstractmethod
    def budget(self) -> int:
        """A valid genome is feasible when ``cost(genome) <= budget``."""

    @abstractmethod
    def uniform(self) -> Genome:
        """The baseline and search start: the same compression everywhere (feasible)."""

    @abstractmethod
    def steps(self, genome: Genome) -> list[Step]:
        """Every smallest change of ``genome`` that keeps it valid, whatever its cost."""

    @abstractmethod
    def mutate(self, genome: Genome, rng: Random, *, switches: int = 1) -> Genome:
        """A feasible neighbour of a feasible ``genome`` (``switches`` small moves)."""

    @abstractmethod
    def repair(self, genome: Genome, rng: Random) -> Genome:
        """Any genome (e.g. after crossover) made feasible and brought up to the budget."""

    def make_valid(self, genome: Genome) -> Genome:
        """Any genome of the right length made valid, budget aside: levels clamped
        into range. Spaces with further validity rules (depth groups) extend it."""
        if len(genome) != len(self):
            raise ValueError(f"genome has {len(genome)} genes, space has {len(self)}")
        return tuple(min(max(0, x), self.n_levels(i) - 1) for i, x in enumerate(genome))

    @abstractmethod
    def placements(self, genome: Genome) -> list[tuple[Unit, VariantKey]]:
        """What ``genome`` puts in the model: ``(unit, database key)`` for every unit
        that leaves the dense model (sublayer units: removed)."""

    @abstractmethod
    def variants(self) -> dict[str, list[VariantKey]]:
        """Every database key each unit may need; units that never leave the dense
        model are absent (an empty dict means no database is needed)."""

    @abstractmethod
    def describe(self, genome: Genome) -> list[dict[str, Any]]:
        """One readable row per unit: name, block, and what the genome does to it."""

    def summary(self, genome: Genome) -> dict[str, Any]:
        """What ``best.json`` shows about ``genome`` as a whole, besides its cost and
        its rows (:meth:`describe`): e.g. the metric expression. Default: nothing."""
        return {}

    # -- shared behaviour ----------------------------------------------------------
    def is_valid(self, genome: Genome) -> bool:
        """Right length and every level in range (budget aside)."""
        return len(genome) == len(self) and all(
            0 <= g < self.n_levels(i) for i, g in enumerate(genome)
        )

    def is_feasible(self, genome: Genome) -> bool:
        return self.is_valid(genome) and self.cost(genome) <= self.budget

    def random(self, rng: Random, *, steps: int | None = None) -> Genome:
        """A random feasible genome: a random walk of mutations from the start, so it
        keeps the start's use of the budget."""
        genome = self.uniform()
        for _ in range(steps if steps is not None else 4 * len(self)):
            genome = self.mutate(genome, rng)
        return genome

    def wander(
        self, genome: Genome, rng: Random, *, steps: int, rise: float = 0.5
    ) -> Genome:
        """A random walk of ``steps`` smallest valid changes (:meth:`steps`) from a
        valid ``genome``, whatever the budget: each one raises the cost with
        probability ``rise`` and lowers it otherwise. A step whose direction has no
        move left (the walk sits at that end) leaves the genome as it is, so
        ``rise=0`` (``1``) with enough steps ends at a cheapest (dearest) genome.
        The unconstrained mutation of multi-objective searches, and, with ``rise``
        drawn in [0, 1], a way to draw genomes over the whole cost range."""
        g = list(genome)
        stuck: set[bool] = set()  # directions with no move from the current g
        for _ in range(steps):
            up = rng.random() < rise
            if up in stuck:
                continue
            step = self._directed_step(g, rng, up)
            if step is None:
                stuck.add(up)
                continue
            for i, lv in step.items():
                g[i] = lv
            stuck.clear()
        return tuple(g)

    def _directed_step(self, g: list[int], rng: Random, up: bool) -> Step | None:
        """A random step of ``g`` that raises (``up``) or lowers its cost, or None."""
        genome = tuple(g)

        def wanted(step: Step) -> bool:
            delta = self._delta(g, step)
            return delta > 0 if up else delta < 0

        # A few random draws usually find one; near an end of the cost range (or where
        # most steps change nothing) the steps are listed and tried in random order,
        # so the cost change is still computed only until one fits.
        for _ in range(_DRAWS):
            step = self.random_step(genome, rng)
            if step is not None and wanted(step):
                return step
        options = self.steps(genome)
        rng.shuffle(options)
        return next((s for s in options if wanted(s)), None)

    def random_step(self, genome: Genome, rng: Random) -> Step | None:
        """One of :meth:`steps` at random, or None when there is none. Spaces that
        can draw one without listing them all override it (:meth:`wander` speed)."""
        options = self.steps(genome)
        return rng.choice(options) if options else None

    def _delta(self, g: Sequence[int], step: Step) -> int:
        """The cost change of applying ``step`` to ``g``; spaces with a local cost
        override this full recomputation."""
        after = list(g)
        for i, lv in step.items():
            after[i] = lv
        return self.cost(tuple(after)) - self.cost(tuple(g))

    @property
    def baseline_name(self) -> str:
        """What :meth:`uniform` is, in reports."""
        return "uniform"

    def check_movable(self) -> None:
        """Fail early when no mutation moves the start genome (a search could never move)."""
        rng = random.Random(0)
        start = self.uniform()
        if all(self.mutate(start, rng) == start for _ in range(200)):
            raise EvocompError(
                f"space {self.name!r} has no budget-preserving level switch: no two units "
                "can trade cost (add more units via units.targets, or more levels)"
            )

    def param_names(self) -> list[str]:
        """One name per gene, for trial stores and Optuna encodings."""
        return [u.name for u in self.units]

    def cost_axis(self) -> CostAxis:
        """How to show this space's cost in plots and reports. The default: sizes per
        searched linear weight (so runs on different models compare), labelled by
        what a weight's size factor measures; raw cost when cost is not a size."""
        if not self.cost_is_size:
            return CostAxis(1.0, "cost")
        weights = sum(u.numel for u in self.units if u.family == "linear")
        return CostAxis(float(weights), "cost per weight")


class LevelSpace(SearchSpace[P]):
    """A space whose cost is a sum of per-gene integer cost tables. Subclasses
    define the levels and their costs; level switches, repair, placements and
    descriptions follow."""

    joinable: ClassVar[bool] = False
    """Whether the space can be a part of a joint space (it has :meth:`size_factor`)."""
    dense_variant: ClassVar[int | None] = None
    """The database key component that leaves a weight as it is (0 zeros, 16 bits):
    a joint space fills it in for this part where another part compresses."""
    size_unit: ClassVar[SizeUnit] = "fraction"
    """What :meth:`size_factor` measures: a kept fraction, or bits per weight."""

    @property
    def trade_share(self) -> float:
        """The share of :meth:`mutate`'s moves that are trades (a random level step,
        then :meth:`repair`) rather than exact level switches: 0 unless a space's
        levels rarely trade exactly (measured latencies, removed sublayers)."""
        return 0.0

    def position(self, gene: int, level: int) -> float:
        """Where ``level`` sits on the gene's continuous axis (the kept share of its
        cost), on which coarse-to-fine lays its grids; spaces with such an axis
        override it with :meth:`grid_step` and :meth:`refined`."""
        raise EvocompError(f"space {self.name!r} has no continuous level axis")

    @property
    def grid_step(self) -> float:
        """The distance between neighbouring levels on the :meth:`position` axis, as
        configured (rounding to computable variants may merge some)."""
        raise EvocompError(f"space {self.name!r} has no continuous level axis")

    # -- what subclasses provide -------------------------------------------------
    @abstractmethod
    def level_cost(self, gene: int, level: int) -> int:
        """The integer cost of gene ``gene`` at ``level``."""

    @abstractmethod
    def variant(self, gene: int, level: int) -> VariantKey | None:
        """The database key of the compressed weight for this level, or ``None``
        when the level leaves the unit as in the dense model."""

    @abstractmethod
    def describe_level(self, gene: int, level: int) -> dict[str, Any]:
        """Readable values of one gene's level (e.g. ``{"sparsity": 0.55}``)."""

    def size_factor(self, gene: int, level: int) -> Fraction:
        """The factor by which ``level`` scales the stored size of the linear weights
        gene ``gene`` covers (kept fraction, bits per weight, 0 when removed). Joint
        spaces multiply their parts' factors; a space without one cannot join."""
        raise EvocompError(f"space {self.name!r} cannot be part of a joint space")

    # -- shared behaviour ----------------------------------------------------------
    def cost_axis(self) -> CostAxis:
        axis = super().cost_axis()
        return CostAxis(axis.scale, SIZE_LABELS[self.size_unit]) if self.cost_is_size else axis

    def cost(self, genome: Genome) -> int:
        return sum(self.level_cost(i, g) for i, g in enumerate(genome))

    def steps(self, genome: Genome) -> list[Step]:
        return [
            {i: g + s}
            for i, g in enumerate(genome)
            for s in (-1, 1)
            if 0 <= g + s < self.n_levels(i)
        ]

    def random_step(self, genome: Genome, rng: Random) -> Step | None:
        """One gene a level up or down (the other way at the end of its range)."""
        for _ in range(_DRAWS):
            i = rng.randrange(len(genome))
            if self.n_levels(i) < 2:
                continue
            level = genome[i] + rng.choice((-1, 1))
            if not 0 <= level < self.n_levels(i):
                level = 2 * genome[i] - level
            return {i: level}
        return super().random_step(genome, rng)  # mostly single-level genes

    def _delta(self, g: Sequence[int], step: Step) -> int:
        return sum(self.level_cost(i, lv) - self.level_cost(i, g[i]) for i, lv in step.items())

    def mutate(self, genome: Genome, rng: Random, *, switches: int = 1) -> Genome:
        """``switches`` moves, each an EvoPress level switch (one gene a level up or
        down and another gene the opposite way by exactly the same cost, so the
        total cost is unchanged; none when no switch exists) or, with probability
        :attr:`trade_share`, a trade: one random level step, then :meth:`repair`
        (random steps down until under the budget, then up while it allows)."""
        trade = self.trade_share
        g = list(genome)
        for _ in range(switches):
            if trade and rng.random() < trade:
                step = self.random_step(tuple(g), rng)
                if step is not None:
                    for i, lv in step.items():
                        g[i] = lv
                g = list(self.repair(tuple(g), rng))
                continue
            for _attempt in range(64):
                if self._switch(g, rng):
                    break
        return tuple(g)

    def _switch(self, g: list[int], rng: Random) -> bool:
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

    def repair(self, genome: Genome, rng: Random) -> Genome:
        """Bring any genome under the budget, then spend what is left: lower
        random genes one level until feasible, then raise random genes one level
        while the budget allows. Used after crossover, and for targets that no
        uniform genome meets."""
        g = list(self.make_valid(genome))
        cost = sum(self.level_cost(i, x) for i, x in enumerate(g))
        order = list(range(len(g)))
        while cost > self.budget:
            i = rng.choice(order)
            # Levels are ordered by cost, but not always downwards: pick the cheaper side.
            options = [x for x in (g[i] - 1, g[i] + 1) if 0 <= x < self.n_levels(i)]
            x = min(options, key=lambda lv: self.level_cost(i, lv), default=g[i])
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

    def describe(self, genome: Genome) -> list[dict[str, Any]]:
        return [
            {"unit": u.name, "block": u.block, "level": g, **self.describe_level(i, g)}
            for i, (u, g) in enumerate(zip(self.units, genome, strict=True))
        ]

    def variants(self) -> dict[str, list[VariantKey]]:
        out: dict[str, list[VariantKey]] = {}
        for i, unit in enumerate(self.units):
            keys = {self.variant(i, lvl) for lvl in range(self.n_levels(i))} - {None}
            if keys:
                out[unit.name] = sorted(k for k in keys if k is not None)
        return out

    def placements(self, genome: Genome) -> list[tuple[Unit, VariantKey]]:
        return [
            (u, key)
            for i, (u, g) in enumerate(zip(self.units, genome, strict=True))
            if (key := self.variant(i, g)) is not None
        ]


def _refinable(cls: type[SearchSpace[Any]]) -> bool:
    return cls.refined.__func__ is not SearchSpace.refined.__func__  # type: ignore[attr-defined]


SPACES: Registry[type[SearchSpace[Any]]] = Registry("space", SearchSpace)
