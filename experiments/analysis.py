"""Analysing runs in Jupyter: run directories as pandas tables, plus plots::

    import evocomp
    run = evocomp.load_run("runs/quickstart")
    run.trials.groupby("tokens").fitness.min()
    run.allocation()                  # per-layer levels of the best genome
    run.plot_pareto(); run.plot_progress(); run.plot_allocation()
    runs = evocomp.load_runs("runs/*")
    runs.plot_pareto()                # fronts of several runs overlaid

Nothing here loads the model: the search space is rebuilt from the run's
``units.json`` and config, so a run on a GPU cluster can be studied on a laptop.
Plots draw on a plain :class:`matplotlib.figure.Figure` (no pyplot state, any
backend, Agg included) unless an ``ax`` is given, and return the figure.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from evocomp.config import Config
from evocomp.errors import EvocompError
from evocomp.results import markdown_table, pareto_front
from evocomp.runner import RunDir, load_run_config, searched_space
from evocomp.search.store import at_final_fidelity, decode_genome, encode_genome
from evocomp.spaces.base import Genome, SearchSpace
from evocomp.spaces.units import Unit

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "Run",
    "Runs",
    "load_run",
    "load_runs",
    "plot_allocation",
    "plot_pareto",
    "plot_progress",
    "write_report",
]

PathLike = str | Path


# -- one run ---------------------------------------------------------------------------


class Run:
    """One run directory, read-only: config, every evaluation, the Pareto front,
    the best genome and the held-out evaluation. Load it with :func:`load_run`.

    Attributes are computed once and cached; the run directory is not watched, so
    load it again to see a resumed search's new evaluations.
    """

    def __init__(self, path: PathLike, *, name: str | None = None) -> None:
        config, rundir = load_run_config(path)  # EvocompError unless config.yaml exists
        if not rundir.trials.exists():
            raise EvocompError(
                f"{rundir.path} has no trials.parquet yet: it is written when a search ends "
                f"or is interrupted (watch a running search with `optuna-dashboard "
                f"{rundir.path / 'trials.journal'}`)"
            )
        trials = pd.read_parquet(rundir.trials)
        if trials.empty:
            raise EvocompError(f"{rundir.path} has no evaluations yet")
        if "spent" not in trials:  # runs from before rows were memoised scored all
            trials["spent"] = trials["tokens"]
        self._dir = rundir
        self._config: Config = config
        self._name = name or rundir.path.name
        self._best: dict[str, Any] | None = (
            json.loads(rundir.best.read_text()) if rundir.best.exists() else None
        )
        self._raw_trials = trials

    # -- files -------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The run directory."""
        return self._dir.path

    @property
    def name(self) -> str:
        """The run's name in tables and legends (its directory name by default)."""
        return self._name

    @property
    def config(self) -> Config:
        """The fully resolved config the run was started with."""
        return self._config

    @property
    def best(self) -> dict[str, Any] | None:
        """``best.json``: the best genome within the budget, its fitness, cost,
        budget and per-layer ``layers`` (None before the first generation ends)."""
        return self._best

    @cached_property
    def eval(self) -> dict[str, Any] | None:
        """``eval.json`` (held-out perplexity of dense, baseline and searched), or None."""
        return json.loads(self._dir.eval.read_text()) if self._dir.eval.exists() else None

    @property
    def metric(self) -> str:
        """What ``fitness`` measures (``kl``, ``ppl``)."""
        return self._best["metric"] if self._best else self._config.evaluator.name

    @cached_property
    def budget(self) -> int | None:
        """The space's budget: a genome is feasible when its cost is at most this."""
        if self._best is not None:
            return int(self._best["budget"])
        space = self._space_or_none()
        return None if space is None else space.budget

    @cached_property
    def tokens(self) -> int:
        """The largest token budget of any evaluation (the final fidelity)."""
        return int(self._raw_trials.tokens.max())

    # -- tables ------------------------------------------------------------------------
    @cached_property
    def trials(self) -> pd.DataFrame:
        """Every evaluation (``trials.parquet``), in trial-number order, with two
        columns added: ``evaluation`` (1, 2, ... in that order) and ``best_so_far``,
        the lowest fitness so far among evaluations at the largest token budget
        that are within the budget (what ``best.json`` reports at the end), NaN
        before the first of them."""
        df = self._raw_trials.sort_values("number", kind="stable").reset_index(drop=True)
        df.insert(0, "evaluation", np.arange(1, len(df) + 1))
        final = at_final_fidelity(df)
        # Multi-objective runs also evaluate genomes over the budget; counting those
        # would make the curve track the least compressed genome, not the search.
        if self.budget is not None:
            final &= df.cost <= self.budget
        df["best_so_far"] = df.fitness.where(final).cummin().ffill()
        return df

    @cached_property
    def pareto(self) -> pd.DataFrame:
        """The cost/fitness Pareto front of the evaluations at the largest token
        budget, by cost (``pareto.parquet``, or computed for runs without one)."""
        if self._dir.pareto.exists():
            front = pd.read_parquet(self._dir.pareto)
        else:
            front = pareto_front(self._raw_trials[at_final_fidelity(self._raw_trials)])
        evaluation = dict(zip(self.trials.number, self.trials.evaluation, strict=True))
        front.insert(0, "evaluation", front.number.map(evaluation))
        return front.reset_index(drop=True)

    # -- the space and its genomes -----------------------------------------------------
    @cached_property
    def units(self) -> list[Unit]:
        """The units the space was built from (``units.json``)."""
        if not self._dir.units.exists():
            raise EvocompError(
                f"{self.path} has no units.json (runs before it was recorded): resume the "
                f"run once to write it, `evocomp search --resume {self.path} --no-eval` "
                "(finished evaluations are not repeated), or re-run the search"
            )
        rows = json.loads(self._dir.units.read_text())
        return [Unit(**{**u, "shape": tuple(u["shape"])}) for u in rows]

    @cached_property
    def space(self) -> SearchSpace:
        """The run's search space, rebuilt from ``units.json`` and the config
        without loading the model."""
        return searched_space(self._config, self.units)

    def _space_or_none(self) -> SearchSpace | None:
        try:
            return self.space
        except EvocompError:
            return None

    def genome(self, trial_number: int) -> Genome:
        """The genome evaluated by trial ``trial_number`` (the ``number`` column)."""
        rows = self._raw_trials[self._raw_trials.number == trial_number]
        if rows.empty:
            numbers = self._raw_trials.number
            raise EvocompError(
                f"run {self.name!r} has no trial {trial_number} "
                f"(trials {numbers.min()}..{numbers.max()})"
            )
        return decode_genome(rows.genome.iloc[0])

    @property
    def best_genome(self) -> Genome:
        """The best genome within the budget (``best.json``)."""
        if self._best is None:
            raise EvocompError(f"{self.path} has no best.json yet")
        return tuple(self._best["genome"])

    def allocation(self, genome_or_trial_number: int | Sequence[int] | None = None) -> pd.DataFrame:
        """What a genome does to each unit, one row per unit (the space's
        ``describe``: unit, block, level, and sparsity / bits / removed / cost).

        ``None`` means the best genome, an int a trial number, a sequence a genome.
        """
        which = genome_or_trial_number
        if which is None:
            if not self._dir.units.exists() and self._best is not None:
                # Older runs: best.json already holds the best genome's rows.
                return pd.DataFrame(self._best["layers"])
            genome = self.best_genome
        elif isinstance(which, int | np.integer):
            genome = self.genome(int(which))
        else:
            genome = tuple(int(x) for x in which)
        space = self.space
        if space.genome_kind == "levels" and len(genome) != len(space):
            raise EvocompError(f"genome has {len(genome)} genes; this space has {len(space)}")
        return pd.DataFrame(space.describe(genome))

    # -- plots (see the module-level functions) ----------------------------------------
    def plot_pareto(self, ax: Axes | None = None, **kwargs: Any) -> Figure:
        """:func:`plot_pareto` of this run."""
        return plot_pareto(self, ax=ax, **kwargs)

    def plot_progress(self, ax: Axes | None = None, **kwargs: Any) -> Figure:
        """:func:`plot_progress` of this run."""
        return plot_progress(self, ax=ax, **kwargs)

    def plot_allocation(
        self, genome: int | Sequence[int] | None = None, ax: Axes | None = None, **kwargs: Any
    ) -> Figure:
        """:func:`plot_allocation` of this run."""
        return plot_allocation(self, genome, ax=ax, **kwargs)

    def report(self, out: PathLike | None = None) -> Path:
        """:func:`write_report` of this run; returns the path of ``report.md``."""
        return write_report(self, out)

    def __repr__(self) -> str:
        cfg = self._config
        best = f", best {self.metric} {self._best['fitness']:.4g}" if self._best else ""
        return (
            f"<Run {self.name!r}: {cfg.space.name} space, {cfg.search.name}, "
            f"{len(self._raw_trials)} evaluations{best}>"
        )


