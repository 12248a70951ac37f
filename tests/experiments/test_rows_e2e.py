"""Rows already scored for a genome are not scored again: an EvoPress stage that
scores its survivors on more sequences runs only the new ones, with the same
results."""

from __future__ import annotations

import json

import pandas as pd
from conftest import _saved, search_config, tiny_llama

from evocomp import runner
from evocomp.cli import main


def _search(tmp_path, name: str, **sections) -> tuple[list, pd.DataFrame]:
    cfg = search_config(tmp_path, tmp_path / "tiny", name=name,
                        final_eval={"enabled": False}, **sections)
    assert main(["-q", "search", cfg]) == 0
    run = tmp_path / "runs" / name
    return json.loads((run / "best.json").read_text())["genome"], pd.read_parquet(
        run / "trials.parquet"
    )


def test_memoised_rows_give_the_same_search_for_fewer_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))
    _saved(tiny_llama(layers=4), tmp_path / "tiny")
    evaluator = {"name": "kl", "batch_size": 1}
    best, trials = _search(tmp_path, "memo", evaluator=evaluator)
    # The same search scoring every row of every evaluation.
    monkeypatch.setattr(runner.Experiment, "_rows_memo", property(lambda self: None))
    best_all, trials_all = _search(tmp_path, "all", evaluator=evaluator)

    def scores(t: pd.DataFrame) -> list:
        return sorted(zip(t["genome"], t["tokens"], t["fitness"], strict=True))

    assert best == best_all and scores(trials) == scores(trials_all)
    assert (trials_all["spent"] == trials_all["tokens"]).all()
    # Stage 2 (256 tokens = 4 rows of 64) scores the stage-1 survivors on 3 new rows.
    second = trials[(trials.tokens == 256) & (trials.role == "candidate")]
    assert (second["spent"] == 192).sum() >= 4
    assert trials["spent"].sum() < trials["tokens"].sum()
    spent = json.loads((tmp_path / "runs" / "memo" / "best.json").read_text())["tokens"]
    assert spent["evaluation"] == trials["spent"].sum()


def test_batched_rows_without_prefix_reuse_are_scored_whole(tmp_path, monkeypatch):
    # A row's logits may differ in the last bit with its batch-mates: no memo then.
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))
    _saved(tiny_llama(layers=4), tmp_path / "tiny")
    _, trials = _search(tmp_path, "batched", evaluator={"name": "kl", "batch_size": 2},
                        database={"path": str(tmp_path / "db"), "prefix_gb": 0})
    assert (trials["spent"] == trials["tokens"]).all()


def test_each_look_of_a_raced_stage_scores_one_new_sequence(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))
    _saved(tiny_llama(layers=4), tmp_path / "tiny")
    _, trials = _search(tmp_path, "raced", evaluator={"name": "kl", "batch_size": 1},
                        search={"name": "evopress", "generations": 4, "offspring": 4,
                                "race": {"warmup": 2},
                                "stages": [{"tokens": 64, "keep": 2},
                                           {"tokens": 256, "keep": 1}]})
    looks = trials[trials.tokens.isin([128, 192]) & (trials.role == "candidate")]
    assert len(looks) > 0 and set(looks["spent"]) <= {0, 64}
    assert (looks["spent"] == 64).any()
