"""The analysis API (load_run / load_runs, plots), `evocomp report`, and the
example notebook, on two tiny real runs: an NSGA-II front and an EvoPress search."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import byte_tokenizer, search_config, tiny_llama, uneven_llama
from matplotlib.figure import Figure

import evocomp
from evocomp.cli import main
from evocomp.config import Config
from evocomp.errors import EvocompError
from evocomp.spaces import SPACES
from evocomp.supernet.units import find_units

NOTEBOOK = Path(__file__).parents[2] / "experiments" / "notebooks" / "analysis.ipynb"
SPACE = {"name": "sparsity", "target": 0.5, "step": 0.1, "levels": 4}  # levels 0.1 .. 0.9


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """``front``: a multi-objective NSGA-II run (no held-out eval); ``evo``: an
    EvoPress run with eval.json. Same model and space, so they share a database."""
    tmp = tmp_path_factory.mktemp("analysis")
    model_dir = tmp / "uneven-llama"
    uneven_llama().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    nsga2 = {"name": "nsga2", "population": 12, "offspring": 12, "generations": 4, "tokens": 128}
    configs = {
        "front": search_config(tmp, model_dir, name="front", space=SPACE, search=nsga2,
                               final_eval={"enabled": False}),
        "evo": search_config(tmp, model_dir, name="evo", space=SPACE),
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVOCOMP_CACHE", str(tmp / "cache"))
        for cfg in configs.values():
            assert main(["-q", "search", cfg]) == 0
    return {name: tmp / "runs" / name for name in configs}


def _json(path: Path):
    return json.loads(path.read_text())


def _dominated(row, df) -> bool:
    return bool(((df.cost <= row.cost) & (df.fitness <= row.fitness)
                 & ((df.cost < row.cost) | (df.fitness < row.fitness))).any())


def _weights(run_dir: Path) -> int:
    return sum(u["shape"][0] * u["shape"][1] for u in _json(run_dir / "units.json"))


# -- load_run ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["front", "evo"])
def test_load_run_reads_every_file_of_the_run(runs, name):
    path = runs[name]
    run = evocomp.load_run(path)
    raw = pd.read_parquet(path / "trials.parquet")
    assert run.path == path and run.name == name
    assert isinstance(run.config, Config) and run.config.name == name
    assert len(run.trials) == len(raw)
    assert run.trials.number.is_monotonic_increasing
    assert run.trials.evaluation.tolist() == list(range(1, len(raw) + 1))
    assert run.best == _json(path / "best.json")
    assert run.budget == run.best["budget"] == run.space.budget
    assert len(run.space) == len(_json(path / "units.json"))
    assert run.eval == (_json(path / "eval.json") if name == "evo" else None)
    assert name in repr(run)


@pytest.mark.parametrize("name", ["front", "evo"])
def test_best_so_far_is_the_running_best_within_budget(runs, name):
    run = evocomp.load_run(runs[name])
    t = run.trials
    seen = t.best_so_far.notna()
    first = int(np.argmax(seen.to_numpy()))
    assert seen.iloc[first:].all() and not seen.iloc[:first].any()  # NaN only before the first
    assert (t.best_so_far[seen].diff().dropna() <= 0).all()
    final = t[(t.tokens == t.tokens.max()) & (t.cost <= run.budget)]
    assert t.best_so_far.iloc[-1] == pytest.approx(final.fitness.min())
    assert t.best_so_far.iloc[-1] == pytest.approx(run.best["fitness"])
    if name == "evo":  # multi-fidelity: cheap evaluations never count
        assert t.tokens.nunique() > 1
        assert t.best_so_far[seen].isin(final.fitness).all()


@pytest.mark.parametrize("name", ["front", "evo"])
def test_allocation_describes_the_best_genome_and_any_trial(runs, name):
    run = evocomp.load_run(runs[name])
    alloc = run.allocation()
    assert len(alloc) == len(_json(runs[name] / "units.json"))
    assert alloc.to_dict("records") == run.best["layers"]
    number = int(run.trials.number.iloc[-1])
    genome = run.genome(number)
    assert run.allocation(number).level.tolist() == list(genome)
    assert run.allocation(list(genome)).equals(run.allocation(number))
    with pytest.raises(EvocompError, match="no trial 9999"):
        run.genome(9999)
    with pytest.raises(EvocompError, match="genes"):
        run.allocation([0, 1])


def test_the_pareto_front_is_non_dominated_and_computed_when_missing(runs, tmp_path):
    run = evocomp.load_run(runs["front"])
    final = run.trials[run.trials.tokens == run.trials.tokens.max()]
    front = run.pareto
    assert len(front) == len(pd.read_parquet(runs["front"] / "pareto.parquet")) >= 5
    assert not any(_dominated(r, final) for r in front.itertuples())
    assert front.cost.is_monotonic_increasing
    assert (front.evaluation == front.number + 1).all()
    copy = shutil.copytree(runs["front"], tmp_path / "front")
    (copy / "pareto.parquet").unlink()
    assert evocomp.load_run(copy).pareto.number.tolist() == front.number.tolist()


def test_errors_name_the_problem(runs, tmp_path):
    with pytest.raises(EvocompError, match="not a run directory"):
        evocomp.load_run(tmp_path)
    started = tmp_path / "started"
    started.mkdir()
    shutil.copy(runs["evo"] / "config.yaml", started)
    with pytest.raises(EvocompError, match="no trials.parquet yet"):
        evocomp.load_run(started)
    # Runs from before units.json: everything but the space works, and the error says
    # how to get it.
    old = shutil.copytree(runs["evo"], tmp_path / "old")
    (old / "units.json").unlink()
    run = evocomp.load_run(old)
    assert len(run.trials) and len(run.pareto)
    with pytest.raises(EvocompError, match=r"units\.json.*--resume"):
        _ = run.space
    assert run.allocation().to_dict("records") == run.best["layers"]
    assert isinstance(run.plot_pareto(), Figure)


# -- load_runs -------------------------------------------------------------------------------


def test_load_runs_concatenates_and_indexes_by_name(runs):
    both = evocomp.load_runs(str(runs["front"].parent / "*"))
    assert sorted(both.names) == ["evo", "front"] and len(both) == 2
    assert both["front"].path == runs["front"] and both[0] is next(iter(both))
    trials = both.trials
    assert trials.columns[0] == "run"
    for name in ("front", "evo"):
        assert (trials.run == name).sum() == len(pd.read_parquet(runs[name] / "trials.parquet"))
    assert len(both.pareto) == sum(len(r.pareto) for r in both)
    listed = evocomp.load_runs([runs["evo"], runs["front"]])
    assert listed.names == ["evo", "front"]
    with pytest.raises(KeyError):
        both["nope"]
    with pytest.raises(EvocompError, match="no run directories match"):
        evocomp.load_runs(str(runs["front"].parent / "nothing-*"))


# -- plots -----------------------------------------------------------------------------------


def _gid(fig: Figure, gid: str):
    found = [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid]
    assert len(found) == 1, gid
    return found[0]


def test_plot_pareto_draws_every_front_point_relative_to_dense(runs):
    both = evocomp.load_runs([runs["front"], runs["evo"]])
    fig = both.plot_pareto()
    assert isinstance(fig, Figure)
    for run in both:
        weights = _weights(run.path)
        line = _gid(fig, f"front:{run.name}")
        assert len(line.get_xdata()) == len(run.pareto)
        assert np.allclose(line.get_xdata(), run.pareto.cost / weights)
        assert np.allclose(line.get_ydata(), run.pareto.fitness)
        star = _gid(fig, f"best:{run.name}")
        assert star.get_xdata()[0] == pytest.approx(run.best["cost"] / weights)
        assert _gid(fig, f"budget:{run.name}").get_xdata()[0] == pytest.approx(0.5, abs=0.01)
        dots = _gid(fig, f"evaluations:{run.name}")
        assert len(dots.get_offsets()) == (run.trials.tokens == run.tokens).sum()
    assert "fraction of dense" in fig.axes[0].get_xlabel()
    # Into a given axes, as a method.
    ax = Figure().add_subplot()
    assert both["front"].plot_pareto(ax=ax) is ax.figure
    assert len(ax.lines) >= 2


def test_plot_progress_follows_best_so_far(runs):
    run = evocomp.load_run(runs["evo"])
    fig = run.plot_progress()
    line = _gid(fig, "progress:evo")
    seen = run.trials.best_so_far.notna()
    assert np.allclose(line.get_ydata(), run.trials.best_so_far[seen])
    assert np.allclose(line.get_xdata(), run.trials.evaluation[seen])
    by_tokens = _gid(run.plot_progress(x="tokens"), "progress:evo")
    assert by_tokens.get_xdata()[-1] == run.trials.spent.sum() < run.trials.tokens.sum()
    assert _gid(fig, "baseline:evo").get_ydata()[0] > run.best["fitness"]
    with pytest.raises(ValueError):
        run.plot_progress(x="seconds")


def test_plot_allocation_is_a_blocks_by_layers_heatmap(runs):
    run = evocomp.load_run(runs["front"])
    fig = run.plot_allocation()
    (image,) = fig.axes[0].images
    values = np.asarray(image.get_array())
    assert values.shape == (4, 7)  # blocks × (q, k, v, o, gate, up, down)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][:2] == ["q_proj", "k_proj"]
    assert sorted(values.ravel()) == sorted(r["sparsity"] for r in run.best["layers"])
    number = int(run.pareto.number.iloc[0])
    cheapest = np.asarray(run.plot_allocation(number).axes[0].images[0].get_array())
    assert cheapest.mean() > values.mean()  # the cheapest front point is the sparsest


def _fake_run(tmp_path: Path, space: dict) -> Path:
    """A run directory for ``space`` over a tiny model's units, with two trials:
    enough for the analysis, which never loads the model."""
    cfg = Config(name="fake", space=space, compressor={"name": "prune-quantize"})
    cls = SPACES.get(cfg.space.name)
    units = find_units(tiny_llama(), cls.unit_queries(cfg.space.params))
    built = cls(units, cfg.space.params)
    start = built.uniform()
    other = built.mutate(start, random.Random(0))
    run = tmp_path / "fake"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.dump()))
    (run / "units.json").write_text(json.dumps([dataclasses.asdict(u) for u in units]))
    pd.DataFrame({
        "number": [0, 1], "role": ["baseline", "candidate"], "tokens": [64, 64],
        "fitness": [1.0, 0.5], "cost": [built.cost(start), built.cost(other)],
        "genome": [",".join(map(str, g)) for g in (start, other)],
    }).to_parquet(run / "trials.parquet")
    (run / "best.json").write_text(json.dumps({
        "genome": list(other), "fitness": 0.5, "metric": "kl", "space": "joint",
        "cost": built.cost(other), "budget": built.budget, "layers": built.describe(other),
    }))
    return run


def test_plot_allocation_of_a_joint_space_has_a_panel_per_dimension(tmp_path):
    run = evocomp.load_run(_fake_run(tmp_path, {"name": "joint", "spaces": [
        {"name": "depth", "remove": 2},
        {"name": "sparsity", "target": 0.5, "step": 0.25, "levels": 1},
        {"name": "bits", "bits": [2, 4, 8], "target": 4},
    ]}))
    fig = run.plot_allocation()
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert [t.rsplit(": ", 1)[1] for t in titles] == [
        "sparsity", "bits", "removed", "cost per weight"]
    assert all(ax.images[0].get_array().shape == (4, 7) for ax in fig.axes if ax.images)
    one = run.plot_allocation(column="bits")
    assert len([ax for ax in one.axes if ax.images]) == 1
    fig = run.plot_pareto()
    assert "bits per weight" in fig.axes[0].get_xlabel()


# -- evocomp report ------------------------------------------------------------------------------


def test_report_writes_plots_and_a_summary(runs, tmp_path, capsys):
    assert main(["-q", "report", str(runs["evo"])]) == 0
    out = runs["evo"] / "report"
    assert str(out / "report.md") in capsys.readouterr().out
    for png in ("pareto.png", "progress.png", "allocation.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    text = (out / "report.md").read_text()
    best = _json(runs["evo"] / "best.json")
    assert f"{best['fitness']:.6g}" in text
    assert "## Held-out perplexity" in text and "searched" in text
    assert "`evopress`" in text and "`sparsity`" in text
    for png in ("pareto.png", "progress.png", "allocation.png"):
        assert f"]({png})" in text

    assert main(["-q", "report", str(runs["front"]), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    front = pd.read_parquet(runs["front"] / "pareto.parquet")
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + min(20, len(front))  # header + front rows
    assert "Held-out" not in text
    assert main(["-q", "report", str(tmp_path)]) == 2  # not a run: a clear error


# -- import cost and the notebook ------------------------------------------------------------


def test_import_evocomp_stays_light():
    code = ("import sys, evocomp; "
            "assert 'torch' not in sys.modules and 'evocomp.analysis' not in sys.modules; "
            "assert 'load_run' in dir(evocomp)")
    subprocess.run([sys.executable, "-c", code], check=True)
    from evocomp import analysis

    assert evocomp.load_run is analysis.load_run and evocomp.Runs is analysis.Runs


def test_the_committed_notebook_has_no_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_the_notebook_runs_against_a_run(runs, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("EVOCOMP_RUN", str(runs["front"]))
    monkeypatch.delenv("EVOCOMP_RUNS", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()  # raises on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 6  # pareto, progress, allocation; two runs' pareto, progress; axes
    text = "".join(o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "<Run 'front'" in text and "<Runs ['evo', 'front']>" in text