def load_run(path: PathLike) -> Run:
    """Open the run directory ``path`` (what ``evocomp search`` wrote).

    Raises :class:`~evocomp.errors.EvocompError` when ``path`` is not a run
    directory or has no evaluations yet.
    """
    return Run(path)


# -- several runs ----------------------------------------------------------------------


class Runs(Sequence[Run]):
    """Several runs, indexed by position or by name; tables gain a ``run`` column."""

    def __init__(self, runs: Iterable[Run]) -> None:
        self._runs = tuple(runs)
        names = [r.name for r in self._runs]
        if len(set(names)) != len(names):
            raise EvocompError(f"runs need distinct names, got {names}")

    @property
    def names(self) -> list[str]:
        return [r.name for r in self._runs]

    def __len__(self) -> int:
        return len(self._runs)

    def __iter__(self) -> Iterator[Run]:
        return iter(self._runs)

    def __getitem__(self, key: int | str) -> Run:  # type: ignore[override]
        if isinstance(key, str):
            for run in self._runs:
                if run.name == key:
                    return run
            raise KeyError(f"no run named {key!r}; runs: {self.names}")
        return self._runs[key]

    def _concat(self, attr: str) -> pd.DataFrame:
        frames = [getattr(r, attr).assign(run=r.name) for r in self._runs]
        if not frames:
            return pd.DataFrame()
        df = pd.concat(frames, ignore_index=True)
        return df[["run", *[c for c in df.columns if c != "run"]]]

    @property
    def trials(self) -> pd.DataFrame:
        """Every run's :attr:`Run.trials`, one after another, with a ``run`` column."""
        return self._concat("trials")

    @property
    def pareto(self) -> pd.DataFrame:
        """Every run's :attr:`Run.pareto`, with a ``run`` column."""
        return self._concat("pareto")

    def plot_pareto(self, ax: Axes | None = None, **kwargs: Any) -> Figure:
        """:func:`plot_pareto` of these runs, overlaid."""
        return plot_pareto(self, ax=ax, **kwargs)

    def plot_progress(self, ax: Axes | None = None, **kwargs: Any) -> Figure:
        """:func:`plot_progress` of these runs, overlaid."""
        return plot_progress(self, ax=ax, **kwargs)

    def __repr__(self) -> str:
        return f"<Runs {self.names}>"


