"""Several `evocomp search` processes sharing one study: the work is split, no
candidate is evaluated twice or lost, and the result is the single-process one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import fresh_database, search_config

from evocomp.cli import main
from evocomp.config import load_config
from evocomp.runner import Experiment, RunDir, open_store
from evocomp.search.store import Job

SEARCH = {
    "name": "evopress",
    "generations": 12,
    "offspring": 8,
    "stages": [{"tokens": 64, "keep": 2}, {"tokens": 256, "keep": 1}],
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))


def worker(cfg: str, run_dir: Path, storage: str) -> subprocess.Popen:
    args = ["-q", "search", cfg, "--no-eval", "--set", f"run_dir={run_dir}"]
    args += ["--set", f"store.storage={storage}", "--set", "store.study=shared"]
    # One thread, as in this process, so every worker computes bit-identical metrics.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "evocomp.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize("backend", ["journal", "postgresql"])
def test_two_workers_share_one_study(tmp_path, tiny_model_dir, backend, request):
    cfg = search_config(tmp_path, tiny_model_dir, search=SEARCH)
    # The same search in one process (this also builds the database and references,
    # which the workers then only open).
    assert main(["-q", "search", cfg, "--no-eval", "--set", f"run_dir={tmp_path / 'solo'}"]) == 0
    solo = pd.read_parquet(tmp_path / "solo" / "trials.parquet")

    if backend == "journal":
        storage = f"journal:{tmp_path / 'shared.journal'}"
    else:
        storage = fresh_database(request.getfixturevalue("postgres_url"))
    runs = [tmp_path / f"w{k}" for k in range(2)]
    # A gate, so that the workers search side by side however late either starts: this
    # process holds the search's first job until both workers are alive, then lets go.
    gate_cfg = load_config(cfg, [f"store.storage={storage}", "store.study=shared"])
    exp = Experiment(gate_cfg, progress=False)
    with open_store(exp, RunDir(tmp_path / "gate")) as gate:
        first = Job(exp.space.uniform(), SEARCH["stages"][-1]["tokens"], 0, "baseline")
        held, _ = gate.claim([first])
        assert len(held) == 1
        procs = [worker(cfg, run, storage) for run in runs]
        deadline = time.time() + 300
        while len(gate.alive_workers()) < 3 and time.time() < deadline:
            time.sleep(0.2)
        gate.release(held)
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out

    tables = [pd.read_parquet(run / "trials.parquet") for run in runs]
    # Every worker ends with the whole study, and it is exactly the solo search's.
    for df in tables:
        assert sorted(zip(df.genome, df.tokens, strict=True)) == sorted(
            zip(solo.genome, solo.tokens, strict=True)
        )
        assert df.set_index(["genome", "tokens"]).fitness.sort_index().tolist() == pytest.approx(
            solo.set_index(["genome", "tokens"]).fitness.sort_index().tolist(), rel=1e-6
        )
    # Both took a share of the evaluations, and none was evaluated twice.
    assert tables[0].worker.nunique() == 2
    best = [json.loads((run / "best.json").read_text())["genome"] for run in runs]
    assert best[0] == best[1] == json.loads((tmp_path / "solo" / "best.json").read_text())["genome"]
    if backend == "journal":
        from evocomp.search.store import storage_url

        study = optuna.load_study(study_name="shared", storage=storage_url(storage, tmp_path))
    else:
        study = optuna.load_study(study_name="shared", storage=storage)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    keys = [(t.user_attrs["genome"], t.user_attrs["tokens"]) for t in complete]
    assert len(keys) == len(set(keys)) == len(solo)
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))


def test_a_search_on_ray_workers_matches_the_local_search(tmp_path, tiny_model_dir):
    """The same search through the Ray executor (local Ray, 2 CPU workers) asks the
    same genomes and records the same metrics as in process."""
    cfg = search_config(tmp_path, tiny_model_dir, search={**SEARCH, "generations": 3})
    common = ["-q", "search", cfg, "--no-eval"]
    assert main([*common, "--set", f"run_dir={tmp_path / 'local'}"]) == 0
    ray_workers = ["--set", "executor.name=ray", "--set", "executor.num_workers=2"]
    assert main([*common, "--set", f"run_dir={tmp_path / 'ray'}", *ray_workers]) == 0
    local, on_ray = (pd.read_parquet(tmp_path / d / "trials.parquet") for d in ("local", "ray"))
    # Which process scored a genome's row first (so how many rows each evaluation
    # scored) depends on where the jobs ran: every other metric must match.
    metrics = [c for c in local.columns if c.startswith("metric.") and c != "metric.scored_tokens"]
    assert local.genome.tolist() == on_ray.genome.tolist()
    assert local[metrics].to_numpy().tolist() == on_ray[metrics].to_numpy().tolist()
    assert on_ray.spent.sum() >= local.spent.sum()
