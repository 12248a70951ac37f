"""A resampling EvoPress search (``search.resample``) on a tiny model: each generation
scores its own draw of the search sequences, every process scores a draw alike, the
last parent is confirmed on the stored order, and a resume evaluates nothing twice."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import search_config

from evocomp import runner
from evocomp.cli import main
from evocomp.evaluators import KLEvaluator
from evocomp.evaluators.reference import DenseReference
from evocomp.search.store import decode_genome

GENERATIONS = 4
STAGES = [{"tokens": 64, "keep": 2}, {"tokens": 192, "keep": 1}]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def run(tmp_path, tiny_model_dir):
    cfg = search_config(
        tmp_path, tiny_model_dir, name="drawn",
        data={"corpus": "wiki", "seq_len": 64, "calibration": 8, "search": 8, "heldout": 4},
        search={"name": "evopress", "generations": GENERATIONS, "offspring": 4,
                "resample": True, "stages": STAGES},
        final_eval={"enabled": False},
    )
    assert main(["-q", "search", cfg]) == 0
    return tmp_path / "runs" / "drawn"


def test_each_generation_scores_its_own_draw_and_the_answer_is_confirmed_on_draw_0(run):
    trials = pd.read_parquet(run / "trials.parquet").sort_values("number")
    assert set(trials.draw) == set(range(GENERATIONS + 1))
    final = trials[trials.tokens == STAGES[-1]["tokens"]]
    # Each generation's final stage: the parent and the kept child, on that draw.
    for draw in range(1, GENERATIONS + 1):
        assert len(final[final.draw == draw]) == STAGES[0]["keep"]
    best = json.loads((run / "best.json").read_text())
    is_best = final.genome.map(decode_genome) == tuple(best["genome"])
    confirmed = final[(final.draw == 0) & is_best]
    assert len(confirmed) == 1 and confirmed.fitness.iloc[0] == best["fitness"]
    # It is the winner of the last generation's draw.
    last = final[final.draw == GENERATIONS]
    assert decode_genome(last.loc[last.fitness.idxmin(), "genome"]) == tuple(best["genome"])


def test_a_draw_is_the_evaluator_on_those_sequences_in_every_process(run):
    trials = pd.read_parquet(run / "trials.parquet")
    cfg, _ = runner.load_run_config(run)
    exp = runner.Experiment(cfg, progress=False)
    ev = exp.evaluator
    assert isinstance(ev, KLEvaluator)
    order = exp.order(3)
    assert sorted(order) == list(range(8)) and order != list(range(8))
    assert order == runner.Experiment(cfg, progress=False).order(3)  # seeded, not random
    assert exp.order(4) != order
    row = trials[(trials.draw == 3) & (trials.tokens == STAGES[-1]["tokens"])].iloc[0]
    rows = order[: STAGES[-1]["tokens"] // 64]
    alone = KLEvaluator(
        ev.tokens[rows],
        DenseReference(ev.reference.probs[rows], ev.reference.neg_entropy[rows], None),
        batch_size=1,
    )
    with exp.applied(decode_genome(row.genome)) as model:
        assert alone.evaluate(model)["kl"] == pytest.approx(row.fitness, rel=1e-6)


def test_a_resumed_resampling_search_evaluates_nothing_again(run):
    before = len(pd.read_parquet(run / "trials.parquet"))
    assert main(["-q", "search", "--resume", str(run)]) == 0
    assert len(pd.read_parquet(run / "trials.parquet")) == before
