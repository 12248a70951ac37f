"""Width search end to end on the tiny uneven Llama: the search beats uniform width
on held-out text, resume re-evaluates nothing, and both export forms reload and
reproduce the searched model's logits."""

import json

import pytest
import torch
from conftest import search_config
from transformers import AutoModelForCausalLM

from evocomp import runner
from evocomp.cli import main
from evocomp.evaluators import KLEvaluator


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))


def test_width_search_beats_uniform_and_both_exports_reproduce_it(tmp_path, uneven_model_dir):
    cfg = search_config(
        tmp_path,
        uneven_model_dir,
        name="width",
        compressor={"name": "structured-obs"},
        space={"name": "width", "target": 0.5, "step": 0.25, "levels": 2, "neuron_multiple": 16},
        search={
            "name": "evopress",
            "generations": 6,
            "offspring": 4,
            "stages": [{"tokens": 64, "keep": 2}, {"tokens": 256, "keep": 1}],
        },
    )
    assert main(["-q", "search", cfg]) == 0
    run = tmp_path / "runs" / "width"
    best = json.loads((run / "best.json").read_text())
    assert best["cost"] <= best["budget"]
    assert {"heads", "neurons"} <= {k for row in best["layers"] for k in row}

    config, _ = runner.load_run_config(run)
    exp = runner.Experiment(config, progress=False)
    kl = KLEvaluator.create(exp.model, exp.splits.heldout, KLEvaluator.Params(), progress=False)
    scores = {}
    for name, genome in {"uniform": exp.space.uniform(), "searched": tuple(best["genome"])}.items():
        with exp.applied(genome) as model:
            scores[name] = kl.evaluate(model)["kl"]
    assert scores["searched"] < scores["uniform"], scores

    evaluations = len((run / "trials.jsonl").read_text().splitlines()) if (
        run / "trials.jsonl"
    ).exists() else None
    assert main(["-q", "search", "--resume", str(run), "--no-eval"]) == 0
    if evaluations is not None:
        assert len((run / "trials.jsonl").read_text().splitlines()) == evaluations

    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), exp.applied(tuple(best["genome"])) as model:
        want = model(x, use_cache=False).logits
    zeroed, compact = tmp_path / "zeroed", tmp_path / "compact"
    assert main(["-q", "export", str(run), "--out", str(zeroed)]) == 0
    assert main(["-q", "export", str(run), "--out", str(compact), "--compact"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(zeroed).eval()
    small = AutoModelForCausalLM.from_pretrained(compact, trust_remote_code=True).eval()
    dense_params = sum(p.numel() for p in plain.parameters())
    assert sum(p.numel() for p in small.parameters()) < dense_params
    assert type(small).__name__ == "CompactLlamaForCausalLM"
    assert plain.config.use_cache and small.config.use_cache  # they generate with a cache
    heads = [r["heads"] for r in best["layers"] if "heads" in r]
    assert small.config.layer_heads == heads
    for model in (plain, small):
        with torch.no_grad():
            got = model(x, use_cache=False).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_width_space_with_a_sparsity_compressor_is_one_clear_error(
    tmp_path, uneven_model_dir, capsys
):
    cfg = search_config(tmp_path, uneven_model_dir, space={"name": "width", "step": 0.25})
    assert main(["-q", "search", cfg]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "structured-obs" in err[0] and "compressor.name" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_a_latency_budget_is_measured_once_and_recorded_in_the_run(
    tmp_path, uneven_model_dir, monkeypatch
):
    cfg = search_config(
        tmp_path,
        uneven_model_dir,
        name="fast",
        compressor={"name": "structured-obs", "propagate": "dense"},
        space={"name": "width", "cost": "latency", "target": 0.6, "step": 0.25,
               "neuron_multiple": 32},
        search={"name": "random", "samples": 3, "tokens": 64},
    )
    from evocomp.supernet import latency

    # Times proportional to the width, so the grid does not depend on this machine's
    # noise (a tiny model's sublayers take ~0.2 ms, mostly fixed overhead).
    def linear_ns(_model, _block, _hidden, _kwargs, _request, kept, _repeats):
        return 1000 + 100 * (kept or 0)

    monkeypatch.setattr(latency, "_fastest_ns", linear_ns)
    assert main(["-q", "search", cfg, "--no-eval"]) == 0
    run = tmp_path / "runs" / "fast"
    recorded = runner.load_run_config(run)[0].space.params.latency
    assert recorded and all(t[0] == 0 for t in recorded.values())
    best = json.loads((run / "best.json").read_text())
    assert best["cost"] <= best["budget"] and "latency_ms" in best["layers"][0]

    def no_timing(*_a, **_k):
        raise AssertionError("a resumed run measured its sublayers again")

    monkeypatch.setattr(latency, "_fastest_ns", no_timing)
    assert main(["-q", "search", "--resume", str(run), "--no-eval"]) == 0
    assert json.loads((run / "best.json").read_text())["budget"] == best["budget"]
