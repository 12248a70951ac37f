"""Runs experiments: builds what a config needs (once), searches, evaluates."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO, Any

import torch
import yaml
from tqdm.auto import tqdm

from evocomp.config import ComponentSpec, Config
from evocomp.errors import EvocompError, choices
from evocomp.evaluators.base import (
    EVALUATORS,
    Evaluator,
    Forward,
    RowSums,
    RowwiseEvaluator,
    forward_logits,
)
from evocomp.evaluators.data import TokenSplits, load_splits, split_tokens
from evocomp.evaluators.metrics import PerplexityEvaluator
from evocomp.evaluators.reference import ReferenceCache
from evocomp.paths import cache_dir
from evocomp.results import pareto_front
from evocomp.search.base import OPTIMIZERS, Optimizer, Request, Training
from evocomp.search.executor import EXECUTORS, Evaluation, Executor
from evocomp.search.store import (
    Claim,
    Job,
    Key,
    Record,
    TrialStore,
    at_final_fidelity,
    check_storage,
    storage_url,
)
from evocomp.spaces.base import SPACES, Genome, SearchSpace
from evocomp.spaces.metric import MetricSpace
from evocomp.spaces.units import Unit
from evocomp.supernet.compressors import COMPRESSORS
from evocomp.supernet.database import (
    DatabaseSpec,
    VariantDatabase,
    build_database,
    open_database,
)
from evocomp.supernet.gradients import cached_gradient_norms
from evocomp.supernet.latency import sublayer_timings
from evocomp.supernet.metric import InvalidMetric, OneShotPruner
from evocomp.supernet.models import LoadedModel, load_model
from evocomp.supernet.outliers import outlier_ratios
from evocomp.supernet.prefix import PrefixCache, block_signature
from evocomp.supernet.sublayers import span_importance
from evocomp.supernet.swap import Swapper
from evocomp.supernet.training import TrainParams, training
from evocomp.supernet.units import find_units

log = logging.getLogger("evocomp")

_ROWS_MEMO = 20_000
"""(genome, row) sums a process keeps (a few MB; an EvoPress stage needs a few dozen)."""


class Experiment:
    """Everything one config needs, each piece built lazily and once: the model,
    its units, the search space, the token splits, the variant database, the
    evaluator and the swapper."""

    def __init__(self, cfg: Config, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.progress = progress

    @cached_property
    def loaded(self) -> LoadedModel:
        log.info("loading model %s", self.cfg.model.name)
        return load_model(self.cfg.model)

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @cached_property
    def units(self) -> list[Unit]:
        queries = SPACES.get(self.cfg.space.name).unit_queries(self.cfg.space.params)
        return find_units(self.model, queries, self.cfg.units.targets, self.cfg.units.ignore)

    @cached_property
    def space(self) -> SearchSpace:
        spec = self.cfg.space
        cls = SPACES.get(spec.name)
        needed = cls.timings_needed(self.units, spec.params)
        if needed:
            timings = sublayer_timings(
                self.model, needed, tokens=self.cfg.data.seq_len, cache=cache_dir() / "latency",
                progress=self.progress,
            )
            params = cls.with_timings(spec.params, timings)
            spec = ComponentSpec.of(SPACES, {"name": spec.name, **params.model_dump(mode="json")})
            # The run directory's config records the timings, so a resume, Ray workers
            # and analysis see the very costs this search uses.
            self.cfg = self.cfg.model_copy(update={"space": spec})
        space = searched_space(self.cfg, self.units)
        wanted = space.compressor_kind
        if wanted is not None:
            have = COMPRESSORS.get(self.cfg.compressor.name).kind
            if have != wanted:
                allowed = [n for n in COMPRESSORS.names() if COMPRESSORS.get(n).kind == wanted]
                raise EvocompError(
                    f"space {spec.name!r} needs a {wanted} compressor ({choices(allowed)}), "
                    f"not compressor.name={self.cfg.compressor.name!r}"
                )
        space.check_movable()
        self._check_variants(space)
        return space

    def _check_variants(self, space: SearchSpace[Any]) -> None:
        variants = space.variants()
        needs = [(u.numel, variants[u.name]) for u in space.units if u.name in variants]
        COMPRESSORS.get(self.cfg.compressor.name).check_variants(self.cfg.compressor.params, needs)

    @cached_property
    def splits(self) -> TokenSplits:
        return load_splits(self.cfg.data, self.loaded.tokenizer)

    def database_spec(self) -> DatabaseSpec:
        spec = self.cfg.compressor
        through = None
        if COMPRESSORS.get(spec.name).needs_start(spec.params):
            through = {u.name: k for u, k in self.space.placements(self.space.uniform())}
        return DatabaseSpec(
            model_fingerprint=self.loaded.fingerprint,
            compressor=spec.name,
            compressor_params=spec.params.model_dump(mode="json"),
            calibration_fingerprint=self.splits.fingerprint("calibration"),
            dtype=self.cfg.model.dtype,
            variants=self.space.variants(),
            through=through,
        )

    def database_root(self, spec: DatabaseSpec) -> Path:
        if self.cfg.database.path:
            return Path(self.cfg.database.path).expanduser()
        return cache_dir() / "databases" / f"{self.cfg.compressor.name}-{spec.key[:16]}"

    @cached_property
    def database(self) -> VariantDatabase | None:
        """The variant database, built first if it is missing or unfinished (its
        units compressed where the executor says: on its Ray workers for ``ray``)."""
        spec = self.database_spec()
        if not spec.variants:
            return None
        root = self.database_root(spec)
        log.info("variant database: %s", root)
        started = time.perf_counter()
        units = [u for u in self.units if u.name in spec.variants]
        gradients = None
        if COMPRESSORS.get(self.cfg.compressor.name).needs_gradients(self.cfg.compressor.params):
            gradients = self.gradients(units)
        executor = self.cfg.executor
        # With executor ray, Ray workers compress the units (started only if a
        # block is left to build).
        with EXECUTORS.get(executor.name).compress_units(executor.params) as compress:
            built = build_database(
                self.model,
                units,
                spec,
                root,
                self.splits.calibration,
                params=self.cfg.compressor.params,
                batch_size=self.cfg.database.batch_size,
                progress=self.progress,
                gradients=gradients,
                compress=compress,
            )
        db = open_database(root, spec, cache_gb=self.cfg.database.cache_gb)
        if built:
            log.info("variant database built in %.1f s: %s", time.perf_counter() - started, root)
        else:
            log.info("reusing variant database %s", root)
        return db

    def gradients(self, units: Sequence[Unit]) -> dict[str, torch.Tensor]:
        """Per-weight gradient norms of ``units`` over the calibration sequences (the
        metric terminal ``G``), computed once per model and calibration split and
        cached on disk."""
        key = hashlib.sha256(
            f"{self.loaded.fingerprint}:{self.splits.fingerprint('calibration')}".encode()
        ).hexdigest()[:20]
        return cached_gradient_norms(
            self.model, units, self.splits.calibration, cache_dir() / "gradients", key,
            progress=self.progress,
        )

    @cached_property
    def swapper(self) -> Swapper | OneShotPruner:
        """What applies a genome: the Swapper assembles level genomes from the variant
        database; metric genomes prune the model one-shot."""
        space = self.space
        if space.genome_kind == "expression":
            assert isinstance(space, MetricSpace)
            return OneShotPruner(
                self.model, space, self.splits.calibration,
                gradients=lambda: self.gradients(space.units),
                batch_size=self.cfg.database.batch_size,
                cache_bytes=int(self.cfg.database.cache_gb * 2**30),
            )
        return Swapper(self.model, space, self.database)

    @cached_property
    def evaluator(self) -> Evaluator[Any]:
        spec = self.cfg.evaluator
        cache = ReferenceCache(
            cache_dir() / "references",
            self.loaded.fingerprint,
            self.splits.fingerprint("search"),
            # A mixture's parts are cached as their own corpora's references are.
            blocks=self.splits.blocks("search"),
        )
        return EVALUATORS.get(spec.name).create(
            self.model, self.splits.search, spec.params, cache=cache, progress=self.progress
        )

    @cached_property
    def prefix(self) -> PrefixCache | None:
        """Prefix reuse for candidates the Swapper assembles and evaluators that take a
        forward; None when ``database.prefix_gb`` is 0 or nothing qualifies."""
        gb = self.cfg.database.prefix_gb
        if not gb or self.space.genome_kind != "levels" or not self.evaluator.takes_forward:
            return None
        return PrefixCache(self.model, forward_logits, max_bytes=int(gb * 2**30))

    def evaluate(
        self, genome: Genome, tokens: int | None, train: Training | None = None, draw: int = 0
    ) -> tuple[dict[str, float], float]:
        """Metrics of ``genome`` on the search tokens (of draw ``draw``, see
        :meth:`order`), and the seconds it took; with ``train``, after fine-tuning it
        on calibration tokens (the weights are as before once it returns), and
        ``train_tokens`` among the metrics."""
        started = time.perf_counter()
        order = self.order(draw)
        # Copied (once) before the candidate is applied: the teacher is the dense model.
        teacher = self.teacher if train is not None and train.loss == "kd" else None
        try:
            scored = self.swapper.scored_as(genome)
            if len(scored) > 1:
                assert train is None, "only level genomes are trained"
                return self._scored_as(scored, tokens, order), time.perf_counter() - started
            if train is None and self._rows_memo is not None:
                return self._by_rows(genome, scored[0][1], tokens, order), (
                    time.perf_counter() - started
                )
            with scored[0][1] as model:
                if train is None:
                    metrics = self.evaluator.evaluate(
                        model, tokens, forward=self._forward(genome), order=order
                    )
                else:
                    metrics = self._trained(model, genome, tokens, train, teacher, order)
        except InvalidMetric as err:
            # A failure of this candidate, not of the search: recorded, worst fitness.
            log.info("%s", err)
            metrics = {type(self.evaluator).metric: math.inf, "invalid": 1.0}
        return metrics, time.perf_counter() - started

    def _forward(self, genome: Genome) -> Forward | None:
        """The forward that scores ``genome`` (applied): prefix reuse when on."""
        if (prefix := self.prefix) is None:
            return None
        return prefix.forward(block_signature(prefix.n_blocks, self.space.placements(genome)))

    @cached_property
    def _rows_memo(self) -> OrderedDict[tuple[Genome, int], RowSums] | None:
        """Each (genome, row)'s sums once scored, when the evaluator's metrics add up
        over rows and a row's score does not depend on the rows batched with it
        (prefix reuse runs rows one at a time; otherwise one row per batch): then a
        memoised row gives the same bits as scoring it again."""
        ev = self.evaluator
        alone = self.prefix is not None or ev.batch_size == 1
        return OrderedDict() if isinstance(ev, RowwiseEvaluator) and alone else None

    def _by_rows(
        self, genome: Genome, applied: AbstractContextManager[torch.nn.Module],
        tokens: int | None, order: list[int] | None,
    ) -> dict[str, float]:
        """``genome``'s metrics from the sums of its rows, scoring (and applying it
        for) only rows this process has not scored for it yet; ``scored_tokens`` is
        what it ran."""
        ev, memo = self.evaluator, self._rows_memo
        assert isinstance(ev, RowwiseEvaluator) and memo is not None
        rows = ev.rows_for(tokens, order)
        new = [r for r in rows if (genome, r) not in memo]
        if new:
            with applied as model:
                sums = ev.row_sums(model, new, forward=self._forward(genome))
            for row, row_sums in zip(new, sums, strict=True):
                memo[genome, row] = row_sums
        for row in rows:
            memo.move_to_end((genome, row))
        while len(memo) > _ROWS_MEMO:
            memo.popitem(last=False)
        seq_len = ev.tokens.shape[1]
        return {
            **ev.combine([memo[genome, r] for r in rows]),
            "scored_tokens": float(len(new) * seq_len),
        }

    def _scored_as(
        self, scored: list[tuple[str, AbstractContextManager[torch.nn.Module]]],
        tokens: int | None, order: list[int] | None,
    ) -> dict[str, float]:
        """A genome scored as several models (a metric at several patterns): each
        model's metrics under ``<metric>@<label>``, and as the fitness the geometric
        mean of the models' metric, which no model's scale can dominate (a ratio
        to any fixed reference ranks alike)."""
        key = type(self.evaluator).metric
        metrics: dict[str, float] = {}
        for label, applied in scored:
            with applied as model:
                metrics[f"{key}@{label}"] = self.evaluator.evaluate(model, tokens, order=order)[key]
        values = [metrics[f"{key}@{label}"] for label, _ in scored]
        metrics[key] = math.prod(values) ** (1 / len(values))
        return metrics

    @cached_property
    def teacher(self) -> torch.nn.Module:
        """A copy of the dense model to distil from, taken once (the model itself
        holds candidates while they train)."""
        return copy.deepcopy(self.model).eval().requires_grad_(False)

    def quantized(self, genome: Genome) -> set[str]:
        """Parameter names ``genome`` puts on a quantization grid (under 16 bits, as
        the space describes each unit), which full fine-tuning must leave as they are."""
        rows = self.space.describe(genome)
        return {f"{r['unit']}.weight" for r in rows if r.get("bits", 16) < 16}

    def _trained(
        self, model: torch.nn.Module, genome: Genome, tokens: int | None, train: Training,
        teacher: torch.nn.Module | None, order: list[int] | None,
    ) -> dict[str, float]:
        kd = teacher is not None
        params = TrainParams(
            tokens=train.tokens, method="full" if train.params == "all" else "lora",
            lr=train.lr, kd_weight=1.0 if kd else 0.0, lm_weight=0.0 if kd else 1.0,
            warmup=0.0, batch_size=self.cfg.evaluator.params.batch_size,
        )
        removed = [u.name for u in self.swapper.removed(genome)]
        with training(
            model, self.splits.calibration, params, removed=removed,
            frozen=self.quantized(genome), teacher=teacher,
        ) as trainer:
            done = trainer.run()
            metrics = self.evaluator.evaluate(model, tokens, order=order)
        return {**metrics, "train_tokens": float(done.tokens)}

    def order(self, draw: int) -> list[int] | None:
        """The search sequences in the order draw ``draw`` scores them: as stored for
        draw 0, else a permutation seeded by the run's seed and the draw, so every
        process (a Ray worker, a resume) scores a draw on the same sequences."""
        if draw == 0:
            return None
        rows = self.splits.search.shape[0]
        return random.Random(f"evocomp-draw:{self.cfg.seed}:{draw}").sample(range(rows), rows)

    def evaluation(self, baseline: dict[str, float] | None = None) -> ExperimentEvaluation:
        """This experiment's scoring as the picklable callable executors map: here
        it uses this experiment; a Ray worker's copy builds its own from the config
        (and hands its evaluator ``baseline``, see :func:`measured_baseline`)."""
        return ExperimentEvaluation(self.cfg, exp=self, baseline=baseline)

    def optimizer(self) -> Optimizer[Any]:
        """A fresh optimizer for this config (seeded: a resumed search replays it)."""
        cfg = self.cfg
        cls = OPTIMIZERS.get(cfg.search.name)
        if cls.genome_kind != self.space.genome_kind:
            searches = [n for n in OPTIMIZERS.names()
                        if OPTIMIZERS.get(n).genome_kind == self.space.genome_kind]
            spaces = [n for n in SPACES.names() if SPACES.get(n).genome_kind == cls.genome_kind]
            raise EvocompError(
                f"search.name={cfg.search.name!r} searches {cls.genome_kind} genomes, "
                f"space.name={cfg.space.name!r} has {self.space.genome_kind} genomes: choose "
                f"search.name one of: {choices(searches)}, or space.name one of: "
                f"{choices(spaces)}"
            )
        optimizer = cls(self.space, cfg.search.params, seed=cfg.seed)
        if not optimizer.budgeted and not self.space.cost_is_size:
            raise EvocompError(
                f"search {cfg.search.name!r} trades cost against quality, but space "
                f"{cfg.space.name!r} counts removed sublayers, not size: use a joint space "
                "(e.g. depth with sparsity) or an optimizer with a budget"
            )
        return optimizer

    def check(self, *, final_eval: bool) -> None:
        """Everything that can go wrong before the search, checked before a run
        directory is created: the model, units, data splits, space, compressor,
        optimizer and its token budgets, the database path and the trial store."""
        cfg = self.cfg
        optimizer = self.optimizer()  # the space, and so the model and units, first
        # Evaluation budgets come from the search split; training-aware selection
        # trains on the calibration split.
        for budgets, split, what in (
            (optimizer.token_budgets(), "search", "search tokens"),
            (optimizer.train_budgets(), "calibration", "calibration tokens candidates train on"),
        ):
            available = getattr(self.splits, split).numel()
            for option, tokens in budgets.items():
                if tokens > available:
                    raise EvocompError(
                        f"search.{option}={tokens} exceeds the {available} {what} "
                        f"(data.{split}={getattr(cfg.data, split)} x data.seq_len="
                        f"{cfg.data.seq_len}); lower it or raise data.{split}"
                    )
        evaluator = EVALUATORS.get(cfg.evaluator.name)
        if optimizer.resamples and not evaluator.resamples(cfg.evaluator.params):
            raise EvocompError(
                f"search.resample needs an evaluator that scores draws of the search "
                f"sequences: evaluator {cfg.evaluator.name!r} does not; choose "
                f"{choices(_resampling_evaluators())} (or a combined of them), or "
                "search.resample: false"
            )
        if final_eval and self.splits.heldout.shape[0] == 0:
            raise EvocompError(
                "data.heldout is 0 but the search ends with a held-out evaluation: "
                "set data.heldout >= 1, or final_eval.enabled: false (or --no-eval)"
            )
        if final_eval:
            # Read now, so a corpus that cannot load (a hub corpus offline) fails
            # before the search rather than after it.
            for name in cfg.final_eval.corpora:
                split_tokens(cfg.data.alone(name), "heldout", self.loaded.tokenizer)
        spec = self.database_spec()
        if spec.variants:
            root = self.database_root(spec)
            if root.exists() and not root.is_dir():
                raise EvocompError(f"database.path {root} is a file, not a directory")
        check_storage(cfg.store.storage)
        EXECUTORS.get(cfg.executor.name).check(cfg.executor.params, device=cfg.model.device)

    def prepare(self, optimizer: Optimizer[Any]) -> None:
        """:func:`prepare_optimizer` on this model and its calibration tokens."""
        prepare_optimizer(optimizer, self.model, self.splits.calibration)


    @contextmanager
    def applied(
        self, genome: Genome | None, *, export: bool = False
    ) -> Iterator[torch.nn.Module]:
        """The model with ``genome`` applied (``None``: the dense model); ``export``
        makes removed sublayers survive ``save_pretrained``."""
        if genome is None:
            yield self.model
        else:
            with self.swapper.apply(genome, export=export) as model:
                yield model

    def heldout(
        self,
        genomes: dict[str, Genome | None],
        *,
        tokens: torch.Tensor | None = None,
        label: str = "held-out",
    ) -> dict[str, dict[str, float]]:
        """Perplexity of each named genome (``None`` = dense) on ``tokens`` (default:
        the held-out split)."""
        tokens = self.splits.heldout if tokens is None else tokens
        if tokens.shape[0] == 0:
            raise EvocompError("data.heldout is 0; held-out evaluation needs sequences")
        ev = PerplexityEvaluator(tokens, batch_size=self.cfg.final_eval.batch_size)
        out = {}
        for name, genome in tqdm(genomes.items(), desc=label, disable=not self.progress):
            with self.applied(genome) as model:
                out[name] = ev.evaluate(model)
            log.info("%s ppl %-9s %.3f", label, name, out[name]["ppl"])
        return out


def searched_space(cfg: Config, units: Sequence[Unit]) -> SearchSpace[Any]:
    """The space ``cfg``'s search runs on: the configured one, with the options its
    optimizer asks for (:meth:`~evocomp.search.base.Optimizer.space_params`)."""
    cls = SPACES.get(cfg.space.name)
    search = cfg.search
    params = OPTIMIZERS.get(search.name).space_params(search.params, cls, cfg.space.params)
    return cls(units, params)


def prepare_optimizer(
    optimizer: Optimizer[Any], model: torch.nn.Module, calibration: torch.Tensor
) -> None:
    """Measure on the dense ``model`` what ``optimizer`` asks for (its
    :meth:`~evocomp.search.base.Optimizer.measurement`) and hand it over, so that
    optimizers never hold a model."""
    wanted = optimizer.measurement()
    measured = None
    if wanted is not None and wanted.kind == "outlier_ratio":
        measured = outlier_ratios(
            model,
            calibration,
            wanted.spans,
            factor=wanted.outlier_factor,
            mean=wanted.outlier_mean,
            batch_size=wanted.batch_size,
        )
    elif wanted is not None:
        measured = span_importance(
            model, calibration, wanted.spans, batch_size=wanted.batch_size
        )
    optimizer.prepare(measured)


def _resampling_evaluators() -> list[str]:
    """Evaluators that score draws of the search sequences at their default options
    (those whose options have no defaults, like combined, depend on them)."""
    out = []
    for name in EVALUATORS.names():
        cls = EVALUATORS.get(name)
        with contextlib.suppress(ValueError):  # pydantic's ValidationError is one
            if cls.resamples(cls.Params()):
                out.append(name)
    return out


class ExperimentEvaluation(Evaluation):
    """Scores genomes for one config: pickles as the config alone, and builds the
    :class:`Experiment` (model, database, dense outputs) where it is first set up
    or called."""

    def __init__(
        self, cfg: Config, *, exp: Experiment | None = None,
        baseline: dict[str, float] | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = cfg.model.device
        self.baseline = baseline
        self._exp = exp

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "device": self.device, "baseline": self.baseline, "_exp": None}

    def setup(self) -> None:
        if self._exp is None:
            self._exp = Experiment(self.cfg, progress=False)
        _ = self._exp.database, self._exp.swapper, self._exp.evaluator
        if self.baseline is not None:
            self._exp.evaluator.set_baseline(self.baseline)

    def __call__(
        self, genome: Genome, tokens: int | None, train: Training | None = None, draw: int = 0
    ) -> tuple[dict[str, float], float]:
        if self._exp is None:  # a copy that was never set up (the hot path skips this)
            self.setup()
        assert self._exp is not None
        return self._exp.evaluate(genome, tokens, train, draw)


# -- run directories ------------------------------------------------------------


@dataclass(frozen=True)
class RunDir:
    """The files of one search run."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def best(self) -> Path:
        return self.path / "best.json"

    @property
    def trials(self) -> Path:
        return self.path / "trials.parquet"

    @property
    def units(self) -> Path:
        return self.path / "units.json"

    @property
    def pareto(self) -> Path:
        return self.path / "pareto.parquet"

    @property
    def eval(self) -> Path:
        return self.path / "eval.json"

    @property
    def log(self) -> Path:
        return self.path / "search.log"

    def has_evaluations(self) -> bool:
        """Whether a search recorded anything here (its default trial stores, its
        tables or its best genome); a directory without is a start that failed."""
        stores = (self.path / "trials.journal", self.path / "trials.db")
        recorded = (self.best, self.trials, self.pareto)
        return any(p.exists() for p in recorded) or any(
            p.exists() and p.stat().st_size > 0 for p in stores
        )


