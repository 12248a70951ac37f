"""Model-based search with Optuna's samplers (CMA-ES, TPE, Gaussian process,
NSGA-II, random), driven through ``study.ask()`` / ``study.tell()``;
single-objective under the budget, or multi-objective over quality and cost.

Design
------
* **Encoding.** One ``IntDistribution(0, n_levels - 1)`` per gene, named by
  :meth:`~evocomp.spaces.base.SearchSpace.param_names`: levels are ordered (by
  cost), so an integer keeps neighbouring levels close for TPE and the GP. The
  study lives in memory; the runner records every evaluation in its own trial
  store, and a resumed run rebuilds the study by replay.
* **Two modes** (``objectives``). ``quality`` (the default) minimises fitness
  within the budget; ``quality+cost`` minimises (fitness, cost) with no budget and
  finds a whole front in one run. The mode decides what a proposal becomes and
  what the sampler is told; everything else is shared.
* **quality: repair, and the budget as a constraint.** A sampler proposes any
  levels, so each proposal is repaired
  (:meth:`~evocomp.spaces.base.SearchSpace.repair`: feasible, spending the
  budget, depth groups whole) and the *repaired* genome is what is asked for,
  recorded and scored; nothing infeasible reaches the runner. The sampler is
  told two things. (1) The proposal's trial gets the repaired genome's fitness
  (its objective is "what this proposal becomes") and the constraint
  ``(cost(proposal) - budget) / budget``: positive over budget, so constrained
  TPE and NSGA-II rank over-budget proposals by their excess alone and the GP
  fits a feasibility model: all learn where the budget lies instead of wasting
  proposals on it. (2) When repair changed the genome, the repaired genome is
  added as a trial of its own (feasible, same fitness), so the model also sees
  the point that was really evaluated.
* **quality+cost: valid, not budgeted** (``budgeted`` is False for such a run).
  The study has two directions (minimize, minimize); a proposal is only made
  valid (:meth:`~evocomp.spaces.base.SearchSpace.make_valid`: depth groups
  whole), never moved onto the budget, and its trial is told (fitness, cost) of
  that valid genome, with no constraint (a valid genome that differs from the
  proposal is added as in (2)). TPE, the GP and NSGA-II all take two
  objectives. The ``startup`` first trials are enqueued genomes spread over the
  whole cost range (:func:`~evocomp.search.base.cost_spread`: the uniform
  start, a cheapest and a dearest genome, walks between) instead of random
  proposals, which cluster around the middle of the range and never reach its
  ends. ``front()`` is the non-dominated set of every evaluated genome;
  ``best_genome`` is the best one within the budget (the uniform start is the
  first trial, so one exists).
* **No genome twice.** Proposals whose genome (repaired or made valid) was
  evaluated before are told the known values at once and cost no evaluation;
  proposals that land on a genome already in the batch share its evaluation.
  ``trials`` counts evaluations. A search whose sampler keeps proposing known
  genomes stops early.
* **Start.** The space's uniform genome is enqueued as the first trial (the
  baseline every run records).
* **CMA-ES: small moves from the start** (``sampler: cmaes``, quality only). On a
  compressed LLM the uniform genome is close to the optimum and only small moves
  help (EvoPress's children switch levels of two to six layers). TPE, the GP and
  NSGA-II draw every gene afresh from a per-gene model, which in hundreds of genes
  changes a large share of them at once; measured on SmolLM2 (210 genes, 62
  trials) TPE never left the uniform start. CMA-ES samples a Gaussian around its
  mean, here the uniform genome with a step of ``sigma`` levels (0.25: about 5% of
  the genes move a level before repair), and moves the mean towards its best
  proposals; on the same problem it beat uniform on held-out text on every seed
  (``benchmarks/RESULTS.md``), and on 3-bit allocation too, so it is the default
  for ``objectives: quality``. On a space where uniform is far from good (few genes
  of very unequal importance) TPE does better: the tests show both. Fronts
  (``quality+cost``) default to TPE.
* **Determinism.** Samplers are seeded from the optimizer's seed and repair (and
  the spread start) draw from the optimizer's ``random.Random(seed)``, so the
  same seed and fitness values give the same requests (resume replays them).
  ``batch`` trials are asked before any is told; TPE uses its constant liar and
  the GP its batch acquisition for the ones still running.
* **Optuna 4 and 5.** Optuna 5 takes constraints per trial
  (``Trial.set_constraint``) and deprecates the samplers' ``constraints_func``,
  which optuna 4 needs; both are handled (:data:`_SET_CONSTRAINT`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Generator
from typing import Any, Literal

import optuna
from optuna.distributions import IntDistribution
from optuna.trial import FrozenTrial, Trial
from pydantic import Field, model_validator

from evocomp.search.base import (
    OPTIMIZERS,
    GeneratorOptimizer,
    OneBudgetParams,
    Point,
    Request,
    cost_spread,
    pareto_front,
)
from evocomp.spaces.base import Genome, SearchSpace

_SET_CONSTRAINT = hasattr(Trial, "set_constraint")
"""Optuna >= 5: constraints are set on the trial; before, a ``constraints_func``
reads them back from a user attribute after each trial."""

_CONSTRAINT = "budget"
_USER_ATTR = "evocomp:budget_excess"

_STALE_BATCHES = 16
"""Stop after this many batches' worth of proposals that found no new genome."""