def load_runs(paths_or_glob: PathLike | Iterable[PathLike]) -> Runs:
    """Open several runs: a glob (``"runs/*"``), a directory, or a list of either.

    Glob matches that are not finished-or-interrupted runs (no config.yaml, or no
    trials.parquet yet) are skipped with a warning; named directories must be runs.
    Runs are named by directory, or by path where directory names repeat.
    """
    items = [paths_or_glob] if isinstance(paths_or_glob, str | Path) else list(paths_or_glob)
    paths: list[Path] = []
    for item in items:
        text = str(item)
        if not glob.has_magic(text):
            paths.append(Path(text))
            continue
        matched = sorted(Path(p) for p in glob.glob(text) if RunDir(Path(p)).config.exists())
        for p in matched:
            if RunDir(p).trials.exists():
                paths.append(p)
            else:
                warnings.warn(f"skipping {p}: no trials.parquet yet", stacklevel=2)
        if not matched:
            raise EvocompError(f"no run directories match {text!r}")
    base = [p.name for p in paths]
    names = [p.name if base.count(p.name) == 1 else str(p) for p in paths]
    return Runs(Run(p, name=n) for p, n in zip(paths, names, strict=True))


# -- plots -----------------------------------------------------------------------------


@functools.cache
def _figure_class() -> type[Figure]:
    from matplotlib.figure import Figure

    class ShownFigure(Figure):
        """A Figure that Jupyter shows when a cell returns it, with or without pyplot."""

        def _repr_png_(self) -> bytes:
            buf = io.BytesIO()
            self.savefig(buf, format="png")
            return buf.getvalue()

    return ShownFigure


def _new_figure(**kwargs: Any) -> Figure:
    # A bare Figure, not pyplot: no global state, no GUI backend needed (Agg or any),
    # nothing kept alive after the caller drops it, and Jupyter shows a returned
    # figure once (a pyplot figure would show again at the end of the cell).
    return _figure_class()(layout="constrained", **kwargs)


def _axes(ax: Axes | None, **figure: Any) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    fig = _new_figure(**figure)
    return fig, fig.add_subplot()


