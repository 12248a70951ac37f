"""OWL and sensitivity from a config on the tiny model: measured by the runner,
probes recorded in the trial store, and both as EvoPress start genomes."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import search_config

from evocomp.cli import main
from evocomp.search.store import decode_genome


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))


def _run(tmp_path, model_dir, search, **sections):
    cfg = search_config(tmp_path, model_dir, name=search["name"], search=search, **sections)
    assert main(["-q", "search", cfg, "--no-eval"]) == 0
    run = tmp_path / "runs" / search["name"]
    return run, json.loads((run / "best.json").read_text()), pd.read_parquet(run / "trials.parquet")


def test_owl_search_is_one_evaluation_on_budget(tmp_path, tiny_model_dir):
    space = {"name": "sparsity", "target": 0.5, "step": 0.05, "levels": 4}
    run, best, trials = _run(
        tmp_path, tiny_model_dir, {"name": "owl", "tokens": 128, "batch_size": 2}, space=space
    )
    assert best["cost"] == best["budget"] and best["progress"] == [1, 1]
    assert len(trials) == 1 and trials.tokens.tolist() == [128]


def test_sensitivity_search_records_its_probes(tmp_path, tiny_model_dir):
    search = {"name": "sensitivity", "tokens": 64, "final_tokens": 128, "radius": 1}
    run, best, trials = _run(tmp_path, tiny_model_dir, search)
    units = len(best["layers"])
    probes = trials[trials.tokens == 64]
    assert len(probes) == 1 + 2 * units  # uniform + one unit a level up or down
    assert sorted(probes.role.unique()) == ["baseline", "probe"]
    assert (probes[probes.role == "probe"].cost != best["budget"]).all()  # off budget
    final = trials[trials.tokens == 128]
    assert len(final) == 1 and final.cost.iloc[0] <= best["budget"]
    assert decode_genome(final.genome.iloc[0]) == tuple(best["genome"])
    assert best["tokens"]["evaluation"] == 64 * len(probes) + 128
    assert best["cost"] <= best["budget"] and best["progress"] == [2, 2]
    # A resumed search evaluates nothing again.
    assert main(["-q", "search", "--resume", str(run), "--no-eval"]) == 0
    assert len(pd.read_parquet(run / "trials.parquet")) == len(trials)


def test_evopress_starts_from_owl_and_sensitivity(tmp_path, tiny_model_dir):
    search = {
        "name": "evopress",
        "generations": 1,
        "offspring": 2,
        "start_from": ["owl", "sensitivity"],
        "stages": [{"tokens": 64, "keep": 1}],
    }
    # sensitivity's default probes score 512 tokens: 8 search sequences of 64.
    data = {"search": 8}
    run, best, trials = _run(tmp_path, tiny_model_dir, search, data=data)
    probes = trials[trials.tokens == 512]
    assert len(probes) == 1 + 4 * len(best["layers"])  # radius 2 around the uniform level
    assert (probes.role == "probe").sum() == len(probes) - 1
    assert best["cost"] <= best["budget"]