def _budget_constraint(trial: FrozenTrial) -> tuple[float]:
    """Optuna 4's ``constraints_func`` (module level, so samplers stay picklable)."""
    return (trial.user_attrs[_USER_ATTR],)


def _constraint_attrs(value: float) -> dict[str, Any]:
    """The system attributes that hold a constraint for an added trial."""
    return {f"constraints:{_CONSTRAINT}": value} if _SET_CONSTRAINT else {"constraints": (value,)}


class OptunaSearchParams(OneBudgetParams):
    """Options of :class:`OptunaSearch`."""

    sampler: Literal["tpe", "gp", "nsga2", "cmaes", "random"] = Field(
        "cmaes",
        description="cmaes (CmaEsSampler from the uniform start: small moves, for "
        "many genes and a good uniform; objectives quality only), tpe (TPESampler; "
        "the default with objectives quality+cost), gp (GPSampler, small spaces), "
        "nsga2 (NSGAIISampler), random",
    )
    objectives: Literal["quality", "quality+cost"] = Field(
        "quality",
        description="quality: best fitness within the budget; quality+cost: the "
        "fitness-cost front, no budget (requests are valid, not feasible)",
    )
    trials: int = Field(128, ge=1, description="evaluations (distinct genomes)")
    batch: int = Field(8, ge=1, description="trials asked before any is told")
    startup: int = Field(
        16,
        ge=0,
        description="trials before the model (n_startup): random, or with "
        "quality+cost genomes spread over the cost range (cmaes: unused, it starts "
        "at the uniform genome)",
    )
    population: int | None = Field(
        None, ge=2, description="nsga2 and cmaes: trials per generation (default: "
        "50 for nsga2, CMA-ES's 4 + 3 ln(genes) for cmaes)"
    )
    sigma: float = Field(
        0.25, gt=0, description="cmaes: initial step size in levels around the uniform "
        "start (0.25 changes ~5% of the genes per proposal before repair)"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_sampler(cls, data: Any) -> Any:
        # CMA-ES searches one objective; a front gets TPE unless a sampler is named.
        front = isinstance(data, dict) and data.get("objectives") == "quality+cost"
        if front and "sampler" not in data:
            return {**data, "sampler": "tpe"}
        return data

    @model_validator(mode="after")
    def _cmaes_is_single_objective(self) -> OptunaSearchParams:
        if self.sampler == "cmaes" and self.objectives != "quality":
            raise ValueError(
                "sampler 'cmaes' takes one objective: with objectives 'quality+cost' "
                "use sampler 'tpe', 'gp' or 'nsga2'"
            )
        return self


@OPTIMIZERS.register("optuna")
class OptunaSearch(GeneratorOptimizer[OptunaSearchParams]):
    """An Optuna sampler (``cmaes``, ``tpe``, ``gp``, ``nsga2`` or ``random``) over
    the genes' levels. With ``objectives: quality`` proposals are repaired onto the
    budget (and every sampler but CMA-ES learns the budget as a constraint); with
    ``quality+cost`` they are only made valid and the sampler minimises (fitness,
    cost): one run, a whole front (:meth:`front`). See the module docstring for the
    design."""

    name = "optuna"

    Params = OptunaSearchParams

    def __init__(
        self, space: SearchSpace[Any], params: OptunaSearchParams, *, seed: int = 0
    ) -> None:
        super().__init__(space, params, seed=seed)
        # Per run, not per class: the runner reads it from the optimizer.
        self.budgeted = self.params.objectives == "quality"
        # CMA-ES ignores constraints (and warns when given one).
        self._constrained = self.budgeted and self.params.sampler != "cmaes"
        self._seed = seed
        self._fitness: dict[Genome, float] = {}
        self._done = 0
        self.study: optuna.Study | None = None  # set when the search starts
        names = space.param_names()
        if len(set(names)) != len(names):
            names = [f"{i}:{n}" for i, n in enumerate(names)]
        self._names = names
        self._dists = {n: IntDistribution(0, space.n_levels(i) - 1) for i, n in enumerate(names)}

    @property
    def progress(self) -> tuple[int, int]:
        return self._done, self.params.trials

    def front(self) -> list[Point]:
        """Every non-dominated evaluated genome as (genome, fitness, cost), by cost."""
        return pareto_front((g, f, self.space.cost(g)) for g, f in self._fitness.items())

    def _sampler(self) -> optuna.samplers.BaseSampler:
        p, seed = self.params, self._seed
        old_style = self._constrained and not _SET_CONSTRAINT
        extra = {"constraints_func": _budget_constraint} if old_style else {}
        with warnings.catch_warnings():  # optuna 4 flags these arguments experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # optuna 4.9 deprecates CMA-ES's x0 and sigma0 (removal planned for 6, hence
            # optuna<6): nothing else starts it at a given point with a given step.
            warnings.filterwarnings("ignore", "`(x0|sigma0)` has been deprecated", FutureWarning)
            if p.sampler == "tpe":
                return optuna.samplers.TPESampler(
                    seed=seed,
                    n_startup_trials=p.startup,
                    multivariate=True,
                    constant_liar=True,
                    **extra,
                )
            if p.sampler == "gp":
                return optuna.samplers.GPSampler(seed=seed, n_startup_trials=p.startup, **extra)
            if p.sampler == "nsga2":
                return optuna.samplers.NSGAIISampler(
                    seed=seed, population_size=p.population or 50, **extra
                )
            if p.sampler == "cmaes":
                # Optuna maps each gene's levels onto [0, 1], one level = 1/n_levels.
                levels = max(self.space.n_levels(i) for i in range(len(self.space)))
                return optuna.samplers.CmaEsSampler(
                    x0=dict(zip(self._names, self.space.uniform(), strict=True)),
                    sigma0=p.sigma / levels, n_startup_trials=0, seed=seed,
                    popsize=p.population, warn_independent_sampling=False,
                )
            return optuna.samplers.RandomSampler(seed=seed)

    def _excess(self, genome: Genome) -> float:
        budget = self.space.budget
        return (self.space.cost(genome) - budget) / max(abs(budget), 1)

    def _genome(self, proposed: Genome) -> Genome:
        """What a proposal becomes: repaired onto the budget, or only made valid."""
        if self.budgeted:
            return self.space.repair(proposed, self.rng)
        return self.space.make_valid(proposed)

    def _values(self, genome: Genome) -> list[float]:
        """The objective values of an evaluated genome: fitness (and cost)."""
        fitness = self._fitness[genome]
        return [fitness] if self.budgeted else [fitness, float(self.space.cost(genome))]

    def _tell(self, study: optuna.Study, trial: Trial, proposed: Genome, genome: Genome) -> None:
        """Tell ``trial`` (which proposed ``proposed``) the values of ``genome``."""
        if self._constrained:
            excess = self._excess(proposed)
            if _SET_CONSTRAINT:
                trial.set_constraint(_CONSTRAINT, excess)
            else:
                trial.set_user_attr(_USER_ATTR, excess)
        if math.isfinite(self._fitness[genome]):
            study.tell(trial, self._values(genome))
        else:  # e.g. a diverged model: the sampler learns nothing from it
            study.tell(trial, state=optuna.trial.TrialState.FAIL)

    def _add(self, study: optuna.Study, genome: Genome) -> None:
        """Record an evaluated genome that no proposal named exactly."""
        if not math.isfinite(self._fitness[genome]):
            return
        excess = self._excess(genome)
        old_style = self._constrained and not _SET_CONSTRAINT
        study.add_trial(
            optuna.trial.create_trial(
                params=dict(zip(self._names, genome, strict=True)),
                distributions=self._dists,
                values=self._values(genome),
                system_attrs=_constraint_attrs(excess) if self._constrained else {},
                user_attrs={_USER_ATTR: excess} if old_style else {},
            )
        )

    def run(self) -> Generator[list[Request], list[float], None]:
        p = self.params
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # as the trial store does
        directions = ["minimize"] if self.budgeted else ["minimize", "minimize"]
        study = optuna.create_study(directions=directions, sampler=self._sampler())
        self.study = study  # for inspection (plots, tests); rebuilt by every replay
        if p.sampler == "cmaes":  # its start is its mean: nothing random to model first
            first = [self.space.uniform()]
        elif self.budgeted:
            # The sampler's own startup draws each gene uniformly over its levels: after
            # repair, genomes far from anything good, on which TPE then models nothing
            # useful and the search stays at its uniform start. Random walks from uniform
            # (random search's draws) give it a near-budget neighbourhood to model.
            walks = (self.space.random(self.rng) for _ in range(max(p.startup - 1, 0)))
            first = list(dict.fromkeys([self.space.uniform(), *walks]))
        else:  # anchor the front at both ends of the cost range
            first = cost_spread(self.space, self.rng, max(p.startup, 1))
        for genome in first:
            study.enqueue_trial(dict(zip(self._names, genome, strict=True)))
        in_study: set[Genome] = set()  # genomes some trial of the study names exactly
        stale = 0
        while self._done < p.trials and stale < _STALE_BATCHES * p.batch:
            want = min(p.batch, p.trials - self._done)
            pending: list[tuple[Trial, Genome, Genome]] = []
            new: list[Genome] = []
            while len(new) < want and stale < _STALE_BATCHES * p.batch:
                trial = study.ask(self._dists)
                proposed = tuple(int(trial.params[n]) for n in self._names)
                genome = self._genome(proposed)
                in_study.add(proposed)
                if genome in self._fitness:  # known: no evaluation, tell at once
                    self._tell(study, trial, proposed, genome)
                    stale += 1
                    continue
                pending.append((trial, proposed, genome))
                if genome in new:  # shares an evaluation already in this batch
                    stale += 1
                else:
                    new.append(genome)
                    stale = 0
            if not new:
                break
            scores = yield [Request(g, p.tokens) for g in new]
            for g, score in zip(new, scores, strict=True):
                self._fitness[g] = score
                self.consider(g, score)
            self._done += len(new)
            for trial, proposed, genome in pending:
                self._tell(study, trial, proposed, genome)
            for g in new:
                if g not in in_study:
                    self._add(study, g)
                    in_study.add(g)
