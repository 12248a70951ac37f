"""Metric search end to end on the tiny uneven Llama: the GP finds a metric at least
as good as Wanda on held-out text, rediscovers magnitude when activations and
gradients carry no information, records invalid metrics without failing, resumes,
exports; and a found metric is a compressor of the sparsity space."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import search_config
from transformers import AutoModelForCausalLM

from evocomp import runner
from evocomp.cli import main
from evocomp.config import Config
from evocomp.search.store import decode_genome
from evocomp.supernet.metric import Metric
from evocomp.supernet.units import find_linear_units

GP = {
    "name": "metric-gp",
    "population": 12,
    "generations": 4,
    "offspring": 4,
    "stages": [{"tokens": 128, "keep": 3}, {"tokens": 256, "keep": 1}],
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))


def _experiment(run) -> runner.Experiment:
    cfg, _ = runner.load_run_config(run)
    return runner.Experiment(cfg, progress=False)


def test_the_search_finds_a_metric_at_least_as_good_as_wanda_and_exports_it(
    tmp_path, uneven_model_dir
):
    """Judged as the search judges: KL on its final-stage tokens (on this random tiny
    model held-out text ranks metrics differently from any small search split)."""
    final = 1024
    cfg = search_config(
        tmp_path, uneven_model_dir, name="metric", space={"name": "metric", "target": 0.5},
        data={"corpus": "wiki", "seq_len": 64, "calibration": 8, "search": 16, "heldout": 8},
        search={**GP, "population": 24, "generations": 8, "offspring": 8,
                "stages": [{"tokens": 256, "keep": 4}, {"tokens": final, "keep": 1}]},
    )
    assert main(["-q", "search", cfg]) == 0
    run = tmp_path / "runs" / "metric"
    best = json.loads((run / "best.json").read_text())
    assert best["cost"] == best["budget"]
    cfg, _ = runner.load_run_config(run)
    exp = runner.Experiment(cfg, progress=False)
    found = tuple(best["genome"])
    assert best["expression"] == str(exp.space.expression(found))
    assert "wanda" not in str(cfg.search.params.seeds)  # it was not handed Wanda
    with exp.applied(exp.space.uniform()) as model:
        wanda = exp.evaluator.evaluate(model, final)["kl"]
    print(f"found {best['expression']} KL {best['fitness']:.4f}, wanda {wanda:.4f}")
    assert best["fitness"] <= wanda, (best["expression"], best["fitness"], wanda)
    table = json.loads((run / "eval.json").read_text())
    assert {"dense", "wanda", "searched"} <= set(table["ppl"])
    assert main(["-q", "report", str(run)]) == 0
    report = (run / "report" / "report.md").read_text()
    assert f"- expression: `{best['expression']}`" in report
    assert "- compressor:" not in report  # a metric run builds no variants

    trials = len(pd.read_parquet(run / "trials.parquet"))
    assert main(["-q", "search", "--resume", str(run), "--no-eval"]) == 0
    assert len(pd.read_parquet(run / "trials.parquet")) == trials  # nothing re-scored

    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), exp.applied(found) as model:
        want = model(x, use_cache=False).logits
    assert main(["-q", "export", str(run), "--out", str(tmp_path / "out")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x, use_cache=False).logits, want)


def test_with_uninformative_activations_and_gradients_it_rediscovers_magnitude(
    tmp_path, uneven_model_dir, monkeypatch
):
    # Every input channel looks alike (X constant) and every gradient too (G constant):
    # only |W| is left to rank by.
    monkeypatch.setattr(Metric, "_accumulate", lambda self, x: self._mean_sq.fill_(1.0))
    monkeypatch.setattr(
        runner.Experiment, "gradients",
        lambda self, units: {u.name: torch.ones(u.shape) for u in units},
    )
    cfg = search_config(tmp_path, uneven_model_dir, name="magnitude",
                        space={"name": "metric", "target": 0.5},
                        search={**GP, "generations": 6}, final_eval={"enabled": False})
    assert main(["-q", "search", cfg]) == 0
    run = tmp_path / "runs" / "magnitude"
    best = json.loads((run / "best.json").read_text())
    exp = _experiment(run)
    found = exp.swapper.kept(tuple(best["genome"]))
    magnitude = exp.swapper.kept(exp.space.genome("magnitude"))
    agree = sum((found[n] == magnitude[n]).sum().item() for n in found)
    total = sum(m.numel() for m in found.values())
    print(f"found {best['expression']}: {agree / total:.5f} of magnitude's decisions")
    assert agree / total > 0.999, (best["expression"], agree / total)


def test_invalid_metrics_are_recorded_failures_not_crashes(tmp_path, uneven_model_dir):
    cfg = search_config(tmp_path, uneven_model_dir, name="invalid",
                        space={"name": "metric"},
                        search={**GP, "generations": 1, "seeds": ["sub(W, W)", "wanda"]},
                        final_eval={"enabled": False})
    assert main(["-q", "search", cfg]) == 0
    trials = pd.read_parquet(tmp_path / "runs" / "invalid" / "trials.parquet")
    bad = trials[trials["metric.invalid"] == 1.0]
    assert len(bad) >= 1 and (bad.fitness >= 1e29).all()
    best = json.loads((tmp_path / "runs" / "invalid" / "best.json").read_text())
    assert best["fitness"] < 1e29


def test_a_found_metric_is_a_compressor_of_the_sparsity_space(tmp_path, uneven_model_dir):
    """``mul(W, X)`` as an expression builds the very variants Wanda builds; and a
    metric reading G gets its gradients in the database build."""
    dbs = {}
    for name, compressor in {
        "wanda": {"name": "wanda"},
        "as-metric": {"name": "metric", "expression": "zsn(mul(X, W))"},
        "pruner-zero": {"name": "metric", "expression": "pruner-zero"},
    }.items():
        cfg = search_config(tmp_path, uneven_model_dir, name=name, compressor=compressor,
                            search={"generations": 2}, database={"path": str(tmp_path / name)},
                            final_eval={"enabled": False})
        assert main(["-q", "search", cfg]) == 0
        config, _ = runner.load_run_config(tmp_path / "runs" / name)
        dbs[name] = runner.Experiment(config, progress=False)
    wanda, metric = dbs["wanda"], dbs["as-metric"]
    units = find_linear_units(wanda.model)
    for u in units:
        for key in wanda.database.variants(u.name):
            assert torch.equal(wanda.database.get(u.name, key), metric.database.get(u.name, key))
    pz = dbs["pruner-zero"]
    u = units[0]
    key = pz.database.variants(u.name)[-1]
    assert not torch.equal(pz.database.get(u.name, key), wanda.database.get(u.name, key))
    assert (pz.database.get(u.name, key) == 0).sum().item() == key


def test_a_metric_scored_at_two_patterns_has_the_geometric_mean_of_their_kls_as_fitness(
    tmp_path, uneven_model_dir
):
    """``space.also_at``: each part is the KL of the metric applied at that pattern
    alone, on the same tokens; the search's model stays at ``space.pattern``."""
    cfg = search_config(tmp_path, uneven_model_dir, name="both",
                        space={"name": "metric", "also_at": ["2:4"]},
                        search={**GP, "generations": 1, "seeds": ["wanda", "magnitude"]},
                        final_eval={"enabled": False})
    assert main(["-q", "search", cfg]) == 0
    run = tmp_path / "runs" / "both"
    trials = pd.read_parquet(run / "trials.parquet")
    if "metric.invalid" in trials:
        trials = trials[trials["metric.invalid"].isna()]
    parts = trials[["metric.kl@unstructured", "metric.kl@2:4"]].to_numpy()
    np.testing.assert_allclose(trials.fitness, np.sqrt(parts.prod(axis=1)), rtol=1e-12)
    assert (parts[:, 0] != parts[:, 1]).all()  # two patterns, two prunings
    best = json.loads((run / "best.json").read_text())
    assert best["also_scored_at"] == ["2:4"] and best["pattern"] == "unstructured"

    exp = _experiment(run)
    row = trials.sort_values("fitness").iloc[0]
    genome = decode_genome(row.genome)
    for pattern in ("unstructured", "2:4"):
        dump = exp.cfg.dump()
        dump["space"].update(pattern=pattern, also_at=[])
        alone = runner.Experiment(Config.model_validate(dump), progress=False)
        with alone.applied(genome) as model:
            kl = alone.evaluator.evaluate(model, int(row.tokens))["kl"]
        assert kl == pytest.approx(row[f"metric.kl@{pattern}"], rel=1e-9)
