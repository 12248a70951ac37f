"""One-shot allocations: where to compress, decided once from a measurement of the
model, as strong baselines and as EvoPress start genomes (``start_from``).

* ``owl``: Outlier-Weighted Layerwise sparsity (Yin et al., 2024). Blocks whose
  Wanda scores hold more outliers keep more weights.
* ``sensitivity``: each unit's fitness with that unit alone moved off the uniform
  level, then the allocation minimising the sum of those increases under the
  budget, by dynamic programming (SPDY, and the OBC / ZipLM line).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from evocomp.errors import EvocompError, choices
from evocomp.registry import StrictModel
from evocomp.search.base import OPTIMIZERS, Measurement, Request
from evocomp.search.baselines import OneShot, OneShotParams, Probing
from evocomp.spaces.base import SPACES, Genome, LevelSpace, SearchSpace

# -- what a space must offer ------------------------------------------------------


def has_axis(cls: type[SearchSpace[Any]]) -> bool:
    """Whether the space's levels lie on a kept-share axis (:meth:`LevelSpace.position`)."""
    return issubclass(cls, LevelSpace) and cls.position is not LevelSpace.position


def combines_freely(cls: type[SearchSpace[Any]]) -> bool:
    """Whether the space's cost is a sum over genes whose levels combine freely (any
    level of any gene is valid with any other: no groups, as depth has)."""
    return issubclass(cls, LevelSpace) and cls.is_valid is SearchSpace.is_valid


def _level_space(
    space: SearchSpace[Any], optimizer: str, capable: Callable[[type[SearchSpace[Any]]], bool],
    what: str,
) -> LevelSpace[Any]:
    if not capable(type(space)):
        names = [n for n in SPACES.names() if capable(SPACES.get(n))]
        raise EvocompError(
            f"search.name={optimizer!r} needs {what}: space.name one of: {choices(names)} "
            f"(got {space.name!r})"
        )
    assert isinstance(space, LevelSpace)
    return space


# -- OWL -------------------------------------------------------------------------


def owl_offsets(ratios: Sequence[float], lam: float) -> list[float]:
    """OWL's per-block offsets of the kept share from the uniform one: outlier
    ratios min-max normalised onto ``[0, 2·lam]``, minus their mean, so they average
    0 and span exactly ``2·lam`` (all 0 when every ratio is equal). A block's
    sparsity is the target minus its offset."""
    lo, hi = min(ratios), max(ratios)
    if hi == lo:
        return [0.0] * len(ratios)
    scaled = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    mean = sum(scaled) / len(scaled)
    return [s - mean for s in scaled]


def _cheaper(space: LevelSpace[Any], gene: int, level: int) -> int | None:
    """The neighbouring level that costs less (the dearer of two such), or None."""
    here = space.level_cost(gene, level)
    options = [lv for lv in (level - 1, level + 1) if 0 <= lv < space.n_levels(gene)]
    options = [lv for lv in options if space.level_cost(gene, lv) < here]
    return max(options, key=lambda lv: space.level_cost(gene, lv), default=None)


def _dearer(space: LevelSpace[Any], gene: int, level: int) -> int | None:
    """The neighbouring level that costs more (the cheaper of two such), or None."""
    here = space.level_cost(gene, level)
    options = [lv for lv in (level - 1, level + 1) if 0 <= lv < space.n_levels(gene)]
    options = [lv for lv in options if space.level_cost(gene, lv) > here]
    return min(options, key=lambda lv: space.level_cost(gene, lv), default=None)


