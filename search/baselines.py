"""Depth-pruning baselines as optimizers, so configs can name them and their
evaluations land in the trial store like any search's:

* ``drop-last``: the space's baseline genome (for depth: remove the last sublayers).
* ``sleb``: greedy removal by fitness, one sublayer (or group) at a time (SLEB,
  Song et al., 2024).
* ``shortgpt``: remove the least important sublayers by Block Influence, measured
  once on calibration tokens (ShortGPT, Men et al., 2024).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Generator, Sequence
from typing import Any, TypeVar

from pydantic import Field

from evocomp.errors import EvocompError
from evocomp.registry import StrictModel
from evocomp.search.base import (
    OPTIMIZERS,
    GeneratorOptimizer,
    Measurement,
    OneBudgetParams,
    Optimizer,
    Request,
)
from evocomp.spaces.base import Genome, SearchSpace
from evocomp.spaces.depth import DepthSpace


def _depth_space(space: SearchSpace[Any], optimizer: str) -> DepthSpace:
    if not isinstance(space, DepthSpace):
        raise EvocompError(
            f"optimizer {optimizer!r} removes sublayers; it needs space.name: depth "
            f"(got {space.name!r})"
        )
    return space


class OneShotParams(OneBudgetParams):
    """Options of :class:`OneShot`."""



P = TypeVar("P", bound=OneShotParams)


class OneShot(Optimizer[P]):
    """An optimizer that asks for a single genome once, at ``tokens``, then stops."""

    Params = OneShotParams

    def __init__(self, space: SearchSpace[Any], params: P, *, seed: int = 0) -> None:
        super().__init__(space, params, seed=seed)
        self._done = False

    @abstractmethod
    def genome(self) -> Genome:
        """The one genome this baseline proposes."""

    def ask(self) -> list[Request]:
        return [] if self._done else [Request(self.genome(), self.params.tokens)]

    def tell(self, fitness: list[float]) -> None:
        if self._done:
            raise RuntimeError("the search is over; nothing was asked")
        if len(fitness) != 1:
            raise ValueError(f"expected 1 fitness value, got {len(fitness)}")
        self.best_genome, self.best_fitness = self.genome(), fitness[0]
        self._done = True

    @property
    def progress(self) -> tuple[int, int]:
        return int(self._done), 1


Q = TypeVar("Q", bound=StrictModel)


class Probing(GeneratorOptimizer[Q]):
    """A baseline that derives one genome from probes: requests for valid genomes
    that may leave the budget (:attr:`~evocomp.search.base.Request.probe`), whose
    scores are recorded in the trial store like any evaluation. Run alone it then
    scores that genome; as an EvoPress ``start_from`` seed only :meth:`probe` runs,
    and EvoPress scores the genome among its start genomes."""

    @abstractmethod
    def probe(self) -> Generator[list[Request], list[float], Genome]:
        """Yield batches of probe requests, receive their fitness; return the genome."""

    @abstractmethod
    def probe_budgets(self) -> dict[str, int]:
        """The token budgets :meth:`probe` asks for, by option name."""


@OPTIMIZERS.register("drop-last")
class DropLast(OneShot[OneShotParams]):
    """Evaluates the space's baseline ``uniform()`` genome: for a depth space, the
    last ``remove`` sublayers removed (for other spaces, uniform compression)."""

    name = "drop-last"

    def genome(self) -> Genome:
        return self.space.uniform()


class ShortGPTParams(OneShotParams):
    """Options of :class:`ShortGPT`."""

    batch_size: int = Field(4, ge=1, description="calibration sequences per forward")


@OPTIMIZERS.register("shortgpt")
class ShortGPT(OneShot[ShortGPTParams]):
    """Removes the least important groups (sublayers, blocks or block pairs) by
    ``1 - cos`` between the residual stream before and after each group, measured
    once on calibration tokens by the runner (:meth:`measurement`) and handed to
    :meth:`prepare`. Groups are taken in order of
    importance, skipping any that would break the exact budget or a per-kind quota.
    """

    name = "shortgpt"

    Params = ShortGPTParams

    def __init__(self, space: SearchSpace[Any], params: ShortGPTParams, *, seed: int = 0) -> None:
        super().__init__(space, params, seed=seed)
        self.depth = _depth_space(space, self.name)
        self.importance: list[float] | None = None  # one score per space group
        self._genome: Genome | None = None

    def measurement(self) -> Measurement:
        """The importance of each of the depth space's groups (one span each)."""
        spans = tuple(tuple(self.depth.units[i] for i in grp) for grp in self.depth.groups)
        return Measurement(spans, batch_size=self.params.batch_size)

    def prepare(self, measured: Sequence[float] | None) -> None:
        """Take each group's importance, measured on calibration tokens."""
        if measured is None or len(measured) != len(self.depth.groups):
            raise ValueError(f"shortgpt needs one importance per group ({len(self.depth.groups)})")
        self.importance = list(measured)
        self._genome = None

    def genome(self) -> Genome:
        if self._genome is None:
            if self.importance is None:
                raise RuntimeError("shortgpt needs prepare(importance) first")
            scores = self.importance
            g = self.depth.dense()
            for k in sorted(range(len(scores)), key=lambda k: (scores[k], k)):
                if self.depth.cost(g) == self.depth.budget:
                    break
                if self.depth.can_remove(g, k):
                    g = self.depth.remove_group(g, k)
            assert self.depth.on_budget(g)
            self._genome = g
        return self._genome


class SLEBParams(OneBudgetParams):
    """Options of :class:`SLEB`."""



@OPTIMIZERS.register("sleb")
class SLEB(GeneratorOptimizer[SLEBParams]):
    """Greedy removal: starting from the dense model, each step asks for every genome
    with one more kept group removed (at ``tokens``) and keeps the best, until
    ``remove`` sublayers are gone. Intermediate genomes remove fewer than the
    budget, which the depth space counts as feasible; only the final genome, exactly
    on budget, becomes ``best_genome``."""

    name = "sleb"

    Params = SLEBParams

    def __init__(self, space: SearchSpace[Any], params: SLEBParams, *, seed: int = 0) -> None:
        # Set before super().__init__, which already starts run().
        self.depth = _depth_space(space, self.name)
        self._removed = 0
        super().__init__(space, params, seed=seed)

    @property
    def progress(self) -> tuple[int, int]:
        """(sublayers removed so far, sublayers to remove)."""
        return self._removed, self.depth.budget

    def run(self) -> Generator[list[Request], list[float], None]:
        space, tokens = self.depth, self.params.tokens
        genome, fit = space.dense(), float("inf")
        if space.budget == 0:
            (fit,) = yield [Request(genome, tokens)]
        while space.cost(genome) < space.budget:
            groups = [k for k in range(len(space.groups)) if space.can_remove(genome, k)]
            if not groups:
                raise RuntimeError("no group can be removed on the way to the budget")
            candidates = [space.remove_group(genome, k) for k in groups]
            scores = yield [Request(c, tokens) for c in candidates]
            best = min(range(len(candidates)), key=scores.__getitem__)  # first wins ties
            genome, fit = candidates[best], scores[best]
            self._removed = space.cost(genome)
        self.consider(genome, fit)