def default_run_dir(cfg: Config) -> Path:
    return Path(cfg.run_dir or Path("runs") / cfg.name)


def prepare_run_dir(cfg: Config, *, resume: bool) -> RunDir:
    """Create the run dir and write the resolved config. A run with evaluations is
    only continued by ``--resume`` (never silently overwritten); a directory that
    holds no evaluation yet (a start that failed) is free to use again."""
    run = RunDir(default_run_dir(cfg))
    if run.path.exists() and not run.path.is_dir():
        raise EvocompError(f"run_dir {run.path} is a file, not a directory")
    if run.config.exists() and not resume and run.has_evaluations():
        raise EvocompError(
            f"run directory {run.path} already holds a run; resume it with "
            f"`evocomp search --resume {run.path}` or choose another run_dir / name"
        )
    try:
        run.path.mkdir(parents=True, exist_ok=True)
        if not resume or not run.config.exists():
            run.config.write_text(yaml.safe_dump(cfg.dump(), sort_keys=False))
    except OSError as err:
        raise EvocompError(f"run_dir {run.path}: cannot create it ({err.strerror})") from None
    return run


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON at ``path``, written atomically (a kill leaves the
    old file or the new one)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


# -- search ---------------------------------------------------------------------


@dataclass(frozen=True)
class SearchResult:
    """The outcome of a search: best genome, its fitness, and what it cost to find."""

    best: Genome
    fitness: float
    evaluations: int
    reused: int
    seconds: float


