"""Coarse-to-fine search (Týr-the-Pruner): search a coarse level grid, re-centre
every unit's grid on the level found, halve the step, and search again from the
genome found.

The runner builds the space on the finest grid the iterations reach
(:meth:`~evocomp.spaces.base.SearchSpace.refined`); each iteration's inner
optimizer searches a :class:`~evocomp.spaces.window.Window` of it, and its
requests are lifted to fine genomes, so every iteration's evaluations land in
one trial store and a resumed search replays them all.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from pydantic import Field

from evocomp.errors import EvocompError
from evocomp.registry import StrictModel
from evocomp.search.base import OPTIMIZERS, GeneratorOptimizer, Optimizer, Request
from evocomp.search.nested import InnerSearch, check_nestable, run_inner
from evocomp.spaces.base import LevelSpace, SearchSpace
from evocomp.spaces.window import Window


class CoarseToFineParams(StrictModel):
    """Options of :class:`CoarseToFine`."""

    iterations: int = Field(4, ge=1, le=7, description="searches, the step halving after each")
    levels: int = Field(
        4, ge=1, le=16, description="levels on each side of the centre per iteration"
    )
    inner: InnerSearch = Field(
        default_factory=InnerSearch,
        description="the search each iteration runs ({name, options}); it starts from the "
        "genome found so far",
    )


@OPTIMIZERS.register("coarse-to-fine")
class CoarseToFine(GeneratorOptimizer[CoarseToFineParams]):
    """``iterations`` runs of the inner optimizer, each on a window of ``2·levels+1``
    levels per unit around the genome found so far (first: the uniform start),
    spaced by the space's step (``space.step``), then half of it, and so on: Týr's
    12.5% → 1.5625% in 4 iterations, floored at what the space can compute (one
    head, ``neuron_multiple`` neurons). Needs a space with a level grid to refine
    (width, sparsity) and an inner optimizer that keeps the budget."""

    name = "coarse-to-fine"
    Params = CoarseToFineParams
    composite = True

    @classmethod
    def space_params(
        cls, params: CoarseToFineParams, space: type[SearchSpace[Any]], space_params: Any
    ) -> Any:
        """The finest grid the iterations reach: ``2**(iterations - 1)`` times finer."""
        return space.refined(space_params, 2 ** (params.iterations - 1))

    def __init__(
        self, space: SearchSpace[Any], params: CoarseToFineParams, *, seed: int = 0
    ) -> None:
        super().__init__(space, params, seed=seed)
        if not isinstance(space, LevelSpace):
            raise EvocompError(f"search.name=coarse-to-fine cannot refine space {space.name!r}")
        self.fine: LevelSpace[Any] = space
        self._seed = seed
        self._iteration = 0  # iterations finished
        self._current = 0  # the iteration self._inner runs
        self._inner = self._make_inner(space.uniform(), 0)
        check_nestable(self._inner, "search.inner.name", "coarse-to-fine")

    def _make_inner(self, centre: tuple[int, ...], iteration: int) -> Optimizer[Any]:
        step = self.fine.grid_step / 2**iteration
        window = Window(self.fine, centre, step=step, radius=self.params.levels)
        return self.params.inner.build(window, seed=self._seed + iteration)

    @property
    def iteration(self) -> int:
        """Iterations finished."""
        return self._iteration

    @property
    def resamples(self) -> bool:
        return self._inner.resamples

    def token_budgets(self) -> dict[str, int]:
        return {f"inner.{k}": v for k, v in self._inner.token_budgets().items()}

    def train_budgets(self) -> dict[str, int]:
        return {f"inner.{k}": v for k, v in self._inner.train_budgets().items()}

    @property
    def progress(self) -> tuple[int, int]:
        done, planned = self._inner.progress
        planned = max(planned, 1)
        return self._current * planned + min(done, planned), self.params.iterations * planned

    def run(self) -> Generator[list[Request], list[float], None]:
        centre = self.fine.uniform()
        for iteration in range(self.params.iterations):
            inner = self._inner if iteration == 0 else self._make_inner(centre, iteration)
            self._inner, self._current = inner, iteration
            found = yield from run_inner(inner)
            if found is not None:
                centre = found
                self.consider(centre, inner.best_fitness)
            self._iteration = iteration + 1
