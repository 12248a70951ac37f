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
from dataclasses import replace
from typing import Any

from pydantic import ConfigDict, Field, ValidationError, model_validator

from evocomp.errors import EvocompError, choices
from evocomp.registry import StrictModel
from evocomp.search.base import OPTIMIZERS, GeneratorOptimizer, Optimizer, Request
from evocomp.spaces.base import LevelSpace, SearchSpace
from evocomp.spaces.window import Window


class InnerSearch(StrictModel):
    """The optimizer each iteration runs: ``{name: <optimizer>, <its options>...}``."""

    model_config = ConfigDict(extra="allow")
    name: str = "evopress"

    @model_validator(mode="after")
    def _known(self) -> InnerSearch:
        self.params()  # unknown names and bad options fail when the config is read
        return self

    def params(self) -> StrictModel:
        """The inner optimizer's validated options."""
        allowed = [n for n in OPTIMIZERS.names() if n != CoarseToFine.name]
        if self.name not in allowed:
            raise ValueError(f"unknown inner optimizer {self.name!r}; allowed: {choices(allowed)}")
        cls = OPTIMIZERS.get(self.name)
        try:
            return cls.Params(**(self.model_extra or {}))
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                for e in err.errors()
            )
            raise ValueError(f"bad options for inner optimizer {self.name!r}: {problems}") from None


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
        if not self._inner.budgeted:
            raise EvocompError(
                f"search.inner.name={params.inner.name!r} trades cost against quality; "
                "coarse-to-fine nests only optimizers that keep the budget"
            )
        if self._inner.measurement() is not None:
            raise EvocompError(
                f"search.inner.name={params.inner.name!r} measures the model first "
                "(start_from); coarse-to-fine cannot nest it"
            )

    def _make_inner(self, centre: tuple[int, ...], iteration: int) -> Optimizer[Any]:
        step = self.fine.grid_step / 2**iteration
        self.window = Window(self.fine, centre, step=step, radius=self.params.levels)
        cls = OPTIMIZERS.get(self.params.inner.name)
        return cls(self.window, self.params.inner.params(), seed=self._seed + iteration)

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
            self._inner, window, self._current = inner, self.window, iteration
            inner.prepare(None)
            while requests := inner.ask():
                scores = yield [replace(r, genome=window.lift(r.genome)) for r in requests]
                inner.tell(scores)
            if inner.best_genome is not None:
                centre = window.lift(inner.best_genome)
                self.consider(centre, inner.best_fitness)
            self._iteration = iteration + 1
