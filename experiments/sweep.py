"""Sweeps: many searches run as Ray Tune trials, one search per trial.

A sweep file names a base config, fixed ``--set`` style overrides, and either a
grid (the cartesian product of values per config key) or an Optuna study over
some keys. Every search gets its own run directory under ``<root>/runs/``, named
after its overrides, so an interrupted sweep continues each search from its trial
store; ``<root>/results.parquet`` and ``results.md`` hold one row per search.

```yaml
name: targets
base: quickstart
set: {search.generations: 5}
grid: {space.target: [0.4, 0.5, 0.6], seed: [0, 1]}
resources: {cpu: 1, gpu: 0}
```
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pandas as pd
import yaml
from pydantic import Field, ValidationError, model_validator

from evocomp.config import (
    BUILTIN_CONFIGS,
    Config,
    format_validation_error,
    load_config,
    read_yaml,
    resolve_config_path,
    resolve_yaml,
)
from evocomp.errors import EvocompError, choices
from evocomp.registry import StrictModel
from evocomp.results import markdown_table
from evocomp.search.executor import forwarded_env, start_ray

log = logging.getLogger("evocomp")

BUILTIN_SWEEPS = BUILTIN_CONFIGS / "sweeps"

SEARCH_METRICS = ("fitness", "cost", "budget", "evaluations", "new_evaluations", "seconds")
"""What every finished search reports (``ppl.<name>`` too, after a held-out evaluation)."""


# -- the sweep file ----------------------------------------------------------------


class Resources(StrictModel):
    """What Ray reserves for one search (one trial)."""

    cpu: float = Field(1, gt=0, description="CPUs per search; also its torch threads")
    gpu: float = Field(0, ge=0, description="GPUs per search (fractions share a GPU)")


class OptunaParam(StrictModel):
    """One searched config key: a range ``{low, high, log?, type?}`` (``high``
    included) or ``{choices: [...]}``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    type: Literal["int", "float"] = "float"
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> OptunaParam:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices is empty")
            bad = [c for c in self.choices if not isinstance(c, (str, int, float, bool))]
            if bad:  # Optuna's categorical distribution holds scalars only
                raise ValueError(f"choices must be numbers, strings or booleans, not {bad[0]!r}")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (or choices)")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        if self.type == "int" and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError("type: int needs whole-number low and high")
        return self

    def corners(self) -> list[Any]:
        """The values checked before the sweep starts: the ends of a range, every choice."""
        if self.choices is not None:
            return list(self.choices)
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def domain(self) -> Any:
        """The Ray Tune search domain."""
        from ray import tune

        if self.choices is not None:
            return tune.choice(self.choices)
        assert self.low is not None and self.high is not None
        if self.type == "int":  # Tune's integer ranges exclude high
            make = tune.lograndint if self.log else tune.randint
            return make(int(self.low), int(self.high) + 1)
        return (tune.loguniform if self.log else tune.uniform)(self.low, self.high)


class OptunaSweep(StrictModel):
    """An Optuna study (Ray Tune's ``OptunaSearch``, TPE) over config keys."""

    trials: int = Field(ge=1, description="searches to run")
    metric: str = Field(
        "fitness",
        description=f"what to optimise: {', '.join(SEARCH_METRICS)} or ppl.searched, ...",
    )
    mode: Literal["min", "max"] = "min"
    params: dict[str, OptunaParam] = Field(min_length=1)
    seed: int = Field(0, description="the sampler's seed")

    @model_validator(mode="after")
    def _check_metric(self) -> OptunaSweep:
        if self.metric not in SEARCH_METRICS and not self.metric.startswith("ppl."):
            raise ValueError(
                f"unknown metric {self.metric!r}; allowed: {choices(SEARCH_METRICS)} or "
                "ppl.<name> (ppl.dense, ppl.searched, ... after the held-out evaluation)"
            )
        return self