def _as_runs(runs: Run | Runs | Iterable[Run]) -> list[Run]:
    return [runs] if isinstance(runs, Run) else list(runs)


def _cost_axis(run: Run) -> tuple[float, str]:
    """How to show a run's cost: ``(divisor, axis label)``, as its space says
    (:meth:`~evocomp.spaces.base.SearchSpace.cost_axis`); raw cost when the space
    cannot be rebuilt."""
    space = run._space_or_none()
    if space is None:
        return 1.0, "cost"
    axis = space.cost_axis()
    return axis.scale, axis.label


def _final(run: Run) -> pd.DataFrame:
    t = run.trials
    return t[at_final_fidelity(t)]


def plot_pareto(
    runs: Run | Runs | Iterable[Run], ax: Axes | None = None, *, evaluations: bool = True
) -> Figure:
    """Quality vs cost: each run's Pareto front (line and markers), its evaluations
    at the largest token budget (faint dots, unless ``evaluations=False``), its
    budget (dashed line) and its best genome within the budget (star). Cost is per
    searched weight where the space has a size (kept fraction, stored bits per
    weight), else raw. Artists carry ``gid``s ``front:<run>``, ``evaluations:<run>``,
    ``budget:<run>`` and ``best:<run>`` for programmatic access."""
    fig, ax = _axes(ax, figsize=(6.4, 4.4))
    runs = _as_runs(runs)
    axes = [_cost_axis(r) for r in runs]
    if len({label for _, label in axes}) > 1:  # one x axis: raw cost unless all agree
        axes = [(1.0, "cost")] * len(runs)
    label = axes[0][1] if axes else "cost"
    fitness: list[float] = []
    for i, (run, (scale, _)) in enumerate(zip(runs, axes, strict=True)):
        color = f"C{i % 10}"
        if evaluations:
            final = _final(run)
            ax.scatter(final.cost / scale, final.fitness, s=9, color=color, alpha=0.25,
                       linewidths=0, gid=f"evaluations:{run.name}")
            fitness += final.fitness.tolist()
        front = run.pareto
        ax.plot(front.cost / scale, front.fitness, "o-", color=color, markersize=4,
                label=f"{run.name} ({len(front)} on the front)", gid=f"front:{run.name}")
        fitness += front.fitness.tolist()
        if run.budget is not None:
            ax.axvline(run.budget / scale, color=color, linestyle="--", linewidth=1,
                       alpha=0.7, gid=f"budget:{run.name}")
        if run.best is not None:
            ax.plot([run.best["cost"] / scale], [run.best["fitness"]], "*", color=color,
                    markersize=14, markeredgecolor="black",
                    label=f"{run.name} best within budget", gid=f"best:{run.name}")
    positive = [f for f in fitness if f > 0 and math.isfinite(f)]
    # KL spans decades across a front (near-dense to heavily compressed).
    if positive and len(positive) == len(fitness) and max(positive) > 20 * min(positive):
        ax.set_yscale("log")
    metrics = {r.metric for r in runs}
    ax.set_xlabel(label + "   (dashed: budget)")
    ax.set_ylabel(" / ".join(sorted(metrics)) + " (lower is better)")
    ax.set_title("quality vs cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_progress(
    runs: Run | Runs | Iterable[Run], ax: Axes | None = None, *, x: str = "evaluation"
) -> Figure:
    """The best fitness within the budget so far (``best_so_far``) against
    evaluations (``x="evaluation"``) or evaluation tokens scored (``x="tokens"``, the
    ``spent`` column), one line per run (``gid`` ``progress:<run>``), with each run's
    baseline (the uniform genome at the largest token budget) dotted."""
    if x not in ("evaluation", "tokens"):
        raise ValueError(f"x must be 'evaluation' or 'tokens', not {x!r}")
    fig, ax = _axes(ax, figsize=(6.4, 4.0))
    for i, run in enumerate(_as_runs(runs)):
        color = f"C{i % 10}"
        t = run.trials
        where = t.evaluation if x == "evaluation" else t.spent.cumsum()
        seen = t.best_so_far.notna()
        ax.step(where[seen], t.best_so_far[seen], where="post", color=color,
                label=run.name, gid=f"progress:{run.name}")
        base = t[(t.role == "baseline") & at_final_fidelity(t)]
        if not base.empty:
            ax.axhline(base.fitness.iloc[0], color=color, linestyle=":", linewidth=1,
                       label=f"{run.name} baseline", gid=f"baseline:{run.name}")
    metrics = {r.metric for r in _as_runs(runs)}
    ax.set_xlabel("evaluations" if x == "evaluation" else "tokens evaluated")
    ax.set_ylabel(f"best {' / '.join(sorted(metrics))} within budget")
    ax.set_title("search progress")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