def search_signature(cfg: Config) -> str:
    """What makes two processes run the same search (and so able to share a study):
    everything that changes which genomes are asked or what they score, and
    nothing about where they run (device, executor, run dir, storage)."""
    dump = cfg.dump()
    same = {
        "seed": dump["seed"],
        "model": {k: dump["model"][k] for k in ("name", "dtype")},
        **{k: dump[k] for k in ("units", "data", "compressor", "space", "evaluator", "search")},
    }
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:16]


class RunLock:
    """A lock file in the run directory (``search.lock``), held shared by every
    search process of the run for its lifetime, so that a starting process knows
    whether it is the run's only live one.

    :meth:`acquire` first tries the lock exclusively. Getting it means every other
    process that searched from this directory has stopped (the kernel drops the
    lock of a killed process), so its open claims in the trial store are dead: the
    store fails them at once (``TrialStore(sole_in_run=True)``) instead of waiting
    out ``store.grace_s``. :meth:`share` then holds the lock shared, beside any
    workers of the run that start later. A gate file (``search.lock.gate``), held
    exclusively for that step only, keeps two starting processes from both
    trying at once and keeps a newcomer out until the old claims are judged.

    The lock file also keeps the run's id, which the store records in each claim
    of this run: only claims bearing it are taken over early. Workers of other
    run directories (other machines on one PostgreSQL study, say) hold other
    locks, so their claims still wait out ``store.grace_s``. A copied run
    directory (a new lock file) gets a new id. Where the filesystem has no
    ``flock``, nothing is taken over early.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "search.lock"
        self.gate_path = run_dir / "search.lock.gate"
        self.sole = False
        """Whether no other process of this run was alive when this one started."""
        self.run_id = ""
        self._fh: IO[str] | None = None
        self._gate: IO[str] | None = None

    def acquire(self) -> RunLock:
        try:
            self._gate = open(self.gate_path, "a")  # noqa: SIM115 (held until share)
            fcntl.flock(self._gate, fcntl.LOCK_EX)
            self._fh = open(self.path, "a+")  # noqa: SIM115 (held until release)
            try:
                fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.sole = True
            except BlockingIOError:  # others hold it shared (and wait at the gate for us)
                fcntl.flock(self._fh, fcntl.LOCK_SH)
            self.run_id = self._id(self._fh)
        except OSError as err:
            log.warning(
                "cannot lock the run directory (%s): claims of stopped processes of this "
                "run are taken over only after store.grace_s", err
            )
            self.release()
            self.sole, self.run_id = False, ""
            return self
        if not self.sole:
            self._leave_gate()
        return self

    def share(self) -> None:
        """Hold the lock shared from now on, letting other processes of the run start."""
        if self.sole and self._fh is not None and self._gate is not None:
            fcntl.flock(self._fh, fcntl.LOCK_SH)
        self._leave_gate()

    def release(self) -> None:
        self._leave_gate()
        if self._fh is not None:
            self._fh.close()  # drops the lock
            self._fh = None

    def _leave_gate(self) -> None:
        if self._gate is not None:
            self._gate.close()
            self._gate = None

    @staticmethod
    def _id(fh: IO[str]) -> str:
        """The run's id, kept with the lock file's inode (a copy gets a new id)."""
        inode = str(os.fstat(fh.fileno()).st_ino)
        fh.seek(0)
        words = fh.read().split()
        if len(words) == 2 and words[1] == inode:
            return words[0]
        run_id = uuid.uuid4().hex[:12]
        fh.truncate(0)
        fh.write(f"{run_id} {inode}\n")
        fh.flush()
        return run_id

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _clear_journal_lock(journal: Path) -> None:
    """A process killed while appending to a journal leaves the journal's lock file
    behind, which Optuna breaks only after 30 s. Called when no process of this run
    is alive, for the run directory's own journal: a lock older than a few seconds
    (an append holds it for milliseconds) is left over, and is removed."""
    lock = journal.with_name(journal.name + ".lock")
    with contextlib.suppress(OSError):
        if time.time() - lock.lstat().st_mtime > 2.0:
            lock.unlink()
            log.info("removed %s, left by a stopped process of this run", lock)


def open_store(exp: Experiment, run: RunDir, lock: RunLock | None = None) -> TrialStore:
    """The run's trial store (``store.storage``; shared when several workers name it).
    With the run's ``lock`` taken alone, claims of the run's stopped processes are
    taken over at once (see :class:`RunLock`)."""
    cfg = exp.cfg
    sole = lock is not None and lock.sole
    if sole and cfg.store.storage == "journal":
        _clear_journal_lock(run.path / "trials.journal")
    return TrialStore(
        storage_url(cfg.store.storage, run.path),
        cfg.store.study or cfg.name,
        unit_names=exp.space.param_names(),
        metric=type(exp.evaluator).metric,
        signature=search_signature(cfg),
        grace_s=cfg.store.grace_s,
        run_id=lock.run_id if lock is not None else "",
        sole_in_run=sole,
    )


class _Evaluations:
    """Turns a batch of requests into records: reused from the store, evaluated by
    this worker's executor, or awaited from the workers that claimed them."""

    def __init__(
        self, exp: Experiment, store: TrialStore, executor: Executor, *, budgeted: bool
    ) -> None:
        self.exp, self.store, self.executor = exp, store, executor
        self.budgeted = budgeted
        self.metric = type(exp.evaluator).metric
        self.uniform = exp.space.uniform()
        self.evaluated = self.reused = 0
        self.train: dict[int, Training | None] = {}  # a token budget's training

    def __call__(self, requests: list[Request], name: str) -> list[Record]:
        space, store = self.exp.space, self.store
        jobs: dict[Key, Job] = {}
        for req in requests:
            self.train[req.tokens] = req.train
            key = (req.genome, req.tokens, req.draw)
            if key in jobs or store.lookup(*key):
                continue
            budgeted = self.budgeted and not req.probe  # probes may leave the budget
            ok = space.is_feasible(req.genome) if budgeted else space.is_valid(req.genome)
            if not ok:
                what = "an infeasible" if budgeted else "an invalid"
                raise RuntimeError(f"{name} asked for {what} genome")
            role = "probe" if req.probe else "candidate"
            role = "baseline" if req.genome == self.uniform else role
            cost = space.cost(req.genome)
            jobs[key] = Job(req.genome, req.tokens, cost, role, req.draw)
        self.reused += len(requests) - len(jobs)
        pending = list(jobs)
        while pending:
            # A few jobs at a time, so that other workers sharing the store take their
            # share of the batch meanwhile (two per executor worker amortise the reads).
            limit = 2 * self.executor.workers
            mine, held = store.claim([jobs[k] for k in pending], limit=limit)
            if mine:
                self._run(mine)
            elif held:  # everything left is being evaluated elsewhere
                store.wait(held)
            pending = [k for k in pending if store.lookup(*k) is None]
        out = []
        for req in requests:
            rec = store.lookup(req.genome, req.tokens, req.draw)
            assert rec is not None
            out.append(rec)
        return out

    def _run(self, claims: list[Claim]) -> None:
        done: set[int] = set()
        try:
            jobs = [
                Request(c.job.genome, c.job.tokens, self.train[c.job.tokens], draw=c.job.draw)
                for c in claims
            ]
            for i, metrics, seconds in self.executor.map(jobs):
                self.store.complete(claims[i], metrics[self.metric], metrics, seconds)
                done.add(i)
                self.evaluated += 1
        finally:  # interrupted or failed: let other workers (or a resume) take the rest
            self.store.release([c for i, c in enumerate(claims) if i not in done])


