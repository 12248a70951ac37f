"""A window on a fine level grid: the few levels around a centre genome that one
iteration of coarse-to-fine search (Týr-the-Pruner) chooses from.

Genomes of a :class:`Window` index its own short level lists; :meth:`Window.lift`
turns them into genomes of the fine space, which is what trial stores, the
database and the model see, so evaluations of every iteration are comparable
and shared.
"""

from __future__ import annotations

from typing import Any

from evocomp.spaces.base import Genome, LevelSpace
from evocomp.spaces.units import VariantKey


class Window(LevelSpace[Any]):
    """Per gene, the levels of ``fine`` nearest the positions ``centre ± k·step``
    (``k = 0..radius``, on :meth:`~LevelSpace.position`'s axis), merged where they
    round to the same level, or without a ``step`` every level of ``fine``; costs,
    variants and the budget are the fine space's, and :meth:`uniform` is the centre.

    ``centre`` must be a feasible genome of ``fine``."""

    def __init__(
        self, fine: LevelSpace[Any], centre: Genome, *, step: float | None = None,
        radius: int = 0,
    ) -> None:
        super().__init__(fine.units, fine.params)
        if not fine.is_feasible(centre):
            raise ValueError("the centre of a window must be a feasible genome of the fine space")
        self.fine = fine
        self.name = fine.name
        self.compressor_kind = fine.compressor_kind
        self.cost_is_size = fine.cost_is_size
        self.step = step
        self._levels: list[list[int]] = []
        for gene, c in enumerate(centre):
            options = range(fine.n_levels(gene))
            if step is None:  # the whole space, started at the centre (a chain's steps)
                self._levels.append(list(options))
                continue
            at = [fine.position(gene, lv) for lv in options]
            wanted = [at[c] + k * step for k in range(-radius, radius + 1)]
            # Nearest fine level per wanted position; ties go to the later level, as
            # spaces list levels cheapest first.
            chosen = {min(options, key=lambda lv: (abs(at[lv] - w), -lv)) for w in wanted}
            self._levels.append(sorted(chosen | {c}))
        self._start = self.lower(centre)

    def lift(self, genome: Genome) -> Genome:
        """The fine-space genome of a window genome."""
        return tuple(levels[g] for levels, g in zip(self._levels, genome, strict=True))

    def lower(self, genome: Genome) -> Genome:
        """The window genome of a fine-space genome whose levels the window holds."""
        return tuple(levels.index(g) for levels, g in zip(self._levels, genome, strict=True))

    def fine_levels(self, gene: int) -> list[int]:
        """The fine levels gene ``gene`` may take in this window."""
        return list(self._levels[gene])

    # -- the LevelSpace contract, on the fine space's levels ------------------------
    def n_levels(self, gene: int) -> int:
        return len(self._levels[gene])

    def level_cost(self, gene: int, level: int) -> int:
        return self.fine.level_cost(gene, self._levels[gene][level])

    def variant(self, gene: int, level: int) -> VariantKey | None:
        return self.fine.variant(gene, self._levels[gene][level])

    def describe_level(self, gene: int, level: int) -> dict[str, Any]:
        return self.fine.describe_level(gene, self._levels[gene][level])

    def position(self, gene: int, level: int) -> float:
        return self.fine.position(gene, self._levels[gene][level])

    @property
    def grid_step(self) -> float:
        return self.fine.grid_step if self.step is None else self.step

    @property
    def trade_share(self) -> float:
        return self.fine.trade_share

    @property
    def budget(self) -> int:
        return self.fine.budget

    def uniform(self) -> Genome:
        """The centre."""
        return self._start
