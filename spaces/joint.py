"""Joint spaces: several spaces searched together under one budget.

Design
------
* **A product of spaces.** ``space: {name: joint, spaces: [{name: sparsity, ...},
  {name: bits, ...}]}``: the genome is the parts' genomes one after another, so
  every part keeps its own levels, validity rules (depth groups) and readable
  levels. Composition is generic: any parts with a :meth:`~SearchSpace.size_factor`
  combine; no class per pair.
* **One cost: the stored size of the searched linear weights.** Each linear
  weight ("atom") costs ``numel × Π factors`` over the genes that cover it: kept
  fraction (sparsity), bits per weight (bits), 0/1 alive (depth: a removed
  sublayer's linears cost nothing). So sparsity × bits counts stored bits
  (nonzeros × bits), depth × sparsity counts kept parameters, and all three
  count stored bits of what is left. Factors are exact fractions and every atom
  cost is an integer.
* **One budget.** ``target`` is the joint cost per searched weight (bits per
  weight when a bits part is present, else the kept fraction); by default the
  budget is the cost of the parts' own starts combined (50% sparsity at 4 bits:
  2 bits per weight). The parts' own budgets no longer bind: the search may,
  say, remove more sublayers and prune the rest less.
* **Moves.** A part's ``steps`` (one level ±1; a depth group toggled) change the
  joint cost by amounts that rarely cancel *across* parts, so a pure exact
  switch could never trade sparsity for depth. A mutation is therefore either an
  exact switch (a step and a partner step with the opposite cost change) or a
  trade (a random step, then random cost-lowering steps until feasible); after
  either, random cost-raising steps spend what fits. Every genome a mutation or
  :meth:`repair` returns is feasible and *maximal*: no single step that raises
  the cost fits the budget any more.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from fractions import Fraction
from itertools import product
from typing import Any

from pydantic import Field, ValidationError, field_validator

from evocomp.errors import EvocompError, choices
from evocomp.registry import StrictModel
from evocomp.spaces.base import (
    KEY_ORDER,
    SIZE_LABELS,
    SPACES,
    CostAxis,
    Genome,
    LevelSpace,
    SearchSpace,
    Step,
)
from evocomp.spaces.units import Unit, UnitQuery, VariantKey


def _part_classes() -> list[str]:
    """The spaces that can join: level spaces with a size factor."""
    return [
        n
        for n in SPACES.names()
        if issubclass(cls := SPACES.get(n), LevelSpace) and cls.joinable
    ]


def _parse_part(part: dict[str, Any]) -> tuple[type[LevelSpace[Any]], StrictModel]:
    """A part spec ``{name, ...options}`` as its space class and validated options."""
    cls = SPACES.get(part["name"])
    assert issubclass(cls, LevelSpace)  # _part_classes() let only level spaces in
    return cls, cls.Params(**{k: v for k, v in part.items() if k != "name"})


class JointParams(StrictModel):
    """Options of the ``joint`` space."""

    spaces: list[dict[str, Any]] = Field(
        description="the parts: [{name: sparsity|bits|depth, ...their options}]"
    )
    target: float | None = Field(
        None,
        gt=0,
        description="joint cost per searched weight (bits per weight with a bits part, "
        "else kept fraction); default: the parts' starts combined",
    )
    trade: float = Field(
        0.5, ge=0, le=1, description="share of moves that trade cost between genes freely"
    )
    seed: int = Field(0, description="seed of the repaired start when target is given")

    @field_validator("spaces")
    @classmethod
    def _parts(cls, parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if len(parts) < 2:
            raise ValueError("a joint space needs at least two parts")
        names = []
        for k, part in enumerate(parts):
            name = part.get("name")
            if name not in _part_classes():
                raise ValueError(f"spaces[{k}].name={name!r}: choose {choices(_part_classes())}")
            if name in names:
                raise ValueError(f"spaces[{k}]: {name!r} appears twice")
            names.append(name)
            try:
                part_cls, options = _parse_part(part)
            except ValidationError as err:
                errs = "; ".join(
                    f"spaces[{k}]{''.join('.' + str(x) for x in e['loc'])}: {e['msg']}"
                    for e in err.errors()
                )
                raise ValueError(errs) from None
            kind = part_cls.compressor_kind_for(options)
            if kind is not None and kind not in KEY_ORDER:
                # A joint key combines one component per kind of KEY_ORDER; another
                # kind's keys (GGUF type ids) would be read as zero counts or bitwidths.
                raise ValueError(
                    f"spaces[{k}]: with these options the {name} space's levels are {kind} "
                    f"compressor variants, which a joint space cannot combine (it combines "
                    f"{' and '.join(KEY_ORDER)} variants); search it alone (space.name: {name})"
                )
        if all(SPACES.get(n).unit_family != "linear" for n in names):
            raise ValueError("a joint space needs a part over linear layers")
        return parts


@SPACES.register("joint")
class JointSpace(SearchSpace[JointParams]):
    """Parts searched together under one stored-size budget (see the module docstring)."""

    name = "joint"
    Params = JointParams

    def __init__(self, units: Sequence[Unit], params: JointParams) -> None:
        self.params = params
        self.parts: list[LevelSpace[Any]] = []
        for part in params.spaces:
            cls, options = _parse_part(part)
            self.parts.append(cls([u for u in units if u.family == cls.unit_family], options))
        super().__init__([u for p in self.parts for u in p.units], params)
        self._offsets = [0]
        for p in self.parts:
            self._offsets.append(self._offsets[-1] + len(p))
        # gene -> (part index, gene within the part)
        self._where: list[tuple[int, int]] = [
            (k, local) for k, p in enumerate(self.parts) for local in range(len(p))
        ]
        self._build_atoms()
        start = tuple(g for p in self.parts for g in p.uniform())
        total = sum(u.numel for u in self.atoms)
        if params.target is None:
            self._budget = self.cost(start)
            self._start = start
        else:
            self._budget = int(params.target * total)
            self._start = self.repair(start, random.Random(params.seed))

    # -- construction ------------------------------------------------------------------
    def _build_atoms(self) -> None:
        """Atoms are the linear units of the linear parts; each gene covers the atoms
        it sizes (its own linear, or every linear inside a sublayer)."""
        atoms: dict[str, Unit] = {}
        for p in self.parts:
            for u in p.units:
                if u.family == "linear":
                    atoms.setdefault(u.name, u)
        self.atoms: tuple[Unit, ...] = tuple(atoms.values())
        index = {u.name: a for a, u in enumerate(self.atoms)}
        self._covers: list[list[int]] = []
        for u in self.units:
            if u.family == "sublayer":
                prefix = u.name + "."
                self._covers.append([a for n, a in index.items() if n.startswith(prefix)])
            else:
                self._covers.append([index[u.name]])
        self._genes_of: list[list[int]] = [[] for _ in self.atoms]
        for gene, covered in enumerate(self._covers):
            for a in covered:
                self._genes_of[a].append(gene)
        # Per atom, the genes of the linear parts: they choose its stored weight.
        self._linear_genes: list[list[int]] = [
            [g for g in genes if self.units[g].family == "linear"]
            for genes in self._genes_of
        ]
        self._atom_costs: dict[tuple[int, tuple[int, ...]], int] = {}

    def split(self, genome: Genome) -> list[Genome]:
        """The parts' genomes."""
        return [tuple(genome[a:b]) for a, b in zip(self._offsets, self._offsets[1:], strict=False)]

    @classmethod
    def unit_queries(cls, params: JointParams) -> tuple[UnitQuery, ...]:
        """The units the parts search: linear layers narrowed by ``units.targets``,
        and every sublayer when a part searches sublayers (depth)."""
        families = {_parse_part(part)[0].unit_family for part in params.spaces}
        return tuple(
            UnitQuery(family, filtered=family == "linear")
            for family in ("linear", "sublayer")
            if family in families
        )

    # -- cost ------------------------------------------------------------------------------
    def _atom_cost(self, atom: int, levels: tuple[int, ...]) -> int:
        key = (atom, levels)
        hit = self._atom_costs.get(key)
        if hit is None:
            size = Fraction(self.atoms[atom].numel)
            for gene, level in zip(self._genes_of[atom], levels, strict=True):
                k, local = self._where[gene]
                size *= self.parts[k].size_factor(local, level)
            if size.denominator != 1:
                raise EvocompError(f"joint cost of {self.atoms[atom].name} is not an integer")
            hit = self._atom_costs[key] = int(size)
        return hit

    def _levels(self, genome: Sequence[int], atom: int) -> tuple[int, ...]:
        return tuple(genome[g] for g in self._genes_of[atom])

    def cost(self, genome: Genome) -> int:
        return sum(self._atom_cost(a, self._levels(genome, a)) for a in range(len(self.atoms)))

    def _delta(self, g: Sequence[int], step: Step) -> int:
        """Cost change of applying ``step`` to ``g``."""
        atoms = {a for gene in step for a in self._covers[gene]}
        after = dict(step)
        delta = 0
        for a in atoms:
            genes = self._genes_of[a]
            new = tuple(after.get(x, g[x]) for x in genes)
            delta += self._atom_cost(a, new) - self._atom_cost(a, self._levels(g, a))
        return delta

    @property
    def budget(self) -> int:
        return self._budget

    def per_weight(self, genome: Genome) -> float:
        """Joint cost per searched weight (bits per weight, or kept fraction)."""
        return self.cost(genome) / sum(u.numel for u in self.atoms)

    # -- genomes ---------------------------------------------------------------------------
    def n_levels(self, gene: int) -> int:
        k, local = self._where[gene]
        return self.parts[k].n_levels(local)

    def uniform(self) -> Genome:
        return self._start

    @property
    def baseline_name(self) -> str:
        if self.params.target is not None:
            return "start"
        names = {p.baseline_name for p in self.parts}
        return "uniform" if names == {"uniform"} else "+".join(p.baseline_name for p in self.parts)

    @property
    def compressor_kind(self) -> str | None:  # type: ignore[override]
        kinds = {p.compressor_kind for p in self.parts} - {None}
        # One canonical name per combination, whatever the parts' order.
        return "+".join(k for k in KEY_ORDER if k in kinds) or None

    def cost_axis(self) -> CostAxis:
        """Cost per searched linear weight: stored bits when a part counts bits,
        else the kept fraction."""
        unit = "bits" if any(p.size_unit == "bits" for p in self.parts) else "fraction"
        return CostAxis(float(sum(u.numel for u in self.atoms)), SIZE_LABELS[unit])

    def is_valid(self, genome: Genome) -> bool:
        return len(genome) == len(self) and all(
            p.is_valid(part) for p, part in zip(self.parts, self.split(genome), strict=True)
        )

    def steps(self, genome: Genome) -> list[Step]:
        out: list[Step] = []
        for p, part, offset in zip(self.parts, self.split(genome), self._offsets, strict=False):
            out.extend({offset + i: lv for i, lv in s.items()} for s in p.steps(part))
        return out

    def make_valid(self, genome: Genome) -> Genome:
        """Each part's genome made valid by its own rules (levels clamped, depth
        groups whole), budget aside."""
        if len(genome) != len(self):
            raise ValueError(f"genome has {len(genome)} genes, space has {len(self)}")
        return tuple(
            g
            for p, part in zip(self.parts, self.split(genome), strict=True)
            for g in p.make_valid(part)
        )

    def random_step(self, genome: Genome, rng: random.Random) -> Step | None:
        """A random step of one part, the part drawn in proportion to its genes."""
        gene = rng.randrange(len(self))
        k, _ = self._where[gene]
        a, b = self._offsets[k], self._offsets[k + 1]
        step = self.parts[k].random_step(tuple(genome[a:b]), rng)
        return None if step is None else {a + i: lv for i, lv in step.items()}

    def _apply(self, g: list[int], step: Step) -> None:
        for i, lv in step.items():
            g[i] = lv

    def mutate(self, genome: Genome, rng: random.Random, *, switches: int = 1) -> Genome:
        """``switches`` moves (exact switches or trades, see the module docstring),
        then spend what fits."""
        g = list(genome)
        for _ in range(switches):
            for _attempt in range(16):
                trade = rng.random() < self.params.trade
                if (self._trade if trade else self._switch)(g, rng):
                    break
        self._fill(g, rng)
        return tuple(g)

    def _switch(self, g: list[int], rng: random.Random) -> bool:
        first = rng.choice(self.steps(tuple(g)))
        delta = self._delta(g, first)
        if delta == 0:
            return False
        before = list(g)
        self._apply(g, first)
        partners = [
            s
            for s in self.steps(tuple(g))
            if not s.keys() & first.keys() and self._delta(g, s) == -delta
        ]
        if not partners:
            g[:] = before
            return False
        self._apply(g, rng.choice(partners))
        return True

    def _trade(self, g: list[int], rng: random.Random) -> bool:
        first = rng.choice(self.steps(tuple(g)))
        before = list(g)
        self._apply(g, first)
        if not self._lower(g, rng, frozen=frozenset(first)):
            g[:] = before
            return False
        return g != before

    def _lower(
        self, g: list[int], rng: random.Random, frozen: frozenset[int] = frozenset()
    ) -> bool:
        """Random cost-lowering steps (not touching ``frozen``) until ``g`` fits."""
        cost = self.cost(tuple(g))
        while cost > self._budget:
            options = [
                (s, d)
                for s in self.steps(tuple(g))
                if not s.keys() & frozen and (d := self._delta(g, s)) < 0
            ]
            if not options:
                return False
            s, d = rng.choice(options)
            self._apply(g, s)
            cost += d
        return True

    def _fill(self, g: list[int], rng: random.Random) -> None:
        """Random cost-raising steps while one fits, so nothing is left unspent."""
        cost = self.cost(tuple(g))
        while True:
            options = [
                (s, d)
                for s in self.steps(tuple(g))
                if 0 < (d := self._delta(g, s)) <= self._budget - cost
            ]
            if not options:
                return
            s, d = rng.choice(options)
            self._apply(g, s)
            cost += d

    def repair(self, genome: Genome, rng: random.Random) -> Genome:
        """Levels clamped and depth groups made whole, then random cost-lowering
        steps until feasible, then raising steps while one fits."""
        g = list(self.make_valid(genome))
        if not self._lower(g, rng):
            raise EvocompError(
                f"space 'joint': the budget ({self._budget}) is below its cheapest genome"
            )
        self._fill(g, rng)
        return tuple(g)

    def random(self, rng: random.Random, *, steps: int | None = None) -> Genome:
        """Random levels for every gene, repaired: feasible and maximal. With
        ``steps``, a random walk of that many mutations from the start instead."""
        if steps is not None:
            return super().random(rng, steps=steps)
        return self.repair(tuple(rng.randrange(self.n_levels(i)) for i in range(len(self))), rng)

    def is_maximal(self, genome: Genome) -> bool:
        """Feasible, and no single cost-raising step fits the budget any more."""
        if not self.is_feasible(genome):
            return False
        left = self._budget - self.cost(genome)
        g = list(genome)
        return not any(0 < self._delta(g, s) <= left for s in self.steps(genome))

    # -- what a genome puts in the model -----------------------------------------------
    def _atom_key(self, atom: int, levels: Sequence[int]) -> VariantKey | None:
        """The database key of one linear given the levels of its linear genes: the
        part's own key, or, when several parts compress it, one component per
        compressor kind in :data:`KEY_ORDER` (``(zeros, bits)``), each part that
        leaves the weight alone giving its ``dense_variant``."""
        keys: dict[str | None, tuple[VariantKey | None, LevelSpace[Any]]] = {}
        for gene, level in zip(self._linear_genes[atom], levels, strict=True):
            k, local = self._where[gene]
            part = self.parts[k]
            keys[part.compressor_kind] = (part.variant(local, level), part)
        if len(keys) == 1:
            ((key, _),) = keys.values()
            return key
        if all(key is None for key, _ in keys.values()):
            return None
        combined: list[int] = []
        for kind in KEY_ORDER:
            if kind in keys:
                key, part = keys[kind]
                component = part.dense_variant if key is None else key
                if not isinstance(component, int):
                    raise EvocompError(f"space {part.name!r} cannot share a weight's variant")
                combined.append(component)
        return tuple(combined)

    def _removed(self, genome: Genome, atom: int) -> bool:
        return any(
            self.units[gene].family == "sublayer" and genome[gene]
            for gene in self._genes_of[atom]
        )

    def placements(self, genome: Genome) -> list[tuple[Unit, VariantKey]]:
        out: list[tuple[Unit, VariantKey]] = [
            (u, 1)
            for u, g in zip(self.units, genome, strict=True)
            if u.family == "sublayer" and g
        ]
        for a, atom in enumerate(self.atoms):
            if self._removed(genome, a):
                continue  # its sublayer is skipped: no weight needed
            key = self._atom_key(a, [genome[g] for g in self._linear_genes[a]])
            if key is not None:
                out.append((atom, key))
        return out

    def variants(self) -> dict[str, list[VariantKey]]:
        out: dict[str, list[VariantKey]] = {}
        for a, atom in enumerate(self.atoms):
            ranges = (range(self.n_levels(g)) for g in self._linear_genes[a])
            keys = {self._atom_key(a, combo) for combo in product(*ranges)} - {None}
            if keys:
                out[atom.name] = sorted(k for k in keys if k is not None)  # type: ignore[type-var]
        return out

    def describe(self, genome: Genome) -> list[dict[str, Any]]:
        """One row per linear weight with every dimension: its level values in each
        linear part, whether its sublayer is removed, and its joint cost."""
        rows = []
        for a, atom in enumerate(self.atoms):
            row: dict[str, Any] = {"unit": atom.name, "block": atom.block}
            for gene in self._genes_of[a]:
                k, local = self._where[gene]
                row.update(self.parts[k].describe_level(local, genome[gene]))
            row["cost"] = self._atom_cost(a, self._levels(genome, a))
            rows.append(row)
        return rows

    def param_names(self) -> list[str]:
        return [f"{p.name}:{u.name}" for p in self.parts for u in p.units]
