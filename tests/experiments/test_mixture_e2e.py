"""End to end: a search on a corpus mixture, then `evocomp eval --corpora` with
held-out perplexity and KL to the dense model per corpus, marked seen or not."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import search_config

from evocomp import runner
from evocomp.cli import main
from evocomp.evaluators import PerplexityEvaluator
from evocomp.evaluators.data import split_tokens


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))


def test_search_on_a_mixture_then_eval_per_corpus(tmp_path, uneven_model_dir, capsys):
    cfg = search_config(tmp_path, uneven_model_dir, data={"corpus": {"wiki": 1, "books": 1}})
    assert main(["-q", "search", cfg]) == 0
    run = tmp_path / "runs" / "tiny"
    report = json.loads((run / "eval.json").read_text())
    assert report["corpus"] == {"books": 0.5, "wiki": 0.5}
    assert report["corpora"] == ["books+wiki", "books", "wiki"]
    assert all(report["seen"].values())
    capsys.readouterr()

    assert main(["-q", "eval", str(run), "--corpora", "code", "wiki"]) == 0
    out = capsys.readouterr().out
    assert "code (not seen)" in out and "wiki (seen)" in out and "kl.code" in out
    report = json.loads((run / "eval.json").read_text())
    corpora = ["books+wiki", "books", "wiki", "code"]
    assert report["corpora"] == corpora
    assert report["seen"] == {"books+wiki": True, "books": True, "wiki": True, "code": False}
    table = pd.read_parquet(run / "eval.parquet")
    assert table.attrs["corpora"]["code"] == {"seen": False, "sequences": 8, "tokens": 512}
    assert table.attrs["corpora"]["books"]["seen"] is True
    rows = table.set_index("name")
    for corpus in corpora:
        assert rows.loc["dense", f"kl.{corpus}"] == pytest.approx(0.0, abs=1e-6)
        for name in ("uniform", "searched"):
            assert rows.loc[name, f"kl.{corpus}"] > 0.01
            assert rows.loc[name, f"ppl.{corpus}"] > 1
    # The headline numbers are the run's own (mixed) held-out split's.
    assert report["ppl"]["searched"] == rows.loc["searched", "ppl.books+wiki"]
    assert report["kl"]["uniform"] == rows.loc["uniform", "kl.books+wiki"]
    md = (run / "eval.md").read_text()
    assert "| books+wiki | yes (the mixture books 0.5, wiki 0.5) | 8 | 512 |" in md
    assert "| code | no | 8 | 512 |" in md and "| name |" in md

    # The numbers are those of the candidate on each corpus's held-out sequences.
    exp = runner.Experiment(runner.load_run_config(run)[0], progress=False)
    best = runner.load_best(runner.RunDir(run))
    tokens = {"books+wiki": exp.splits.heldout}
    for part in ("books", "wiki", "code"):
        tokens[part] = split_tokens(exp.cfg.data.alone(part), "heldout", exp.loaded.tokenizer)
    with exp.applied(best) as model:
        for corpus, held in tokens.items():
            ppl = PerplexityEvaluator(held).evaluate(model)["ppl"]
            assert ppl == pytest.approx(rows.loc["searched", f"ppl.{corpus}"], rel=1e-5)
    # The mixture's held-out rows are the first held-out rows of each part.
    blocks = exp.splits.blocks("heldout")
    assert [b.corpus for b in blocks] == ["books", "wiki"]
    for block in blocks:
        assert torch.equal(exp.splits.heldout[list(block.rows)],
                           tokens[block.corpus][: len(block.rows)])