def run_search(exp: Experiment, run: RunDir) -> SearchResult:
    """Run (or resume, or join) the configured optimizer, recording every evaluation.

    Evaluations already in the trial store are not repeated: the optimizer is
    replayed from its seed and takes stored results, so a killed search resumes
    exactly where it stopped, and workers sharing a store split the work.
    """
    cfg = exp.cfg
    space = exp.space
    # Build everything up front so the search's progress bar measures search alone
    # (and Ray actors find the database and reference logits ready).
    _ = exp.database, exp.swapper, exp.evaluator
    metric = type(exp.evaluator).metric
    optimizer = exp.optimizer()
    exp.prepare(optimizer)
    # What a genome's genes are, so that analysis can rebuild the space without the model.
    write_json(run.units, [dataclasses.asdict(u) for u in exp.units])
    # Held while searching, so that a later --resume knows whether this process lives.
    with RunLock(run.path) as lock:
        store = open_store(exp, run, lock)
        lock.share()
        baseline = measured_baseline(exp, store)
        started = time.perf_counter()
        done, total = optimizer.progress
        bar = tqdm(total=total, initial=done, desc="search", unit="gen", disable=not exp.progress)
        executor = EXECUTORS.get(cfg.executor.name)(
            exp.evaluation(baseline), cfg.executor.params
        )
        evaluations = _Evaluations(exp, store, executor, budgeted=optimizer.budgeted)
        try:
            with store, executor:
                while requests := optimizer.ask():
                    records = evaluations(requests, optimizer.name)
                    optimizer.tell([r.fitness for r in records])
                    if optimizer.progress[0] != bar.n:
                        bar.update(optimizer.progress[0] - bar.n)
                        bar.set_postfix({metric: f"{optimizer.best_fitness:.4f}"})
                        _write_best(run, exp, optimizer, store)
        finally:
            bar.close()
            _write_trials(run, store)
    assert optimizer.best_genome is not None
    _write_best(run, exp, optimizer, store)
    result = SearchResult(
        best=optimizer.best_genome,
        fitness=optimizer.best_fitness,
        evaluations=evaluations.evaluated,
        reused=evaluations.reused,
        seconds=time.perf_counter() - started,
    )
    trained = _spent(store)["training"]
    base = _uniform_fitness(store, space.uniform(), result.best)
    log.info(
        "search done: best %s %.5f (%s %s), %d evaluations here (%d reused) in %.0f s%s",
        metric,
        result.fitness,
        space.baseline_name,
        f"{base:.5f}" if math.isfinite(base) else "not scored on as many tokens",
        result.evaluations,
        result.reused,
        result.seconds,
        f"; candidates trained on {trained} tokens" if trained else "",
    )
    return result


