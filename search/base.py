"""The optimizer contract: ask for genomes (at a token budget), tell their fitness;
and, for multi-objective optimizers, the quality-cost front (:func:`pareto_front`)
and a start population spread over the cost range (:func:`cost_spread`)."""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import Field, field_validator

from evocomp.registry import Registry, StrictModel
from evocomp.spaces.base import Genome, GenomeKind, SearchSpace
from evocomp.spaces.units import Unit

P = TypeVar("P", bound=StrictModel)


class OneBudgetParams(StrictModel):
    """Options of an optimizer that scores every genome at one token budget."""

    tokens: int = Field(2048, gt=0, description="evaluation tokens per genome")


@dataclass(frozen=True)
class Training:
    """Fine-tune a candidate briefly before it is scored (DarwinLM's training-aware
    selection): ``tokens`` calibration tokens, learning rate ``lr``, optimizer
    ``optimizer`` (``adamw``), on ``params`` (``all`` weights, or ``lora``
    adapters), with ``loss`` ``kd`` (distilled from the dense model) or ``lm`` (the
    next-token loss); the trained weights are discarded after scoring."""

    tokens: int
    lr: float = 1e-5
    optimizer: str = "adamw"
    params: str = "all"
    loss: str = "kd"


class TrainAware(StrictModel):
    """Training-aware selection (DarwinLM): fine-tune every candidate of a stage on
    calibration tokens before scoring it."""

    tokens: list[int] = Field(
        description="training tokens per candidate at each stage (one per stage, growing "
        "as the pool shrinks; DarwinLM: 10000, 50000, 100000, 200000)",
    )
    lr: float = Field(1e-5, gt=0, description="learning rate")
    optimizer: Literal["adamw"] = Field("adamw", description="optimizer (DarwinLM's AdamW)")
    params: Literal["all", "lora"] = Field(
        "all", description="train every weight (DarwinLM) or LoRA adapters over them"
    )
    loss: Literal["kd", "lm"] = Field(
        "kd",
        description="kd: distil from the dense model, as recovery fine-tuning does (a "
        "dense copy kept once per evaluating process); lm: the next-token loss",
    )

    @field_validator("tokens")
    @classmethod
    def _growing(cls, tokens: list[int]) -> list[int]:
        if any(t <= 0 for t in tokens) or tokens != sorted(tokens):
            raise ValueError(f"training tokens must be positive and grow, got {tokens}")
        return tokens

    def budgets(self) -> dict[str, int]:
        """The training tokens by option name, for :meth:`Optimizer.train_budgets`."""
        return {f"train.tokens[{k}]": t for k, t in enumerate(self.tokens)}

    def at(self, stage: int) -> Training:
        """The training of stage ``stage``."""
        return Training(self.tokens[stage], self.lr, self.optimizer, self.params, self.loss)


@dataclass(frozen=True)
class Request:
    """Evaluate ``genome`` on the first ``tokens`` evaluation tokens of draw
    ``draw`` (after ``train``, when given). Within one search a token budget always
    comes with the same training, so ``(genome, tokens, draw)`` identifies an
    evaluation."""

    genome: Genome
    tokens: int
    train: Training | None = None
    probe: bool = False
    """A look at the landscape rather than a candidate: the genome need only be valid
    (``is_valid``), even for a budgeted optimizer, which never keeps it as
    ``best_genome`` (sensitivity probes: one unit moved off the uniform level)."""
    draw: int = 0
    """Which sequences of the search split: 0 their stored order; ``d > 0`` the
    ``d``-th fresh draw (a seeded permutation of them, the same in every process),
    so that a resampling search scores each generation on other text than the last
    (EvoPress samples a new minibatch per selection step)."""


MeasurementKind = Literal["block_influence", "outlier_ratio"]
"""The statistics the runner can measure for an optimizer (:class:`Measurement`)."""