class SweepConfig(StrictModel):
    """A sweep file: many searches of one base config, as Ray Tune trials."""

    name: str = Field(description="the sweep's name; default root runs/sweeps/<name>")
    base: str = Field("quickstart", description="config file or built-in config name")
    set: dict[str, Any] = Field(
        default_factory=dict, description="overrides every search gets (key: value, as --set)"
    )
    grid: dict[str, list[Any]] | None = Field(
        None, description="config key -> values; one search per combination"
    )
    optuna: OptunaSweep | None = None
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: int | None = Field(
        None, ge=1, description="searches at once; default: as many as resources allow"
    )
    address: str | None = Field(
        None, description="null: start a local Ray; 'auto' or 'ray://host:port': a cluster"
    )
    root: str | None = Field(None, description="default: runs/sweeps/<name>")

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        if (self.grid is None) == (self.optuna is None):
            raise ValueError("give exactly one of grid (every combination) or optuna (a study)")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, '.', '_', '-'")
        varied = list(self.grid or {}) + list(self.optuna.params if self.optuna else {})
        for key in [*self.set, *varied]:
            if key == "run_dir" or key.startswith("run_dir."):
                raise ValueError("run_dir is set by the sweep (<root>/runs/<search>)")
        both = sorted(set(self.set) & set(varied))
        if both:
            raise ValueError(f"{choices(both)} both fixed (set) and swept")
        for key, values in (self.grid or {}).items():
            if not values:
                raise ValueError(f"grid.{key} has no values")
            dumped = [json.dumps(v, sort_keys=True) for v in values]
            if len(set(dumped)) != len(dumped):
                raise ValueError(f"grid.{key} lists a value twice")
        return self


def resolve_sweep_path(spec: str | Path) -> Path:
    """A sweep YAML path, or the name of a built-in sweep (``sparsity_targets``)."""
    return resolve_yaml(spec, BUILTIN_SWEEPS, "sweep")


def load_sweep(spec: str | Path) -> SweepConfig:
    """Read and validate a sweep file (or built-in sweep name)."""
    path = resolve_sweep_path(spec)
    data = read_yaml(path, holds="sweep settings (name, base, set, grid or optuna, ...)")
    data = {"base": "quickstart", **data}
    base = Path(str(data["base"])).expanduser()
    # A relative base is looked up beside the sweep file first, then as usual.
    if not base.is_absolute() and (path.parent / base).is_file():
        data["base"] = str((path.parent / base).resolve())
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as err:
        raise EvocompError(
            f"invalid sweep {path}: {format_validation_error(err, SweepConfig)}"
        ) from None


def sweep_root(sweep: SweepConfig) -> Path:
    """The sweep's folder (absolute): ``runs/``, ``tune/``, the results."""
    return Path(sweep.root or Path("runs") / "sweeps" / sweep.name).expanduser().resolve()


# -- searches ------------------------------------------------------------------------


def _yaml_value(value: Any) -> str:
    """``value`` as the right-hand side of ``--set key=value`` (parsed back as YAML)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=2**31)
    return text.removesuffix("\n...\n").strip()


def _overrides(values: dict[str, Any]) -> list[str]:
    return [f"{key}={_yaml_value(value)}" for key, value in values.items()]


def _short(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def run_name(overrides: dict[str, Any]) -> str:
    """The run directory name of the search with these swept values: readable and
    deterministic, ``space.target-0.4_seed-0``; a short digest of the exact values
    is appended when the readable form had to drop characters or be cut."""
    raw = "_".join(f"{key}-{_short(value)}" for key, value in overrides.items()) or "base"
    name = re.sub(r"[^A-Za-z0-9._+-]", "", raw)
    if name != raw or len(name) > 100:
        digest = hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
        name = f"{name[:90]}-{digest}"
    return name


@dataclass(frozen=True)
class _Plan:
    """Everything a trial needs to build its config, sent to every trial (picklable)."""

    sweep: str
    base: str  # absolute path of the base config
    fixed: list[str]  # the sweep's `set`, as --set pairs
    keys: list[str]  # the swept config keys, in the file's order
    root: str  # absolute
    cwd: str  # relative paths in configs mean the driver's working directory
    env: dict[str, str] = field(default_factory=dict)
    cpus: float = 1

    def config(self, overrides: dict[str, Any]) -> Config:
        """The config of the search with ``overrides`` (the swept values)."""
        name = run_name(overrides)
        run_dir = Path(self.root) / "runs" / name
        args = [*self.fixed, *_overrides(overrides), *_overrides({"run_dir": str(run_dir)})]
        cfg = load_config(self.base, args)
        # Searches sharing a storage outside their run dirs need studies of their own.
        if cfg.store.study is None and cfg.store.storage not in ("sqlite", "journal"):
            store = cfg.store.model_copy(update={"study": f"{self.sweep}-{name}"})
            cfg = cfg.model_copy(update={"store": store})
        return cfg


def _grid_trials(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def _check_trials(sweep: SweepConfig, plan: _Plan) -> list[dict[str, Any]]:
    """Load every search's config (for an Optuna sweep, each parameter at its ends and
    choices), so a bad key or value fails here, before Ray starts. Returns the
    grid's searches in order (none for Optuna)."""
    if sweep.grid is not None:
        trials = _grid_trials(sweep.grid)
        probes = trials
    else:
        assert sweep.optuna is not None
        trials = []
        params = sweep.optuna.params
        first = {key: p.corners()[0] for key, p in params.items()}
        probes = [{**first, key: v} for key, p in params.items() for v in p.corners()]
    names: dict[str, dict[str, Any]] = {}
    for overrides in probes:
        try:
            cfg = plan.config(overrides)
        except EvocompError as err:
            what = ", ".join(f"{k}={_yaml_value(v)}" for k, v in overrides.items())
            raise EvocompError(f"sweep {sweep.name!r}, search {what}: {err}") from None
        if cfg.model.device.startswith("cuda") and sweep.resources.gpu == 0:
            raise EvocompError(
                f"sweep {sweep.name!r}: model.device is {cfg.model.device!r} but "
                "resources.gpu is 0: give each search a GPU (e.g. resources: {gpu: 1})"
            )
        metric = sweep.optuna.metric if sweep.optuna else None
        if metric and metric.startswith("ppl.") and not cfg.final_eval.enabled:
            raise EvocompError(
                f"sweep {sweep.name!r}: optuna.metric {metric!r} needs the held-out "
                "evaluation, but final_eval.enabled is false"
            )
        name = run_name(overrides)
        if sweep.grid is not None and names.setdefault(name, overrides) != overrides:
            raise EvocompError(
                f"sweep {sweep.name!r}: searches {names[name]} and {overrides} would share "
                f"the run directory {name!r}"
            )
    return trials


