"""Pareto fronts over evaluations, and the one a multi-objective search writes."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
from conftest import search_config

from evocomp.cli import main
from evocomp.results import pareto_front


def dominated(row, df) -> bool:
    return bool(
        ((df.cost <= row.cost) & (df.fitness <= row.fitness)
         & ((df.cost < row.cost) | (df.fitness < row.fitness))).any()
    )


def test_pareto_front_keeps_exactly_the_non_dominated_rows():
    rng = random.Random(0)
    cost = [rng.randrange(20) for _ in range(200)]
    df = pd.DataFrame({"cost": cost, "fitness": [rng.random() for _ in range(200)]})
    front = pareto_front(df)
    assert not any(dominated(r, df) for r in front.itertuples())
    rest = df.merge(front, how="left", indicator=True).query("_merge == 'left_only'")
    assert all(dominated(r, df) for r in rest.itertuples())
    assert front.cost.is_monotonic_increasing and front.fitness.is_monotonic_decreasing


def test_pareto_front_of_nothing_is_empty():
    assert pareto_front(pd.DataFrame({"cost": [], "fitness": []})).empty


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))


def test_a_multi_objective_search_writes_its_front(tmp_path, uneven_model_dir):
    search = {"name": "nsga2", "population": 12, "offspring": 12, "generations": 4, "tokens": 128}
    # Levels 0.1 .. 0.9 around the 50% target: the front runs from light to heavy pruning.
    space = {"name": "sparsity", "target": 0.5, "step": 0.1, "levels": 4}
    cfg = search_config(tmp_path, uneven_model_dir, search=search, space=space,
                        final_eval={"enabled": False})
    assert main(["-q", "search", cfg]) == 0
    run = tmp_path / "runs" / "tiny"
    trials = pd.read_parquet(run / "trials.parquet")
    front = pd.read_parquet(run / "pareto.parquet")
    assert not any(dominated(r, trials) for r in front.itertuples())
    # It spans the cost range the search explored, on both sides of the budget.
    best = json.loads((run / "best.json").read_text())
    assert front.cost.min() < 0.7 * best["budget"] < 1.3 * best["budget"] < front.cost.max()
    assert len(front) >= 5
    # best.json is the best evaluated genome within the budget.
    feasible = trials[trials.cost <= best["budget"]]
    assert best["cost"] <= best["budget"]
    assert best["fitness"] == pytest.approx(feasible.fitness.min())
    # `evocomp eval --front`: every front candidate plus dense, uniform and searched,
    # on two corpora and an lm-eval task.
    args = ["-q", "eval", str(run), "--front", "--corpora", "books", "--tasks", "arc_easy",
            "--limit", "4"]
    assert main(args) == 0
    table = pd.read_parquet(run / "eval.parquet")
    names = table.name.tolist()
    assert names[:3] == ["dense", "uniform", "searched"] and len(names) == 3 + len(front)
    assert {"ppl.wiki", "ppl.books", "task.arc_easy/accuracy", "task.arc_easy/n"} <= set(table)
    assert (table["task.arc_easy/n"] == 4).all()
    assert table["task.arc_easy/accuracy"].between(0, 1).all()
    rows = table.set_index("name")
    assert pd.isna(rows.loc["dense", "cost"]) and rows.loc["searched", "cost_of_budget"] <= 1
    fronts = table[table.name.str.startswith("front-")]
    assert fronts.cost.is_monotonic_increasing
    # The same genome scores the same wherever it appears in the table.
    same = fronts[fronts.genome == rows.loc["searched", "genome"]]
    assert len(same) == 1 and same["ppl.books"].iloc[0] == rows.loc["searched", "ppl.books"]
    report = json.loads((run / "eval.json").read_text())
    assert report["ppl"]["dense"] == rows.loc["dense", "ppl.wiki"]
    assert "| name |" in (run / "eval.md").read_text()