BASELINE_ATTR = "baseline"
"""The trial store's study attribute that keeps what the evaluator measured on the
baseline genome (evaluators that ``needs_baseline``)."""


def measured_baseline(exp: Experiment, store: TrialStore) -> dict[str, float] | None:
    """For an evaluator that :attr:`~evocomp.evaluators.base.Evaluator.needs_baseline`:
    its measurement of the baseline (uniform) genome, handed to it. Measured by the
    first process of a search and kept in the trial store, so a resume, Ray workers
    and other machines sharing the study all use the very same values. None for other
    evaluators."""
    evaluator = exp.evaluator
    if not evaluator.needs_baseline:
        return None
    values = store.study.user_attrs.get(BASELINE_ATTR)
    if values is not None:
        log.info("%s measures recorded: %s", exp.space.baseline_name, values)
        evaluator.set_baseline(values)
        return dict(values)
    with exp.applied(exp.space.uniform()) as model:
        values = evaluator.measure_baseline(model)
    evaluator.set_baseline(values)  # refuses values it cannot use before they are kept
    store.study.set_user_attr(BASELINE_ATTR, values)
    log.info("%s measures: %s", exp.space.baseline_name, values)
    return values


def _write_trials(run: RunDir, store: TrialStore) -> None:
    """trials.parquet (every evaluation) and pareto.parquet (the non-dominated
    cost/fitness trade-offs among evaluations at the largest token budget)."""
    trials = store.to_dataframe()
    trials.to_parquet(run.trials)
    if not trials.empty:
        pareto_front(trials[at_final_fidelity(trials)]).to_parquet(run.pareto)