@dataclass(frozen=True)
class Measurement:
    """What an optimizer needs measured on the dense model before it starts: one
    value per span of units, on calibration tokens, ``batch_size`` sequences per
    forward, of the statistic ``kind``:

    * ``block_influence``: ``1 - cos`` between the residual stream before and after
      a span of sublayer units (ShortGPT's importance);
    * ``outlier_ratio``: the share of the Wanda scores ``|W_ij|·‖X_j‖₂`` of every
      linear weight the span covers that exceed ``outlier_factor`` times the mean
      score, the mean over the whole span (``outlier_mean="span"``) or over each
      weight's own layer (``"unit"``): OWL's Layerwise Outlier Distribution.

    Optimizers never hold a model; the runner measures and hands the values to
    :meth:`Optimizer.prepare`."""

    spans: tuple[tuple[Unit, ...], ...]
    batch_size: int = 4
    kind: MeasurementKind = "block_influence"
    outlier_factor: float = 5.0
    outlier_mean: Literal["span", "unit"] = "span"


class Optimizer(ABC, Generic[P]):
    """Ask/tell over genomes; lower fitness is better.

    When each hook is called:

    * ``__init__(space, params, seed=...)``: once per run, and again on resume
      (the optimizer is replayed from its seed).
    * :meth:`measurement`, then :meth:`prepare`: once, before the first
      :meth:`ask`; an optimizer that asks for a measurement gets one value per
      span, the others get ``None``.
    * :meth:`ask`: returns the next batch of requests (empty when the search is
      over); :meth:`tell`: one fitness per request of the last batch, in order.
    * :attr:`progress`, :attr:`best_genome`, :attr:`best_fitness`: read after
      every :meth:`tell` for progress bars and ``best.json``.

    Given the same seed and the same fitness values an optimizer makes the same
    requests, which is what lets a killed search resume from its trial store.
    """

    name: ClassVar[str]
    Params: ClassVar[type[StrictModel]] = StrictModel
    """The options of this optimizer (``search:`` in a config)."""
    genome_kind: ClassVar[GenomeKind] = "levels"
    """The genomes it searches; the runner pairs it only with spaces of the same
    :attr:`~evocomp.spaces.base.SearchSpace.genome_kind`."""
    composite: ClassVar[bool] = False
    """Whether it runs other optimizers (coarse-to-fine, chain): such a search cannot
    be nested in another."""
    budgeted: bool = True
    """Whether every request keeps the space's budget (``is_feasible``; probes,
    :attr:`Request.probe`, need only be valid). Multi-objective
    optimizers set False: they trade cost against quality, so their requests are only
    valid (``is_valid``), and ``best_genome`` is the best one within the budget. A class
    or instance attribute (``OptunaSearch`` decides per run, from its params): read it
    from the optimizer, not its class."""

    @property
    def resamples(self) -> bool:
        """Whether its requests name draws other than 0 (:attr:`Request.draw`): the
        runner then refuses an evaluator that cannot score a draw."""
        return False

    def __init__(self, space: SearchSpace[Any], params: P, *, seed: int = 0) -> None:
        self.space = space
        self.params: P = params
        self.rng = random.Random(seed)
        self.best_genome: Genome | None = None
        self.best_fitness = float("inf")

    @classmethod
    def space_params(cls, params: P, space: type[SearchSpace[Any]], space_params: Any) -> Any:
        """Called by the runner before the space exists, with this optimizer's and the
        space's options: the space options to search with (default: as configured;
        coarse-to-fine asks for the finest grid it reaches)."""
        return space_params

    def measurement(self) -> Measurement | None:
        """What to measure on the dense model before the first :meth:`ask` (``None``:
        nothing, as for most optimizers; ``shortgpt`` asks for span importance,
        ``owl`` for outlier ratios)."""
        return None

    def prepare(self, measured: Sequence[float] | None) -> None:
        """Called once before the first :meth:`ask` with the values of
        :meth:`measurement` (one per span; ``None`` when it asked for nothing).
        Must be deterministic: a resumed search replays it."""
        return None  # most optimizers need nothing from the model

    @abstractmethod
    def ask(self) -> list[Request]: ...

    @abstractmethod
    def tell(self, fitness: list[float]) -> None: ...

    def token_budgets(self) -> dict[str, int]:
        """Every token budget the optimizer will ask for, by its option's name (e.g.
        ``{"stages[1].tokens": 4096}``). Called once before the search, so that a
        budget larger than the search split is refused before anything runs. The
        default serves optimizers whose options are :class:`OneBudgetParams`."""
        if isinstance(self.params, OneBudgetParams):
            return {"tokens": self.params.tokens}
        raise NotImplementedError(f"{type(self).__name__} must name its token budgets")

    @property
    @abstractmethod
    def progress(self) -> tuple[int, int]:
        """(steps done, steps planned), for progress bars."""

    def train_budgets(self) -> dict[str, int]:
        """The calibration tokens each :class:`Training` the optimizer will ask for
        uses, by its option's name; checked against the calibration split before
        the search, like :meth:`token_budgets`. Default: no training."""
        return {}


