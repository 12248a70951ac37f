"""Sweeps: many tiny searches as Ray Tune trials on a local Ray, their results
table, resuming without re-evaluating, and sweep files refused before Ray starts."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import search_config

from evocomp.cli import main
from evocomp.errors import EvocompError

pytest.importorskip("ray.tune")

from evocomp.sweep import _plan, _run_trial, load_sweep, run_name, run_sweep  # noqa: E402

SEARCH = {
    "name": "evopress",
    "generations": 2,
    "offspring": 4,
    "stages": [{"tokens": 64, "keep": 2}, {"tokens": 128, "keep": 1}],
}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the sweeps of this file (starting Ray costs seconds). It was
    started before each test set $EVOCOMP_CACHE, so the trials find the test's cache
    only because the sweep forwards the driver's EVOCOMP_* variables."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # the sweeps' default roots land here


def sweep_file(tmp_path: Path, base: str, **fields) -> Path:
    path = tmp_path / f"{fields['name']}.yaml"
    path.write_text(yaml.safe_dump({"base": base, "resources": {"cpu": 1}, **fields}))
    return path


def test_a_grid_sweep_runs_each_search_and_resumes_without_reevaluating(
    tmp_path, tiny_model_dir, capsys, local_ray
):
    base = search_config(tmp_path, tiny_model_dir, search=SEARCH)
    # A relative root: trials run in Tune's folders but resolve it as the driver does.
    path = sweep_file(tmp_path, base, name="seeds", grid={"seed": [0, 1]}, root="out/seeds")
    table = run_sweep(path, progress=False)
    root = tmp_path / "out" / "seeds"

    assert table.seed.tolist() == [0, 1]
    assert table.status.tolist() == ["done", "done"]
    assert table.search.tolist() == ["seed-0", "seed-1"]
    saved = pd.read_parquet(root / "results.parquet")
    assert saved.drop(columns=["seconds"]).equals(table.drop(columns=["seconds"]))
    assert "| search | seed | status |" in (root / "results.md").read_text()
    for _, row in table.iterrows():
        run = root / "runs" / row["search"]
        assert Path(row["run_dir"]) == run
        assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == row["seed"]
        best = json.loads((run / "best.json").read_text())
        held = json.loads((run / "eval.json").read_text())["ppl"]
        assert {k: row[k] for k in ("fitness", "cost", "budget")} == {
            k: best[k] for k in ("fitness", "cost", "budget")
        }
        assert {k: row[f"ppl.{k}"] for k in held} == held
        assert row["evaluations"] == len(pd.read_parquet(run / "trials.parquet")) > 0
        assert row["new_evaluations"] == row["evaluations"]  # a fresh search
    trials = {r: (root / "runs" / r / "trials.parquet").read_bytes() for r in table.search}

    # Running it again needs --resume; the finished searches are restored, not rerun.
    with pytest.raises(EvocompError, match="already ran.*--resume"):
        run_sweep(path, progress=False)
    capsys.readouterr()
    assert main(["-q", "sweep", str(path), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "| seed-0 | 0 | done |" in out and "| seed-1 | 1 | done |" in out
    restored = pd.read_parquet(root / "results.parquet")
    assert restored.drop(columns=["seconds"]).equals(table.drop(columns=["seconds"]))
    assert {r: (root / "runs" / r / "trials.parquet").read_bytes() for r in table.search} == trials

    # A search whose trial was cut short (or whose Tune state was lost) runs again in
    # a new trial and continues from its trial store: nothing is evaluated twice, and
    # the held-out evaluation of the unchanged best genome is reused.
    plan = _plan(load_sweep(path))
    eval_json = (root / "runs" / "seed-1" / "eval.json").read_bytes()
    again = _run_trial({"seed": 1}, plan)
    assert again["new_evaluations"] == 0
    assert {k: again[k] for k in ("fitness", "evaluations", "ppl.searched", "run_dir")} == {
        k: table.loc[1, k] for k in ("fitness", "evaluations", "ppl.searched", "run_dir")
    }
    assert (root / "runs" / "seed-1" / "trials.parquet").read_bytes() == trials["seed-1"]
    assert (root / "runs" / "seed-1" / "eval.json").read_bytes() == eval_json


def test_an_optuna_sweep_runs_its_trials(tmp_path, tiny_model_dir, local_ray):
    base = search_config(tmp_path, tiny_model_dir, search=SEARCH)
    optuna = {
        "trials": 2,
        "metric": "fitness",
        "mode": "min",
        "params": {"search.offspring": {"low": 2, "high": 4, "type": "int"}},
    }
    path = sweep_file(
        tmp_path, base, name="opt", optuna=optuna, set={"final_eval.enabled": False},
        max_concurrent=2,
    )
    table = run_sweep(path, progress=False)
    assert table.status.tolist() == ["done", "done"]
    assert table["search.offspring"].between(2, 4).all()
    assert "ppl.searched" not in table  # the held-out evaluation was off
    for _, row in table.iterrows():
        best = json.loads((Path(row["run_dir"]) / "best.json").read_text())
        assert row["fitness"] == best["fitness"]
        cfg = yaml.safe_load((Path(row["run_dir"]) / "config.yaml").read_text())
        assert cfg["search"]["offspring"] == row["search.offspring"]


def test_a_bad_key_fails_before_ray_starts(tmp_path, tiny_model_dir, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(ray, "init", no_ray)
    base = search_config(tmp_path, tiny_model_dir)
    path = sweep_file(tmp_path, base, name="bad", grid={"space.targt": [0.4, 0.5]})
    with pytest.raises(EvocompError, match=r"(?s)space.targt=0.4.*targt.*did you mean 'target'"):
        run_sweep(path, progress=False)
    path = sweep_file(tmp_path, base, name="bad2", grid={"seed": [0]}, set={"serch.name": "ga"})
    assert main(["-q", "sweep", str(path)]) == 2
    opt = {"trials": 2, "params": {"search.offspring": {"low": 0, "high": 4, "type": "int"}}}
    path = sweep_file(tmp_path, base, name="bad3", optuna=opt)
    with pytest.raises(EvocompError, match="search.offspring=0"):
        run_sweep(path, progress=False)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"grid": {"seed": [0]}, "optuna": {"trials": 2, "params": {"seed": {"choices": [0]}}}},
         "exactly one of grid .* or optuna"),
        ({}, "exactly one of grid"),
        ({"grid": {"seed": [0, 0]}}, "grid.seed lists a value twice"),
        ({"grid": {"run_dir": ["a"]}}, "run_dir is set by the sweep"),
        ({"grid": {"seed": [0]}, "set": {"seed": 1}}, "both fixed"),
        ({"grid": {"seed": [0]}, "resources": {"cpus": 1}}, "resources.cpus.*did you mean 'cpu'"),
        ({"optuna": {"trials": 2, "metric": "loss", "params": {"seed": {"low": 0, "high": 1}}}},
         "unknown metric 'loss'"),
    ],
)
def test_bad_sweep_files_are_refused(tmp_path, fields, message):
    path = sweep_file(tmp_path, "quickstart", name="s", **fields)
    with pytest.raises(EvocompError, match=message):
        load_sweep(path)


def test_built_in_sweeps_resolve_and_validate(tmp_path):
    from evocomp.sweep import _check_trials

    sweep = load_sweep("sparsity_targets")
    plan = _plan(sweep)
    trials = _check_trials(sweep, plan)  # every search's config is valid
    assert len(trials) == 6
    cfg = plan.config(trials[-1])
    steps = [step.params().generations for step in cfg.search.params.steps]
    assert (cfg.space.params.target, cfg.seed, steps) == (0.6, 1, [5, 4])
    root = tmp_path / "runs" / "sweeps" / "sparsity_targets"  # the default root
    assert cfg.run_dir == str(root / "runs" / "space.target-0.6_seed-1")
    with pytest.raises(EvocompError, match="not a file or a built-in sweep.*sparsity_targets"):
        load_sweep("no-such-sweep")


def test_run_names_are_readable_and_distinct():
    assert run_name({"space.target": 0.4, "search.name": "ga"}) == "space.target-0.4_search.name-ga"
    a = run_name({"search.start_from": ["shortgpt"]})
    b = run_name({"search.start_from": ["shortgpt", "x"]})
    assert a.startswith("search.start_from-shortgpt-") and a != b
    assert len(run_name({"k": "x" * 300})) <= 100


def test_ray_is_started_quietly_and_only_what_was_started_is_shut_down(tmp_path, monkeypatch):
    import ray

    from evocomp.sweep import _ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("shutdown", {})))
    sweep = load_sweep(sweep_file(tmp_path, "quickstart", name="s", grid={"seed": [0]}))
    with _ray(sweep):
        assert calls == [("init", {"address": "local", "num_cpus": None,
                                   "include_dashboard": False, "log_to_driver": False,
                                   "logging_level": 30})]
    assert calls[-1][0] == "shutdown"

    calls.clear()
    gpu = sweep.model_copy(update={"resources": sweep.resources.model_copy(update={"gpu": 1})})
    with pytest.raises(EvocompError, match="asks 1 GPU per search; this machine has 0"), _ray(gpu):
        pass
    assert [c for c, _ in calls] == ["init", "shutdown"]

    def refuse(**kw):
        raise ConnectionError("no cluster here")

    monkeypatch.setattr(ray, "init", refuse)
    cluster = sweep.model_copy(update={"address": "auto"})
    with pytest.raises(EvocompError, match="cannot join the Ray cluster at 'auto'"), _ray(cluster):
        pass

    calls.clear()
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # someone else's Ray
    with _ray(sweep):
        pass
    assert calls == []


def test_the_results_table_marks_failed_and_unfinished_searches(tmp_path):
    from types import SimpleNamespace

    from evocomp.sweep import _table

    sweep = load_sweep(sweep_file(tmp_path, "quickstart", name="s", grid={"seed": [0, 1, 2]}))
    plan = _plan(sweep)
    # Results carry no config until their trial reports; the trials' configs say it.
    results = [
        SimpleNamespace(config=None, path="t2", metrics={}, error=None),  # cut short
        SimpleNamespace(
            config=None, path="t1", metrics={}, error=RuntimeError("Traceback\nEvocompError: bad")
        ),
        SimpleNamespace(
            config={"seed": 0}, path="t0", metrics={"fitness": 0.5, "ppl.searched": 9.0}, error=None
        ),
    ]
    configs = {"t0": {"seed": 0}, "t1": {"seed": 1}, "t2": {"seed": 2}}
    table = _table(plan, [{"seed": s} for s in (0, 1, 2)], results, configs)
    assert table.seed.tolist() == [0, 1, 2]  # the grid's order
    assert table.status.tolist() == ["done", "error", "pending"]
    assert table.error.tolist() == ["", "EvocompError: bad", ""]
    assert table.fitness[0] == 0.5 and table["ppl.searched"].isna().tolist() == [False, True, True]
