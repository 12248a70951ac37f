"""Every optimizer on a real (tiny) model with uneven layer sensitivity: with at most
as many evaluation tokens each finds a better allocation than random search, and none
ever evaluates a genome over the budget."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import _saved, search_config, uneven_llama

from evocomp.cli import main

EVALS = 48
TOKENS = 256
SPACE = {"name": "sparsity", "target": 0.5, "step": 0.1, "levels": 4}  # 0.1 .. 0.9

SEARCHES = {
    "random": {"name": "random", "samples": EVALS, "batch": 8, "tokens": TOKENS},
    # Start + 5 generations x (8 children on 64 tokens, the best 2 and the parent on 256).
    "evopress": {
        "name": "evopress",
        "generations": 5,
        "offspring": 8,
        "stages": [{"tokens": 64, "keep": 2}, {"tokens": TOKENS, "keep": 1}],
    },
    "ga": {"name": "ga", "population": 8, "offspring": 8, "generations": EVALS // 8 - 1,
           "tokens": TOKENS},
    "optuna": {"name": "optuna", "sampler": "tpe", "trials": EVALS, "batch": 8, "startup": 16,
               "tokens": TOKENS},
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One search per optimizer on the uneven model, sharing its database."""
    tmp = tmp_path_factory.mktemp("optimizers")
    mp = pytest.MonkeyPatch()
    mp.setenv("EVOCOMP_CACHE", str(tmp / "cache"))
    model_dir = _saved(uneven_llama(), tmp / "uneven-llama")
    out = {}
    try:
        for name, search in SEARCHES.items():
            cfg = search_config(tmp, model_dir, name=name, search=search, space=SPACE,
                                final_eval={"enabled": False})
            assert main(["-q", "search", cfg]) == 0
            run = tmp / "runs" / name
            out[name] = (
                json.loads((run / "best.json").read_text()),
                pd.read_parquet(run / "trials.parquet"),
            )
    finally:
        mp.undo()
    return out


@pytest.mark.parametrize("name", ["evopress", "ga", "optuna"])
def test_each_optimizer_beats_random_search_at_equal_tokens(results, name):
    best, trials = results[name]
    random_best, random_trials = results["random"]
    # Equal budgets in evaluated tokens (EvoPress spends few tokens on most children).
    assert trials.tokens.sum() <= random_trials.tokens.sum() + TOKENS  # + the uniform start
    assert best["fitness"] < random_best["fitness"], (best["fitness"], random_best["fitness"])


@pytest.mark.parametrize("name", list(SEARCHES))
def test_no_optimizer_evaluates_over_the_budget(results, name):
    best, trials = results[name]
    assert (trials.cost <= best["budget"]).all()
    assert best["cost"] <= best["budget"]
