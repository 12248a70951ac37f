import json
import math
import os

import pandas as pd
import pytest
from conftest import search_config
from transformers import AutoModelForCausalLM

from evocomp import runner
from evocomp.cli import main
from evocomp.evaluators import PerplexityEvaluator


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))


def test_search_eval_export_reload(tmp_path, tiny_model_dir, capsys):
    cfg = search_config(tmp_path, tiny_model_dir)
    assert main(["-q", "search", cfg]) == 0
    run = tmp_path / "runs" / "tiny"
    for name in (
        "config.yaml",
        "trials.journal",
        "trials.parquet",
        "best.json",
        "eval.json",
        "search.log",
    ):
        assert (run / name).exists(), name
    best = json.loads((run / "best.json").read_text())
    assert best["cost"] == best["budget"]
    levels = (0.3, 0.4, 0.5, 0.6, 0.7)
    assert all(min(abs(r["sparsity"] - lv) for lv in levels) < 1e-3 for r in best["layers"])
    trials = pd.read_parquet(run / "trials.parquet")
    assert len(trials) > 10 and {"genome", "tokens", "fitness", "metric.kl", "seconds"} <= set(
        trials.columns
    )
    assert set(trials["tokens"]) == {64, 256}
    report = json.loads((run / "eval.json").read_text())
    assert set(report["ppl"]) == {"dense", "uniform", "searched"}
    out = capsys.readouterr().out
    assert "held-out perplexity" in out and "searched" in out
    # Held-out sequences are never searched on; their corpus is.
    assert "held-out tokens of wiki; the search scored other wiki text" in out

    assert main(["-q", "eval", str(run)]) == 0
    assert json.loads((run / "eval.json").read_text())["ppl"] == pytest.approx(report["ppl"])

    export = tmp_path / "exported"
    assert main(["-q", "export", str(run), "--out", str(export)]) == 0
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    cfg_obj, _ = runner.load_run_config(run)
    heldout = runner.Experiment(cfg_obj, progress=False).splits.heldout
    ppl = PerplexityEvaluator(heldout).evaluate(model)["ppl"]
    assert ppl == pytest.approx(report["ppl"]["searched"], rel=1e-5)
    umask = os.umask(0)
    os.umask(umask)
    for path in export.iterdir():  # safetensors alone would write its file as 0600
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    layers = json.loads((export / "evocomp.json").read_text())["layers"]
    for row in layers:
        w = model.get_submodule(row["unit"]).weight
        assert int((w == 0).sum()) == w.numel() - row["nonzeros"]


def test_search_beats_uniform_on_a_model_with_uneven_layers(tmp_path, uneven_model_dir):
    cfg = search_config(
        tmp_path,
        uneven_model_dir,
        space={"target": 0.6, "step": 0.1, "levels": 3},
        search={"generations": 12, "offspring": 6},
        data={"search": 8, "heldout": 16},
    )
    assert main(["-q", "search", cfg]) == 0
    run = tmp_path / "runs" / "tiny"
    trials = pd.read_parquet(run / "trials.parquet")
    best = json.loads((run / "best.json").read_text())
    uniform = trials[(trials.role == "baseline") & (trials.tokens == 256)].fitness.min()
    assert best["fitness"] < 0.9 * uniform
    ppl = json.loads((run / "eval.json").read_text())["ppl"]
    assert ppl["searched"] < ppl["uniform"]
    by_block = {}
    for row in best["layers"]:
        by_block.setdefault(row["block"], []).append(row["sparsity"])
    mean = {b: sum(v) / len(v) for b, v in by_block.items()}
    assert mean[0] < mean[3]  # the sensitive first block keeps more weights


RESUMABLE = {
    "evopress": None,  # the default in search_config
    "ga": {"name": "ga", "population": 6, "offspring": 6, "generations": 3, "tokens": 128},
    "optuna": {"name": "optuna", "trials": 20, "batch": 4, "startup": 6, "tokens": 128},
    "random": {"name": "random", "samples": 16, "batch": 4, "tokens": 128},
    "nsga2": {"name": "nsga2", "population": 8, "offspring": 8, "generations": 2, "tokens": 128},
    # killed mid-iteration: the replay crosses an iteration boundary
    "coarse-to-fine": {
        "name": "coarse-to-fine", "iterations": 2, "levels": 2,
        "inner": {"name": "evopress", "generations": 2, "offspring": 3,
                  "stages": [{"tokens": 64, "keep": 1}]},
    },
    # killed in its second step: the replay rebuilds it around the first step's genome
    "chain": {
        "name": "chain",
        "steps": [
            {"name": "ga", "population": 3, "offspring": 3, "generations": 1, "tokens": 64},
            {"name": "evopress", "generations": 2, "offspring": 3,
             "stages": [{"tokens": 64, "keep": 1}]},
        ],
    },
}