# -- one trial: one search -------------------------------------------------------------


def _prepare(exp: Any) -> None:
    """Build (or open) the search's variant database and dense reference first; two
    searches of a sweep often need the same ones, and their builders take turns."""
    _ = exp.database, exp.evaluator


@contextlib.contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        handler.close()


def _run_trial(overrides: dict[str, Any], plan: _Plan) -> dict[str, Any]:
    """Run (or resume) the search with ``overrides`` and its held-out evaluation;
    return the metrics a trial reports."""
    from evocomp.final_eval import final_eval
    from evocomp.runner import Experiment, prepare_run_dir, run_search

    started = time.perf_counter()
    cfg = plan.config(overrides)
    run = prepare_run_dir(cfg, resume=True)  # an earlier attempt's evaluations are kept
    with _logging_to(run.log):
        log.info("sweep %s: search %s", plan.sweep, run.path.name)
        exp = Experiment(cfg, progress=False)
        _prepare(exp)
        if exp.cfg is not cfg:  # the space measured something (sublayer timings): record it
            run.config.write_text(yaml.safe_dump(exp.cfg.dump(), sort_keys=False))
        result = run_search(exp, run)
        report = None
        if cfg.final_eval.enabled:
            # Nothing new evaluated: the best genome is the one eval.json was made for.
            if result.evaluations == 0 and run.eval.exists():
                report = json.loads(run.eval.read_text())
            else:
                report = final_eval(exp, run, result.best)
    best = json.loads(run.best.read_text())
    metrics: dict[str, Any] = {
        "fitness": best["fitness"],
        "cost": best["cost"],
        "budget": best["budget"],
        "evaluations": len(pd.read_parquet(run.trials, columns=["tokens"])),
        "new_evaluations": result.evaluations,
        "seconds": time.perf_counter() - started,
        "run_dir": str(run.path),
    }
    if report is not None:
        metrics.update({f"ppl.{name}": ppl for name, ppl in report["ppl"].items()})
    return {k: v for k, v in metrics.items() if v is not None}


def _trainable(config: dict[str, Any], plan: _Plan) -> None:
    """The Ray Tune function trainable: one search per trial."""
    import torch
    from ray import tune

    os.environ.update(plan.env)  # workers of a cluster do not inherit the driver's
    if os.path.isdir(plan.cwd):  # Tune moved us into the trial's folder
        os.chdir(plan.cwd)
    # One torch thread per reserved CPU: concurrent searches must not oversubscribe.
    torch.set_num_threads(max(1, int(plan.cpus)))
    tune.report(_run_trial({key: config[key] for key in plan.keys}, plan))