class GeneratorOptimizer(Optimizer[P]):
    """An optimizer written as a plain loop: ``run()`` yields batches of
    requests and receives their fitness values. The loop starts at the first
    :meth:`ask`, so it sees what :meth:`prepare` received."""

    def __init__(self, space: SearchSpace[Any], params: P, *, seed: int = 0) -> None:
        super().__init__(space, params, seed=seed)
        self._loop = self.run()
        self._pending: list[Request] | None = None
        self._started = False

    @abstractmethod
    def run(self) -> Generator[list[Request], list[float], None]: ...

    def _start(self) -> None:
        # Lazily, so that run() sees what prepare() measured.
        if not self._started:
            self._started = True
            self._pending = next(self._loop, None)

    def ask(self) -> list[Request]:
        self._start()
        return list(self._pending or [])

    def tell(self, fitness: list[float]) -> None:
        self._start()
        if self._pending is None:
            raise RuntimeError("the search is over; nothing was asked")
        if len(fitness) != len(self._pending):
            raise ValueError(f"expected {len(self._pending)} fitness values, got {len(fitness)}")
        try:
            self._pending = self._loop.send(fitness)
        except StopIteration:
            self._pending = None

    def consider(self, genome: Genome, fitness: float) -> None:
        """Keep ``genome`` as the best when it beats it (and, for an unbudgeted
        optimizer, is within the budget)."""
        if fitness < self.best_fitness and (self.budgeted or self.space.is_feasible(genome)):
            self.best_genome, self.best_fitness = genome, fitness


T = TypeVar("T")

Point = tuple[Genome, float, int]
"""An evaluated genome on the quality-cost plane: (genome, fitness, cost), both minimised."""


def pareto_front(points: Iterable[tuple[T, float, int]]) -> list[tuple[T, float, int]]:
    """The non-dominated points, by cost (ties of both objectives all kept): no other
    point is at most as bad in fitness and cost and better in one. Non-finite
    fitness (a diverged model) is never on the front. A point is (what, fitness,
    cost), usually a :data:`Point`."""
    ordered = sorted((p for p in points if math.isfinite(p[1])), key=lambda p: (p[2], p[1]))
    front: list[tuple[T, float, int]] = []
    best = math.inf  # lowest fitness among strictly cheaper points
    for _, group in groupby(ordered, key=lambda p: p[2]):
        same_cost = list(group)
        lowest = same_cost[0][1]
        if lowest < best:
            front.extend(p for p in same_cost if p[1] == lowest)
            best = lowest
    return front


def cost_spread(space: SearchSpace[Any], rng: random.Random, n: int) -> list[Genome]:
    """Up to ``n`` distinct valid genomes spread over the whole cost range, budget
    aside: the uniform start, a cheapest and a dearest genome (walks of
    :meth:`~evocomp.spaces.base.SearchSpace.wander` long enough to cross the whole
    range), and walks from the start rising with probabilities evenly spaced in
    [0, 1] (half as long: their ends then spread evenly when the start sits
    mid-range); walks of random rise replace duplicates. Seeds the first
    population of multi-objective searches."""
    start = space.uniform()
    span = sum(space.n_levels(i) - 1 for i in range(len(space)))
    half = max(span // 2, 1)
    out = dict.fromkeys(
        [start, *(space.wander(start, rng, steps=span, rise=r) for r in (0.0, 1.0))]
    )
    inner = max(n - 3, 0)
    for k in range(inner):
        out[space.wander(start, rng, steps=half, rise=(k + 1) / (inner + 1))] = None
    for _ in range(20 * n):  # small spaces and crowded ends repeat genomes
        if len(out) >= n:
            break
        out[space.wander(start, rng, steps=half, rise=rng.random())] = None
    return list(out)[:n]


OPTIMIZERS: Registry[type[Optimizer[Any]]] = Registry("optimizer", Optimizer)
