"""A chain of searches: each runs on the whole space, started at the genome the
one before found (e.g. a GA, which gains fastest in its first tens of thousands of
evaluation tokens, then EvoPress, whose larger last stage picks parents on more
text)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from pydantic import Field

from evocomp.errors import EvocompError
from evocomp.registry import StrictModel
from evocomp.search.base import OPTIMIZERS, GeneratorOptimizer, Optimizer, Request
from evocomp.search.nested import InnerSearch, check_nestable, run_inner
from evocomp.spaces.base import Genome, LevelSpace, SearchSpace
from evocomp.spaces.window import Window


class ChainParams(StrictModel):
    """Options of :class:`Chain`."""

    steps: list[InnerSearch] = Field(
        min_length=2,
        description="the searches to run in order ({name, options} each); each starts from "
        "the genome the one before found",
    )


@OPTIMIZERS.register("chain")
class Chain(GeneratorOptimizer[ChainParams]):
    """The ``steps`` searches one after another on the whole space, each started at
    the best genome of the one before (the first at the uniform genome): every
    step's start is the ``uniform`` genome of its space, scored as such by the step
    (EvoPress scores it on its last stage, the GA puts it in its first population).

    ``best_genome`` is the running step's best (at that step's token budget) once it
    has one, else the best of the step before: scores of different steps may be on
    different text and are never compared. Needs a space of levels; every step must
    keep the budget."""

    name = "chain"
    Params = ChainParams
    composite = True

    def __init__(self, space: SearchSpace[Any], params: ChainParams, *, seed: int = 0) -> None:
        super().__init__(space, params, seed=seed)
        if not isinstance(space, LevelSpace):
            raise EvocompError(f"search.name=chain cannot restart searches on space {space.name!r}")
        self.levels: LevelSpace[Any] = space
        self._seed = seed
        self._current = 0  # the step running
        # Every step as it would start from uniform: their budgets and sizes are
        # known before the search (each is rebuilt around the genome found).
        self._steps = [self._make(i, space.uniform()) for i in range(len(params.steps))]
        for i, step in enumerate(self._steps):
            check_nestable(step, f"search.steps[{i}].name", "chain")

    def _make(self, index: int, start: Genome) -> Optimizer[Any]:
        return self.params.steps[index].build(Window(self.levels, start), seed=self._seed + index)

    @property
    def step(self) -> int:
        """The step running (steps finished, once the chain is over)."""
        return self._current

    @property
    def resamples(self) -> bool:
        return any(step.resamples for step in self._steps)

    def token_budgets(self) -> dict[str, int]:
        return {
            f"steps[{i}].{k}": v
            for i, step in enumerate(self._steps)
            for k, v in step.token_budgets().items()
        }

    def train_budgets(self) -> dict[str, int]:
        return {
            f"steps[{i}].{k}": v
            for i, step in enumerate(self._steps)
            for k, v in step.train_budgets().items()
        }

    @property
    def progress(self) -> tuple[int, int]:
        planned = [max(step.progress[1], 1) for step in self._steps]
        if self._current >= len(self._steps):
            return sum(planned), sum(planned)
        done = min(self._steps[self._current].progress[0], planned[self._current])
        return sum(planned[: self._current]) + done, sum(planned)

    def tell(self, fitness: list[float]) -> None:
        super().tell(fitness)
        # The running step's best so far, so that progress and best.json follow the
        # search within a step too (a new step keeps the last one's until it has one).
        if self._current < len(self._steps):
            inner = self._steps[self._current]
            if inner.best_genome is not None:
                assert isinstance(inner.space, Window)
                self.best_genome = inner.space.lift(inner.best_genome)
                self.best_fitness = inner.best_fitness

    def run(self) -> Generator[list[Request], list[float], None]:
        start = self.levels.uniform()
        for index in range(len(self._steps)):
            if index:
                self._steps[index] = self._make(index, start)
            self._current = index
            inner = self._steps[index]
            found = yield from run_inner(inner)
            if found is not None:
                start = found
                self.best_genome, self.best_fitness = found, inner.best_fitness
        self._current = len(self._steps)