# -- the sweep -------------------------------------------------------------------------


class _Progress:
    """Whether the driver prints a line per finished search. Read from this class
    when a line is due, not kept in the callback: Tune pickles callbacks with the
    experiment, and a resumed sweep would otherwise get the first run's setting."""

    enabled: ClassVar[bool] = True


def _progress_callback(keys: list[str]) -> Any:
    from ray.tune import Callback

    def line(trials: list[Any], trial: Any, text: str) -> None:
        if not _Progress.enabled:
            return
        ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
        name = run_name({k: (trial.config or {}).get(k) for k in keys})
        print(f"sweep [{ended + 1}/{len(trials)}] {name}: {text}", flush=True)

    class SweepProgress(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001
            line(
                trials,
                trial,
                f"fitness {result.get('fitness', math.nan):.5g}, "
                f"{result.get('new_evaluations', 0)} new evaluations, "
                f"{result.get('seconds', math.nan):.0f} s",
            )

        def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ANN001
            line(trials, trial, "failed (the results table has the error)")

    return SweepProgress()


@contextlib.contextmanager
def _ray(sweep: SweepConfig) -> Iterator[None]:
    """Ray for the sweep: the running one, a fresh local one, or a cluster; only a
    Ray started here is shut down afterwards."""
    try:
        import ray
        from ray import tune  # noqa: F401  (Tune has extra requirements)
    except ImportError as err:
        raise EvocompError(f"sweeps need Ray Tune: pip install 'ray[tune]' ({err})") from None
    started = start_ray(sweep.address, who=f"sweep {sweep.name!r}")
    if started and sweep.address is None:
        have = ray.cluster_resources()
        res = sweep.resources
        for what, need in (("CPU", res.cpu), ("GPU", res.gpu)):
            if need > have.get(what, 0):  # otherwise the trials would wait forever
                ray.shutdown()
                raise EvocompError(
                    f"sweep {sweep.name!r} asks {need:g} {what} per search; this machine "
                    f"has {have.get(what, 0):g} (lower resources.{what.lower()})"
                )
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def run_sweep(path: str | Path, *, resume: bool = False, progress: bool = True) -> pd.DataFrame:
    """Run a sweep file (or built-in sweep name): one search per Ray Tune trial.

    Every search's config is checked before Ray starts. Searches write their run
    directories to ``<root>/runs/<name>``; Tune's experiment is ``<root>/tune/<name>``.
    ``resume`` continues an interrupted sweep: finished searches are not run again,
    unfinished and failed ones continue from their trial stores. Writes
    ``<root>/results.parquet`` and ``<root>/results.md`` and returns the table: one
    row per search, its swept values, ``status`` (``done``, ``error``, ``pending``)
    and metrics (:data:`SEARCH_METRICS`, ``ppl.<name>``, ``run_dir``, ``error``).
    """
    sweep = load_sweep(path)
    root = sweep_root(sweep)
    plan = _plan(sweep)
    grid = _check_trials(sweep, plan)
    experiment = root / "tune" / sweep.name
    _check_resume(sweep, root, experiment, resume=resume)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False))

    with _ray(sweep):
        from ray import tune

        trainable = tune.with_resources(
            tune.with_parameters(_trainable, plan=plan),
            {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu},
        )
        _Progress.enabled = progress
        with _quiet_tune():
            if experiment.exists() and tune.Tuner.can_restore(str(experiment)):
                # Failed searches start again; their trial stores make that cheap.
                tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
            else:
                tuner = _new_tuner(sweep, plan, trainable, root)
            results = tuner.fit()
            configs = _trial_configs(results)
    table = _table(plan, grid, results, configs)
    _write_results(table, root)
    return table