def _settle(
    space: LevelSpace[Any], g: list[int], wanted: Sequence[float], genes: list[int], target: int
) -> None:
    """Step levels of ``genes`` (in place) until they cost at most ``target``, then
    as close below it as single steps get: down, the gene furthest above its
    wanted position first; up, the gene furthest below it."""

    def error(i: int) -> tuple[float, int]:
        return space.position(i, g[i]) - wanted[i], -i  # ties: the lower gene

    cost = sum(space.level_cost(i, g[i]) for i in genes)
    while cost > target:
        down = [i for i in genes if _cheaper(space, i, g[i]) is not None]
        if not down:
            raise EvocompError(f"space {space.name!r}: the budget is below its cheapest genome")
        i = max(down, key=error)
        lv = _cheaper(space, i, g[i])
        assert lv is not None
        cost += space.level_cost(i, lv) - space.level_cost(i, g[i])
        g[i] = lv
    while True:
        up = [
            (i, lv)
            for i in genes
            if (lv := _dearer(space, i, g[i])) is not None
            and cost + space.level_cost(i, lv) - space.level_cost(i, g[i]) <= target
        ]
        if not up:
            return
        i, lv = min(up, key=lambda m: (error(m[0])[0], m[0]))
        cost += space.level_cost(i, lv) - space.level_cost(i, g[i])
        g[i] = lv


def nearest_on_budget(space: LevelSpace[Any], wanted: Sequence[float]) -> Genome:
    """The feasible genome nearest the kept shares ``wanted`` (one per gene, on
    :meth:`~LevelSpace.position`'s axis). Each gene takes its nearest level; then,
    within each class of genes with identical cost tables, the genes whose rounding
    error is largest step a level until the class costs what it costs in the
    uniform genome (equal tables trade exactly, so with evenly spaced levels, as in
    the sparsity space, every class lands on it); budget that classes leave goes,
    step by step, to the genes furthest below their wanted share."""
    n = len(space)

    def nearest(i: int) -> int:  # ties: the lower level
        return min(range(space.n_levels(i)), key=lambda lv: abs(space.position(i, lv) - wanted[i]))

    g = [nearest(i) for i in range(n)]
    start = space.uniform()
    classes: dict[tuple[int, ...], list[int]] = {}
    for i in range(n):
        table = tuple(space.level_cost(i, lv) for lv in range(space.n_levels(i)))
        classes.setdefault(table, []).append(i)
    for genes in classes.values():
        _settle(space, g, wanted, genes, sum(space.level_cost(i, start[i]) for i in genes))
    _settle(space, g, wanted, list(range(n)), space.budget)
    genome = tuple(g)
    assert space.is_feasible(genome)
    return genome


class OWLParams(OneShotParams):
    """Options of :class:`OWL`."""

    lam: float = Field(
        0.08, gt=0.0, le=0.5,
        description="λ: block sparsities spread over 2λ around the target (OWL: 0.08)",
    )
    m: float = Field(
        5.0, gt=0.0, description="M: a Wanda score is an outlier above M times the mean (OWL: 5)"
    )
    mean: Literal["block", "layer"] = Field(
        "block",
        description="the mean an outlier is compared with: its whole block's (OWL's code) "
        "or its own layer's",
    )
    batch_size: int = Field(4, ge=1, description="calibration sequences per forward")


@OPTIMIZERS.register("owl")
class OWL(OneShot[OWLParams]):
    """Outlier-Weighted Layerwise sparsity (Yin et al., 2024): per block, the share
    D of the Wanda scores ``|W_ij|·‖X_j‖₂`` of its units that exceed M times the
    mean, measured once on calibration tokens run through the dense model (the
    runner measures, :meth:`measurement`); D min-max normalised onto ``[0, 2λ]``
    and centred is each block's kept share above the uniform one, so blocks rich
    in outliers are pruned less. Each unit then takes the level nearest its
    block's share, and the genome is settled onto the budget
    (:func:`nearest_on_budget`). Works on any space with a kept-share axis
    (sparsity; width, where the units are sublayers and the outliers those of the
    linears inside them)."""

    name = "owl"
    Params = OWLParams

    def __init__(self, space: SearchSpace[Any], params: OWLParams, *, seed: int = 0) -> None:
        super().__init__(space, params, seed=seed)
        self.levels = _level_space(space, self.name, has_axis, "levels on a kept-share axis")
        self.blocks = sorted({u.block for u in self.levels.units})
        self.ratios: list[float] | None = None  # one outlier ratio per block
        self._genome: Genome | None = None

    def measurement(self) -> Measurement:
        """The outlier ratio of each block's units (one span per block)."""
        spans = tuple(tuple(u for u in self.levels.units if u.block == b) for b in self.blocks)
        return Measurement(
            spans,
            batch_size=self.params.batch_size,
            kind="outlier_ratio",
            outlier_factor=self.params.m,
            outlier_mean="span" if self.params.mean == "block" else "unit",
        )

    def prepare(self, measured: Sequence[float] | None) -> None:
        """Take each block's outlier ratio, measured on calibration tokens."""
        if measured is None or len(measured) != len(self.blocks):
            raise ValueError(f"owl needs one outlier ratio per block ({len(self.blocks)})")
        self.ratios = list(measured)
        self._genome = None

    def shares(self) -> list[float]:
        """Each gene's wanted kept share before rounding: its uniform level's share
        plus its block's offset (:func:`owl_offsets`)."""
        if self.ratios is None:
            raise RuntimeError("owl needs prepare(outlier ratios) first")
        offsets = dict(zip(self.blocks, owl_offsets(self.ratios, self.params.lam), strict=True))
        start = self.levels.uniform()
        return [
            self.levels.position(i, start[i]) + offsets[u.block]
            for i, u in enumerate(self.levels.units)
        ]

    def genome(self) -> Genome:
        if self._genome is None:
            self._genome = nearest_on_budget(self.levels, self.shares())
        return self._genome