_ALLOCATION_COLUMNS = {
    # column: (colormap, cell format); dark = more compressed
    "sparsity": ("magma_r", "{:.2f}"),
    "bits": ("magma", "{:.0f}"),
    "removed": ("Greys", "{:.0f}"),
    "cost per weight": ("magma", "{:.2g}"),
    "kept": ("magma", "{:.2f}"),  # width: share of heads / neurons kept
}


def _unit_kinds(rows: pd.DataFrame) -> list[str]:
    """Each row's unit name within its block (``mlp.down_proj``), shortened to the
    last component where that stays unambiguous (``down_proj``)."""
    kinds = []
    for unit, block in zip(rows.unit, rows.block, strict=True):
        m = re.search(rf"(?:^|\.){block}\.(.+)$", unit)
        kinds.append(m.group(1) if m else unit)
    full = list(dict.fromkeys(kinds))
    short = [k.rsplit(".", 1)[-1] for k in full]
    if len(set(short)) == len(short):
        return [k.rsplit(".", 1)[-1] for k in kinds]
    return kinds


def _allocation_table(run: Run, genome: int | Sequence[int] | None) -> pd.DataFrame:
    rows = run.allocation(genome).copy()
    rows["kind"] = _unit_kinds(rows)
    if "cost" in rows and "unit" in rows:
        try:
            numel = {u.name: u.numel for u in run.units}
            rows["cost per weight"] = rows.cost / rows.unit.map(numel)
        except EvocompError:
            pass
    if "removed" in rows:
        rows["removed"] = rows.removed.astype(float)
    return rows


def plot_allocation(
    run: Run,
    genome: int | Sequence[int] | None = None,
    ax: Axes | None = None,
    *,
    column: str | None = None,
) -> Figure:
    """A heatmap of what ``genome`` (default: the best; an int: a trial number)
    does per layer: blocks down, linear kinds (``q_proj`` ... ``down_proj``, or
    sublayers for depth and width) across, the value sparsity, bits, removed (1),
    kept share (width) or, for joint spaces, cost per weight. Joint spaces get one
    panel per column unless ``column`` names one (or ``ax`` is given: then the column
    with most distinct values is shown)."""
    rows = _allocation_table(run, genome)
    present = [c for c in _ALLOCATION_COLUMNS if c in rows]
    if column is not None:
        if column not in rows:
            raise EvocompError(f"no column {column!r}; choose from {present}")
        columns = [column]
    elif not present:
        raise EvocompError(f"nothing to plot: the allocation has columns {list(rows.columns)}")
    elif ax is not None or len(present) == 1:
        columns = [max(present, key=lambda c: rows[c].nunique())]  # first one wins ties
    else:
        columns = present
    kinds = list(dict.fromkeys(rows.kind))
    blocks = sorted(rows.block.unique())
    height = max(3.0, 0.22 * len(blocks) + 1.6)
    if ax is None:
        fig = _new_figure(figsize=(max(4.0, 0.55 * len(kinds) + 2.2) * len(columns), height))
        axes = list(np.atleast_1d(fig.subplots(1, len(columns))))
    else:
        fig, axes = ax.figure, [ax]  # type: ignore[assignment]
    which = "best" if genome is None else (
        f"trial {genome}" if isinstance(genome, int | np.integer) else "genome")
    for col, axis in zip(columns, axes, strict=True):
        grid = (rows.pivot_table(index="block", columns="kind", values=col, aggfunc="mean")
                .reindex(index=blocks, columns=kinds))
        cmap, fmt = _ALLOCATION_COLUMNS.get(col, ("viridis", "{:.2g}"))
        values = grid.to_numpy(dtype=float)
        image = axis.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest",
                            gid=f"allocation:{col}")
        axis.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
        axis.set_yticks(range(len(blocks)), [str(b) for b in blocks])
        axis.set_ylabel("block")
        axis.set_title(f"{run.name} ({which}): {col}")
        fig.colorbar(image, ax=axis, label=col)
        if values.size <= 400:  # numbers stay readable up to ~30 blocks × 13 kinds
            _annotate(axis, image, values, fmt)
    return fig