@contextlib.contextmanager
def _quiet_tune() -> Iterator[None]:
    """Tune without its banners: the old output engine prints nothing at verbosity 0
    (the new one always prints the experiment's configuration)."""
    saved = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # The warnings that TensorBoard logging needs tensorboardX, and that searches cut
    # short have no results yet (the results table says so).
    loggers = [
        logging.getLogger(name)
        for name in ("ray.tune.utils.callback", "ray.tune.analysis.experiment_analysis")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if saved is None:
            del os.environ["RAY_AIR_NEW_OUTPUT"]
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved


def _plan(sweep: SweepConfig) -> _Plan:
    return _Plan(
        sweep=sweep.name,
        base=str(resolve_config_path(sweep.base).resolve()),
        fixed=_overrides(sweep.set),
        keys=list(sweep.grid or (sweep.optuna.params if sweep.optuna else {})),
        root=str(sweep_root(sweep)),
        cwd=os.getcwd(),
        env=forwarded_env(),
        cpus=sweep.resources.cpu,
    )


def _check_resume(sweep: SweepConfig, root: Path, experiment: Path, *, resume: bool) -> None:
    if experiment.exists() and not resume:
        raise EvocompError(
            f"sweep {sweep.name!r} already ran in {root}; continue it with "
            f"`evocomp sweep ... --resume`, or choose another name or root"
        )
    saved = root / "sweep.yaml"
    if resume and experiment.exists() and saved.exists():
        before, now = yaml.safe_load(saved.read_text()), sweep.model_dump(mode="json")
        changed = sorted(k for k in {*before, *now} if before.get(k) != now.get(k))
        if changed:
            raise EvocompError(
                f"sweep {sweep.name!r} changed since it ran in {root} ({choices(changed)}); "
                "resume it unchanged, or choose another name or root for the new sweep"
            )


def _new_tuner(sweep: SweepConfig, plan: _Plan, trainable: Any, root: Path) -> Any:
    from ray import tune

    if sweep.grid is not None:
        space = {key: tune.grid_search(values) for key, values in sweep.grid.items()}
        tune_config = tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent)
    else:
        from ray.tune.search.optuna import OptunaSearch

        opt = sweep.optuna
        assert opt is not None
        space = {key: p.domain() for key, p in opt.params.items()}
        tune_config = tune.TuneConfig(
            search_alg=OptunaSearch(seed=opt.seed),
            metric=opt.metric,
            mode=opt.mode,
            num_samples=opt.trials,
            max_concurrent_trials=sweep.max_concurrent,
        )
    run_config = tune.RunConfig(
        name=sweep.name,
        storage_path=str(root / "tune"),
        verbose=0,  # the sweep prints its own line per search
        callbacks=[_progress_callback(plan.keys)],
    )
    return tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)


def _trial_configs(results: Any) -> dict[str, dict[str, Any]]:
    """Each trial's config by its path: a result carries its config only once the
    trial has reported, and a failed or unfinished search has not."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(results.experiment_path)
    return {str(trial.path): trial.config for trial in analysis.trials}


def _table(
    plan: _Plan,
    grid: list[dict[str, Any]],
    results: Any,
    configs: dict[str, dict[str, Any]],
) -> pd.DataFrame:
    rows = []
    for result in results:
        config = result.config or configs.get(str(result.path)) or {}
        overrides = {key: config.get(key) for key in plan.keys}
        metrics = result.metrics or {}
        row: dict[str, Any] = {"search": run_name(overrides), **overrides}
        if result.error is not None:
            row["status"] = "error"
        elif "fitness" in metrics:
            row["status"] = "done"
        else:
            row["status"] = "pending"
        for key in (*SEARCH_METRICS, *sorted(k for k in metrics if k.startswith("ppl."))):
            row[key] = metrics.get(key, math.nan)
        row["run_dir"] = str(Path(plan.root) / "runs" / row["search"])
        row["error"] = _first_line(result.error) if result.error is not None else ""
        rows.append(row)
    table = pd.DataFrame(rows)
    if grid and not table.empty:  # the grid's order, not the order Tune finished them
        order = {run_name(o): i for i, o in enumerate(grid)}
        table = table.sort_values("search", key=lambda s: s.map(order)).reset_index(drop=True)
    return table


def _first_line(error: BaseException) -> str:
    # Tune wraps the trial's exception; its last line names the original one.
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def results_markdown(table: pd.DataFrame) -> str:
    """The results table as Markdown (run_dir and error left out)."""
    cols = [c for c in table.columns if c not in ("run_dir", "error")]
    cols = [c for c in cols if c not in ("budget",) or table[c].nunique() > 1]
    return markdown_table(table[cols])


def _write_results(table: pd.DataFrame, root: Path) -> None:
    table.to_parquet(root / "results.parquet")
    (root / "results.md").write_text(results_markdown(table) + "\n")


__all__ = [
    "BUILTIN_SWEEPS",
    "SEARCH_METRICS",
    "OptunaParam",
    "OptunaSweep",
    "Resources",
    "SweepConfig",
    "load_sweep",
    "resolve_sweep_path",
    "results_markdown",
    "run_name",
    "run_sweep",
    "sweep_root",
]