# -- sensitivity -----------------------------------------------------------------


def knapsack(
    space: LevelSpace[Any], increase: Sequence[Mapping[int, float]], *, resolution: int
) -> Genome:
    """The feasible genome minimising ``sum(increase[i][level_i])``, each gene at
    one of the levels its mapping lists (which must include its uniform level).

    A multiple-choice knapsack solved by dynamic programming over the cost change
    from the uniform genome, counted in buckets of ``q = ceil(range / resolution)``
    (``range``: the sum of every gene's cost spread; ``q = 1``, exact, when
    ``range <= resolution``). Each level's change is rounded up to whole buckets,
    so the solution never exceeds the budget; the budget this rounding leaves is
    then spent by single-level moves that lower the sum, best first, while the
    exact cost allows. Ties go to the dearer genome (more of the budget used), then
    to lower levels. Time and memory are ``genes × (resolution + genes)``."""
    n = len(space)
    start = space.uniform()
    options = [sorted(inc) for inc in increase]
    if any(start[i] not in inc for i, inc in enumerate(increase)):
        raise ValueError("every gene's options must include its uniform level")
    base = [space.level_cost(i, start[i]) for i in range(n)]
    delta = [[space.level_cost(i, lv) - base[i] for lv in opts] for i, opts in enumerate(options)]
    spread = sum(max(d) - min(d) for d in delta)
    q = max(1, -(-spread // resolution))
    steps = [[-(-d // q) for d in ds] for ds in delta]  # ceil: never under-counts a cost
    cap = (space.budget - sum(base)) // q
    lo, hi = sum(min(s) for s in steps), sum(max(s) for s in steps)
    size = hi - lo + 1
    best = np.full(size, np.inf)
    best[-lo] = 0.0  # index = bucket sum - lo
    choice = np.zeros((n, size), dtype=np.int16)
    for i in range(n):
        cand = np.full((len(options[i]), size), np.inf)
        for k, (lv, s) in enumerate(zip(options[i], steps[i], strict=True)):
            value = increase[i][lv]
            if s >= 0:
                cand[k, s:] = best[: size - s] + value
            else:
                cand[k, : size + s] = best[-s:] + value
        choice[i] = cand.argmin(axis=0)
        best = cand[choice[i], np.arange(size)]
    top = min(cap, hi) - lo  # the last index within the budget
    idx = top - int(np.argmin(best[: top + 1][::-1]))  # ties: the dearest
    g = list(start)
    for i in reversed(range(n)):
        k = int(choice[i, idx])
        g[i] = options[i][k]
        idx -= steps[i][k]
    assert idx == -lo
    _improve(space, g, increase)
    genome = tuple(g)
    assert space.is_feasible(genome)
    return genome


def _improve(space: LevelSpace[Any], g: list[int], increase: Sequence[Mapping[int, float]]) -> None:
    """Single-level moves (in place) that lower the sum and keep the exact cost
    within the budget, the one lowering it most first, until none is left."""
    cost = space.cost(tuple(g))
    while True:
        moves = [
            (value - inc[g[i]], i, lv)
            for i, inc in enumerate(increase)
            for lv, value in inc.items()
            if value < inc[g[i]]
            and cost + space.level_cost(i, lv) - space.level_cost(i, g[i]) <= space.budget
        ]
        if not moves:
            return
        _, i, lv = min(moves)
        cost += space.level_cost(i, lv) - space.level_cost(i, g[i])
        g[i] = lv


class SensitivityParams(StrictModel):
    """Options of :class:`Sensitivity`."""

    tokens: int = Field(
        512, gt=0,
        description="evaluation tokens per probe (one unit off the uniform level)",
    )
    final_tokens: int = Field(
        2048, gt=0, description="evaluation tokens of the chosen allocation"
    )
    radius: int | None = Field(
        2, ge=1,
        description="probe the levels within this many of each unit's uniform level "
        "(null: every level); the allocation uses only probed levels",
    )
    resolution: int = Field(
        10_000, ge=10, le=100_000,
        description="buckets of the cost range the knapsack works on (the leftover "
        "budget is spent exactly afterwards); memory and time grow with it",
    )


@OPTIMIZERS.register("sensitivity")
class Sensitivity(Probing[SensitivityParams]):
    """Per-unit sensitivity allocation (SPDY, the OBC / ZipLM line): one batch of
    probes at ``tokens``, the uniform genome and every genome with one unit moved
    to another level (within ``radius``) and the rest uniform, all recorded in the
    trial store; the increase of each probe's fitness over the uniform one is
    taken as additive, and the allocation minimising its sum under the budget is
    found by dynamic programming (:func:`knapsack`), then scored at
    ``final_tokens``. A probe that diverged (non-finite fitness) rules its level
    out. Works on spaces whose cost is a sum over genes that combine freely
    (sparsity, bits, width)."""

    name = "sensitivity"
    Params = SensitivityParams

    def __init__(
        self, space: SearchSpace[Any], params: SensitivityParams, *, seed: int = 0
    ) -> None:
        self.levels = _level_space(
            space, self.name, combines_freely, "a cost summed over freely combined levels"
        )
        self._stage = 0  # 1: probes scored, 2: the allocation scored
        super().__init__(space, params, seed=seed)

    def token_budgets(self) -> dict[str, int]:
        return {"tokens": self.params.tokens, "final_tokens": self.params.final_tokens}

    def probe_budgets(self) -> dict[str, int]:
        return {"tokens": self.params.tokens}

    @property
    def progress(self) -> tuple[int, int]:
        """(probes scored, then the allocation scored: 0..2, 2)."""
        return self._stage, 2

    def options(self, gene: int) -> list[int]:
        """The levels gene ``gene`` is probed at (and may take): within ``radius``."""
        centre, r = self.levels.uniform()[gene], self.params.radius
        levels = range(self.levels.n_levels(gene))
        return [lv for lv in levels if r is None or abs(lv - centre) <= r]

    def probe(self) -> Generator[list[Request], list[float], Genome]:
        start = self.levels.uniform()
        moves = [(i, lv) for i in range(len(start)) for lv in self.options(i) if lv != start[i]]
        genomes = [start] + [start[:i] + (lv,) + start[i + 1 :] for i, lv in moves]
        scores = yield [Request(g, self.params.tokens, probe=True) for g in genomes]
        self._stage = 1
        base = scores[0]
        if not math.isfinite(base):  # nothing to measure increases against
            return start
        increase: list[dict[int, float]] = [{lv: 0.0} for lv in start]
        for (i, lv), score in zip(moves, scores[1:], strict=True):
            increase[i][lv] = score - base if math.isfinite(score) else math.inf
        return knapsack(self.levels, increase, resolution=self.params.resolution)

    def run(self) -> Generator[list[Request], list[float], None]:
        genome = yield from self.probe()
        (fitness,) = yield [Request(genome, self.params.final_tokens)]
        self.consider(genome, fitness)
        self._stage = 2