def _annotate(axis: Axes, image: Any, values: np.ndarray, fmt: str) -> None:
    for (r, c), v in np.ndenumerate(values):
        if np.isnan(v):
            continue
        red, green, blue, _ = image.cmap(image.norm(v))
        dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
        axis.text(c, r, fmt.format(v), ha="center", va="center", fontsize=7,
                  color="white" if dark else "black")


# -- report ----------------------------------------------------------------------------


def _options(spec: dict[str, Any]) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"`{spec['name']}`" + (f" ({opts})" if opts else "")


def write_report(run: Run | PathLike, out: PathLike | None = None) -> Path:
    """Write ``pareto.png``, ``progress.png``, ``allocation.png`` and ``report.md``
    (settings, best genome, held-out table, top of the Pareto front, the plots)
    into ``out`` (default ``RUN_DIR/report``); returns the path of ``report.md``.
    An older run without units.json and best.json gets no allocation plot."""
    run = run if isinstance(run, Run) else load_run(run)
    out = Path(out) if out is not None else run.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    scale, label = _cost_axis(run)
    cfg = run.config
    images = {"pareto.png": "Pareto front", "progress.png": "Search progress"}
    plot_pareto(run).savefig(out / "pareto.png", dpi=120)
    plot_progress(run).savefig(out / "progress.png", dpi=120)
    try:
        plot_allocation(run).savefig(out / "allocation.png", dpi=120)
        images["allocation.png"] = "Per-layer allocation of the best genome"
    except EvocompError as err:
        (out / "allocation.png").unlink(missing_ok=True)
        warnings.warn(f"no allocation plot: {err}", stacklevel=2)

    per = "" if scale == 1 else " per weight"
    t = run.trials
    lines = [
        f"# evocomp run `{run.name}`",
        "",
        f"- directory: `{run.path}`",
        f"- model: `{cfg.model.name}`",
        f"- space: {_options(cfg.space.dump())}",
        *([f"- compressor: {_options(cfg.compressor.dump())}"]
          if run.space.compressor_kind is not None else []),
        f"- optimizer: {_options(cfg.search.dump())}, seed {cfg.seed}",
        f"- evaluator: {_options(cfg.evaluator.dump())}",
        f"- evaluations: {len(t)} ({int(at_final_fidelity(t).sum())} at the largest "
        f"token budget, {run.tokens} tokens)",
    ]
    if run.budget is not None:
        lines.append(f"- budget: cost {run.budget}" + (
            f" ({run.budget / scale:.4g} {label})" if per else ""))
    best = run.best
    if best is not None:
        lines.append(
            f"- best {run.metric} within budget: **{best['fitness']:.6g}** at cost "
            f"{best['cost']}" + (f" ({best['cost'] / scale:.4g} {label})" if per else "")
        )
        number = t.number[(t.genome == encode_genome(tuple(best["genome"])))
                          & at_final_fidelity(t)]
        if not number.empty:
            lines[-1] += f", trial {int(number.iloc[0])}"
        lines += [f"- {k}: `{v}`" for k, v in run.space.summary(tuple(best["genome"])).items()]
    base = t[(t.role == "baseline") & at_final_fidelity(t)]
    if not base.empty:
        lines.append(f"- baseline (uniform) {run.metric}: {base.fitness.iloc[0]:.6g}")
    ev = run.eval
    if ev is not None:
        lines += ["", f"## Held-out perplexity ({ev.get('heldout_tokens', '?')} tokens)", ""]
        held = pd.DataFrame({"model": list(ev["ppl"]), "perplexity": list(ev["ppl"].values())})
        held["cost"] = [ev.get("cost", {}).get(m, "") for m in held.model]
        lines.append(markdown_table(held))
    front = run.pareto
    shown = front.head(20)
    cols = ["number", "cost", *(["cost" + per] if per else []), "fitness",
            *[c for c in front.columns if c.startswith("metric.")]]
    table = shown.assign(**({"cost" + per: shown.cost / scale} if per else {}))
    if run.budget is not None:
        table = table.assign(**{"within budget": np.where(shown.cost <= run.budget, "yes", "")})
        cols.append("within budget")
    plural = "s" if len(front) != 1 else ""
    top = " (the first 20 by cost)" if len(front) > 20 else ""
    lines += [
        "",
        "## Pareto front",
        "",
        f"{len(front)} evaluation{plural} at {run.tokens} tokens that no other beats on both "
        f"cost and {run.metric}{top}:",
        "",
        markdown_table(table[cols].rename(columns={"number": "trial"})),
        "",
        "## Plots",
        "",
    ]
    for file, title in images.items():
        lines += [f"### {title}", "", f"![{title}]({file})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