def _uniform_fitness(store: TrialStore, uniform: Genome, best: Genome) -> float:
    """The baseline's fitness on the most tokens the best genome was scored on, of
    the search sequences in their stored order (NaN when it was not scored there:
    the two would not compare)."""
    records = [r for r in store.records() if r.draw == 0]
    tokens = max((r.tokens for r in records if r.genome == best), default=None)
    recs = [r for r in records if r.genome == uniform and r.tokens == tokens]
    return recs[0].fitness if recs else math.nan


def _spent(store: TrialStore) -> dict[str, int]:
    """What the search has spent so far: tokens scored, and tokens candidates were
    fine-tuned on (training-aware selection)."""
    records = store.records()
    return {
        "evaluation": sum(r.spent for r in records),
        "training": int(sum(r.metrics.get("train_tokens", 0) for r in records)),
    }


def _write_best(run: RunDir, exp: Experiment, optimizer: Optimizer, store: TrialStore) -> None:
    genome = optimizer.best_genome
    if genome is None:
        return
    space = exp.space
    write_json(
        run.best,
        {
            "genome": list(genome),
            "fitness": optimizer.best_fitness,
            "metric": type(exp.evaluator).metric,
            "space": exp.cfg.space.name,
            "cost": space.cost(genome),
            "budget": space.budget,
            "progress": list(optimizer.progress),
            "tokens": _spent(store),
            **space.summary(genome),
            "layers": space.describe(genome),
        },
    )


def load_best(run: RunDir) -> Genome:
    if not run.best.exists():
        raise EvocompError(f"{run.path} has no best.json yet; has the search run?")
    return tuple(json.loads(run.best.read_text())["genome"])


def load_run_config(run_dir: str | Path) -> tuple[Config, RunDir]:
    """The config a run was started with."""
    from evocomp.config import load_config

    run = RunDir(Path(run_dir))
    if not run.config.exists():
        raise EvocompError(f"{run.path} is not a run directory (no config.yaml)")
    cfg = load_config(run.config)
    return cfg.model_copy(update={"run_dir": str(run.path)}), run
