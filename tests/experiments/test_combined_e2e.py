"""A search scored by the combined fitness (KL + first divergent token) end to end:
the baseline is measured once, kept in the trial store, and every later process (a
resume, a Ray worker's copy of the evaluation) normalises by the recorded values."""

from __future__ import annotations

import pickle

import pandas as pd
import pytest
from conftest import search_config

from evocomp import runner
from evocomp.cli import main
from evocomp.evaluators.combined import CombinedEvaluator
from evocomp.search.store import encode_genome

COMBINED = {"name": "combined", "parts": {"kl": 1.0, "dtm": 0.2}}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))


def _store(exp: runner.Experiment, run: runner.RunDir):
    return runner.open_store(exp, run)


def test_a_combined_search_records_its_baseline_and_resumes_with_it(
    tmp_path, uneven_model_dir, monkeypatch
):
    cfg_path = search_config(tmp_path, uneven_model_dir, name="combined", evaluator=COMBINED)
    assert main(["-q", "search", cfg_path]) == 0
    cfg, run = runner.load_run_config(tmp_path / "runs" / "combined")
    exp = runner.Experiment(cfg, progress=False)
    with _store(exp, run) as store:
        recorded = store.study.user_attrs[runner.BASELINE_ATTR]
    assert set(recorded) == {"kl", "dtm"} and all(v > 0 for v in recorded.values())

    trials = pd.read_parquet(run.trials)
    assert {"metric.kl", "metric.dtm", "metric.dtm.agreed", "metric.kl.ppl"} <= set(trials)
    full = trials[trials.tokens == trials.tokens.max()]
    uniform = full[full.genome == encode_genome(exp.space.uniform())]
    # The baseline scores the sum of the weights at the budget it was measured on.
    assert uniform.fitness.item() == pytest.approx(1.2, rel=1e-6)
    assert full.fitness.min() <= 1.2 + 1e-9
    kl, dtm = full["metric.kl"], full["metric.dtm"]
    assert full.fitness.to_numpy() == pytest.approx(
        (kl / recorded["kl"] + 0.2 * dtm / recorded["dtm"]).to_numpy()
    )

    # A resume (and any later worker) takes the recorded values, measuring nothing.
    def refuse(self, model):
        raise AssertionError("the baseline was measured again")

    monkeypatch.setattr(CombinedEvaluator, "measure_baseline", refuse)
    assert main(["-q", "search", "--resume", str(run.path), "--no-eval"]) == 0
    assert len(pd.read_parquet(run.trials)) == len(trials)  # nothing re-scored

    # A Ray worker's copy pickles as the config and the recorded values.
    exp = runner.Experiment(cfg, progress=False)
    with _store(exp, run) as store:
        assert runner.measured_baseline(exp, store) == recorded
    copy = pickle.loads(pickle.dumps(exp.evaluation(recorded)))
    copy.setup()
    metrics, _ = copy(exp.space.uniform(), int(trials.tokens.max()))
    assert metrics["combined"] == pytest.approx(1.2, rel=1e-6)


def test_ray_workers_score_with_the_recorded_baseline(tmp_path, uneven_model_dir):
    """Ray actors build their evaluator from the config and never measure the
    baseline: they take the driver's values, and score exactly as in process."""
    search = {"name": "evopress", "generations": 2, "offspring": 4,
              "stages": [{"tokens": 64, "keep": 2}, {"tokens": 256, "keep": 1}]}
    cfg = search_config(tmp_path, uneven_model_dir, evaluator=COMBINED, search=search)
    common = ["-q", "search", cfg, "--no-eval"]
    assert main([*common, "--set", f"run_dir={tmp_path / 'local'}"]) == 0
    ray_workers = ["--set", "executor.name=ray", "--set", "executor.num_workers=2"]
    assert main([*common, "--set", f"run_dir={tmp_path / 'ray'}", *ray_workers]) == 0
    local, on_ray = (pd.read_parquet(tmp_path / d / "trials.parquet") for d in ("local", "ray"))
    metrics = [c for c in local.columns if c.startswith("metric.")]
    assert "metric.combined" in metrics
    assert local.genome.tolist() == on_ray.genome.tolist()
    assert local[metrics].to_numpy().tolist() == on_ray[metrics].to_numpy().tolist()