@pytest.mark.parametrize("optimizer", list(RESUMABLE))
def test_resume_after_a_kill_reevaluates_nothing(
    tmp_path, tiny_model_dir, monkeypatch, optimizer
):
    search = {"search": RESUMABLE[optimizer]} if RESUMABLE[optimizer] else {}
    cfg = search_config(tmp_path, tiny_model_dir, final_eval={"enabled": False}, **search)
    full = search_config(
        tmp_path, tiny_model_dir, name="full", final_eval={"enabled": False}, **search
    )
    calls = {"n": 0}
    original = runner.Experiment.evaluate

    def dying(self, genome, tokens, train=None, draw=0):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return original(self, genome, tokens, train, draw)

    monkeypatch.setattr(runner.Experiment, "evaluate", dying)
    assert main(["-q", "search", cfg]) == 130
    monkeypatch.setattr(runner.Experiment, "evaluate", original)
    run = tmp_path / "runs" / "tiny"

    assert len(pd.read_parquet(run / "trials.parquet")) == 8
    assert main(["-q", "search", "--resume", str(run)]) == 0
    assert main(["-q", "search", full]) == 0
    resumed = pd.read_parquet(run / "trials.parquet")
    uninterrupted = pd.read_parquet(tmp_path / "runs" / "full" / "trials.parquet")
    assert len(resumed) == len(uninterrupted)
    assert resumed.genome.tolist() == uninterrupted.genome.tolist()
    assert resumed.fitness.tolist() == uninterrupted.fitness.tolist()
    best = json.loads((run / "best.json").read_text())
    assert best["genome"] == json.loads((tmp_path / "runs/full/best.json").read_text())["genome"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.name=/no/such/model"], "does not exist"),
        (
            ["compressor.name=obs"],
            "allowed: 'gguf', 'gptq', 'magnitude', 'metric', 'prune-quantize', 'rtn', 'sparsegpt', "
            "'structured-obs', 'wanda'",
        ),
        (["space.target=1.3"], "space: "),
        (["space.levels=9"], "at most 5 levels fit"),
        (["serch.generations=3"], "did you mean 'search'"),
        (["search.generation=3"], "did you mean 'generations'"),
        (["search.name=cmaes"],
         "unknown optimizer 'cmaes'; allowed: 'chain', 'coarse-to-fine', 'drop-last'"),
        (["executor.name=dask"], "unknown executor 'dask'; allowed: 'local', 'ray'"),
        (["executor.num_workers=2"], "bad options for executor 'local': num_workers"),
        (["data.corpus=nope"], "allowed:"),
        (
            ["space.name=depth", "space.remove=2", "search.name=nsga2"],
            "counts removed sublayers, not size",
        ),
        (["model.dtype=float8"], "model.dtype"),
        (["data.search=100000"], "has 5024 sequences of 64 tokens"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    tmp_path, tiny_model_dir, capsys, overrides, message
):
    cfg = search_config(tmp_path, tiny_model_dir)
    args = ["-q", "search", cfg]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_existing_run_is_never_overwritten(tmp_path, tiny_model_dir, capsys):
    cfg = search_config(tmp_path, tiny_model_dir, search={"generations": 1})
    assert main(["-q", "search", cfg, "--no-eval"]) == 0
    run = tmp_path / "runs" / "tiny"
    before = (run / "trials.parquet").read_bytes()
    assert main(["-q", "search", cfg]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "trials.parquet").read_bytes() == before


def test_corrupt_database_block_is_reported_and_rebuilt(tmp_path, tiny_model_dir, caplog):
    cfg = search_config(tmp_path, tiny_model_dir)
    assert main(["-q", "database", "build", cfg]) == 0
    (tmp_path / "db" / "block_001.safetensors").write_bytes(b"garbage")
    assert main(["-q", "search", cfg, "--no-eval", "--set", "search.generations=1"]) == 0
    assert "block_001.safetensors has 7 bytes, not the" in caplog.text
    assert "rebuilding it" in caplog.text


def test_database_is_built_once_and_reused(tmp_path, tiny_model_dir):
    cfg = search_config(tmp_path, tiny_model_dir)
    assert main(["-q", "database", "build", cfg]) == 0
    stamp = (tmp_path / "db" / "block_000.safetensors").stat().st_mtime_ns
    assert main(["-q", "search", cfg, "--no-eval", "--set", "search.generations=1"]) == 0
    assert (tmp_path / "db" / "block_000.safetensors").stat().st_mtime_ns == stamp
    assert not math.isnan(json.loads((tmp_path / "runs/tiny/best.json").read_text())["fitness"])


def test_database_built_for_other_inputs_is_refused_not_overwritten(
    tmp_path, tiny_model_dir, capsys
):
    cfg = search_config(tmp_path, tiny_model_dir)
    assert main(["-q", "database", "build", cfg]) == 0
    manifest = (tmp_path / "db" / "manifest.json").read_bytes()
    assert main(["-q", "search", cfg, "--set", "compressor.name=wanda"]) == 2
    err = capsys.readouterr().err
    assert "built from different inputs (differs in: compressor, compressor_params)" in err
    assert (tmp_path / "db" / "manifest.json").read_bytes() == manifest
    assert not (tmp_path / "runs" / "tiny" / "trials.parquet").exists()


def test_bits_search_exports_a_model_on_the_searched_grids(tmp_path, uneven_model_dir):
    cfg = search_config(
        tmp_path,
        uneven_model_dir,
        compressor={"name": "gptq", "group_size": 64},
        space={"name": "bits", "target": 3.0, "bits": [2, 3, 4, 8]},
        search={"generations": 6},
    )
    assert main(["-q", "search", cfg]) == 0
    run = tmp_path / "runs" / "tiny"
    best = json.loads((run / "best.json").read_text())
    assert best["cost"] <= best["budget"] and {r["bits"] for r in best["layers"]} <= {2, 3, 4, 8}
    report = json.loads((run / "eval.json").read_text())
    assert set(report["ppl"]) == {"dense", "uniform", "searched"}
    export = tmp_path / "exported"
    assert main(["-q", "export", str(run), "--out", str(export)]) == 0
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    for row in json.loads((export / "evocomp.json").read_text())["layers"]:
        w = model.get_submodule(row["unit"]).weight
        for group in w.reshape(w.shape[0], -1, 64).unbind(1):
            assert max(len(r.unique()) for r in group) <= 2 ** row["bits"]
    cfg_obj, _ = runner.load_run_config(run)
    heldout = runner.Experiment(cfg_obj, progress=False).splits.heldout
    ppl = PerplexityEvaluator(heldout).evaluate(model)["ppl"]
    assert ppl == pytest.approx(report["ppl"]["searched"], rel=1e-5)


def test_space_and_compressor_kinds_must_match(tmp_path, tiny_model_dir, capsys):
    cfg = search_config(tmp_path, tiny_model_dir, space={"name": "bits", "target": 3.0})
    assert main(["-q", "search", cfg]) == 2
    assert "space 'bits' needs a bits compressor ('gptq', 'rtn')" in capsys.readouterr().err


def test_a_failed_start_never_blocks_the_fixed_rerun(tmp_path, tiny_model_dir, capsys):
    """Errors found before the search leave no run directory; a directory that holds
    no evaluation (a start that died before its first one) is free to use again."""
    cfg = search_config(tmp_path, tiny_model_dir, search={"generations": 1})
    run = tmp_path / "runs" / "tiny"
    assert main(["-q", "search", cfg, "--set", "units.targets=[nothing]"]) == 2
    assert not run.exists()
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: broken\n")  # what an older failed start left
    (run / "search.log").write_text("")
    assert main(["-q", "search", cfg, "--no-eval"]) == 0
    assert "name: tiny" in (run / "config.yaml").read_text()
    assert (run / "best.json").exists()
    capsys.readouterr()
    assert main(["-q", "search", cfg, "--no-eval"]) == 2  # now it holds a run
    assert "already holds a run" in capsys.readouterr().err
