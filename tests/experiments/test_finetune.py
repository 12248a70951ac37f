"""``evocomp finetune`` end to end on tiny models: the fine-tuned candidate is closer
to dense on held-out text, keeps its structure, exports like any run and reloads
with the fine-tuned perplexity; a killed fine-tune resumes to the uninterrupted
result; finished ones are reused; bad input is one line and exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import _saved, search_config, uneven_llama
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evocomp import runner
from evocomp.cli import main
from evocomp.evaluators import PerplexityEvaluator
from evocomp.supernet.training import Trainer, loaded_weights

TUNE = ["--tokens", "2048", "--lr", "2e-4"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny sparsity search (60%, so there is something to recover)."""
    root = tmp_path_factory.mktemp("finetune")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVOCOMP_CACHE", str(root / "cache"))
        model = _saved(uneven_llama(), root / "model")
        cfg = search_config(root, model, space={"target": 0.6, "step": 0.1, "levels": 2},
                            search={"generations": 2})
        assert main(["-q", "search", cfg]) == 0
    return root


@pytest.fixture(scope="module")
def tuned(searched: Path) -> Path:
    """A copy of the searched run, fine-tuned with ``TUNE`` (not to be changed)."""
    run = Path(shutil.copytree(searched / "runs" / "tiny", searched / "tuned"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVOCOMP_CACHE", str(searched / "cache"))
        assert main(["-q", "finetune", str(run), *TUNE, "--checkpoint-every", "3"]) == 0
    return run


@pytest.fixture
def run(searched: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the searched run, free to fine-tune."""
    monkeypatch.setenv("EVOCOMP_CACHE", str(searched / "cache"))
    return Path(shutil.copytree(searched / "runs" / "tiny", tmp_path / "run"))


def _heldout_ppl(run: Path, model: torch.nn.Module) -> float:
    cfg, _ = runner.load_run_config(run)
    heldout = runner.Experiment(cfg, progress=False).splits.heldout
    return PerplexityEvaluator(heldout).evaluate(model)["ppl"]


def _report(run: Path) -> dict:
    return json.loads((run / "finetune" / "finetune.json").read_text())


def test_finetune_recovers_and_the_export_reloads_with_its_perplexity(
    tuned, searched, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("EVOCOMP_CACHE", str(searched / "cache"))
    report = _report(tuned)
    searched_ppl = json.loads((tuned / "eval.json").read_text())["ppl"]
    assert report["ppl"]["dense"] == pytest.approx(searched_ppl["dense"], rel=1e-5)
    assert report["ppl"]["before"] == pytest.approx(searched_ppl["searched"], rel=1e-5)
    # A random model's perplexity on real text means little: KL to dense is the measure.
    assert report["kl"]["after"] < 0.8 * report["kl"]["before"]
    assert report["tokens"] == 2048 and report["steps"] == 8
    assert report["options"]["method"] == "full" and report["options"]["lr"] == 2e-4
    files = {p.name for p in (tuned / "finetune").iterdir()}
    assert files == {"options.json", "weights.safetensors", "finetune.json"}

    stamp = (tuned / "finetune" / "finetune.json").stat().st_mtime_ns
    assert main(["-q", "finetune", str(tuned)]) == 0  # options come from the finished one
    out = capsys.readouterr().out
    assert "reused" in out and "before" in out and "after" in out
    assert (tuned / "finetune" / "finetune.json").stat().st_mtime_ns == stamp

    assert main(["-q", "export", str(tuned), "--out", str(tmp_path / "tuned")]) == 0
    assert "fine-tuned" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned").eval()
    assert _heldout_ppl(tuned, model) == pytest.approx(report["ppl"]["after"], rel=1e-5)
    meta = json.loads((tmp_path / "tuned" / "evocomp.json").read_text())
    assert meta["finetune"]["tokens"] == 2048
    for row in meta["layers"]:  # pruned entries are still exactly zero, no others are
        w = model.get_submodule(row["unit"]).weight
        assert int((w == 0).sum()) == w.numel() - row["nonzeros"]

    plain = tmp_path / "plain"
    assert main(["-q", "export", str(tuned), "--out", str(plain), "--no-finetune"]) == 0
    model = AutoModelForCausalLM.from_pretrained(plain).eval()
    assert _heldout_ppl(tuned, model) == pytest.approx(searched_ppl["searched"], rel=1e-5)
    assert json.loads((plain / "evocomp.json").read_text())["finetune"] is None


def test_a_killed_finetune_resumes_to_the_uninterrupted_result(run, tuned, monkeypatch, capsys):
    step = Trainer.train_step

    def killed_at_step_5(self):
        if self.step == 4:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", killed_at_step_5)
    assert main(["-q", "finetune", str(run), *TUNE, "--checkpoint-every", "2"]) == 130
    assert "resumes" in capsys.readouterr().err
    checkpoint = torch.load(run / "finetune" / "checkpoint.pt", weights_only=True)
    assert checkpoint["trainer"]["step"] == 4
    monkeypatch.setattr(Trainer, "train_step", step)
    assert main(["-q", "finetune", str(run)]) == 0
    got = load_file(run / "finetune" / "weights.safetensors")
    want = load_file(tuned / "finetune" / "weights.safetensors")
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert _report(run)["ppl"] == _report(tuned)["ppl"]


def test_lora_finetune_is_merged_on_export(run, tmp_path):
    argv = ["--tokens", "2048", "--method", "lora", "--lora-rank", "4", "--lr", "1e-3"]
    assert main(["-q", "finetune", str(run), *argv]) == 0
    report = _report(run)
    assert report["kl"]["after"] < report["kl"]["before"]
    assert main(["-q", "export", str(run), "--out", str(tmp_path / "out")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert _heldout_ppl(run, model) == pytest.approx(report["ppl"]["after"], rel=1e-5)
    for row in json.loads((tmp_path / "out" / "evocomp.json").read_text())["layers"]:
        w = model.get_submodule(row["unit"]).weight
        assert int((w == 0).sum()) == w.numel() - row["nonzeros"]


def test_other_options_are_refused_until_restart(tuned, tmp_path, capsys):
    run = Path(shutil.copytree(tuned, tmp_path / "run"))
    assert main(["-q", "finetune", str(run), "--tokens", "1024"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--tokens 2048" in err and "--tokens 1024" in err and "--restart" in err
    assert main(["-q", "finetune", str(run), "--tokens", "1024", "--restart"]) == 0
    assert _report(run)["tokens"] == 1024
    assert _report(run)["options"]["lr"] == 1e-4  # defaults, not the replaced run's

    best = json.loads((run / "best.json").read_text())
    best["genome"][0] = 1 - best["genome"][0] if best["genome"][0] in (0, 1) else 0
    (run / "best.json").write_text(json.dumps(best))
    capsys.readouterr()
    assert main(["-q", "export", str(run), "--out", str(tmp_path / "x")]) == 2
    assert "--no-finetune" in capsys.readouterr().err
    assert main(["-q", "finetune", str(run)]) == 2
    assert "--restart" in capsys.readouterr().err


def test_width_finetune_exports_zeroed_and_compact(searched, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(searched / "cache"))
    cfg = search_config(
        tmp_path, searched / "model", name="width", compressor={"name": "structured-obs"},
        space={"name": "width", "target": 0.5, "step": 0.25, "levels": 2, "neuron_multiple": 16},
        search={"generations": 1},
    )
    assert main(["-q", "search", cfg, "--no-eval"]) == 0
    run = tmp_path / "runs" / "width"
    assert main(["-q", "finetune", str(run), "--tokens", "1024", "--lr", "1e-4"]) == 0
    config, _ = runner.load_run_config(run)
    exp = runner.Experiment(config, progress=False)
    best = runner.load_best(runner.RunDir(run))
    assert exp.swapper.narrowed(best), "the search narrowed nothing"
    weights = load_file(run / "finetune" / "weights.safetensors")
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), exp.applied(best) as model, loaded_weights(model, weights):
        want = model(x, use_cache=False).logits
    assert main(["-q", "export", str(run), "--out", str(tmp_path / "zeroed")]) == 0
    assert main(["-q", "export", str(run), "--out", str(tmp_path / "compact"), "--compact"]) == 0
    zeroed = AutoModelForCausalLM.from_pretrained(tmp_path / "zeroed").eval()
    compact = AutoModelForCausalLM.from_pretrained(tmp_path / "compact",
                                                   trust_remote_code=True).eval()
    for model in (zeroed, compact):
        with torch.no_grad():
            got = model(x, use_cache=False).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _no_best(run: Path) -> None:
    (run / "best.json").unlink()


BAD = [
    ("no-best", [], "best.json", _no_best),
    ("tokens.below-a-sequence", ["--tokens", "63"], "--tokens", None),
    ("tokens.zero", ["--tokens", "0"], "--tokens", None),
    ("tokens.over-the-corpus", ["--tokens", "100000000"], "--tokens", None),
    ("lora-rank.over", ["--method", "lora", "--lora-rank", "1000"], "--lora-rank", None),
    ("lora-rank.zero", ["--method", "lora", "--lora-rank", "0"], "--lora-rank", None),
    ("lr.zero", ["--lr", "0"], "--lr", None),
    ("batch-size.zero", ["--batch-size", "0"], "--batch-size", None),
    ("lm-weight.negative", ["--lm-weight", "-1"], "--lm-weight", None),
    ("teacher-none.no-loss", ["--teacher", "none", "--lm-weight", "0"], "--lm-weight", None),
    ("checkpoint-every.zero", ["--checkpoint-every", "0"], "--checkpoint-every", None),
    ("not-a-run", ["RUN/nothing"], "config.yaml", None),
]


@pytest.mark.parametrize(("argv", "names", "setup"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(run, argv, names, setup, capsys):
    if setup is not None:
        setup(run)
    target = str(run / "nothing") if argv[:1] == ["RUN/nothing"] else str(run)
    argv = [a for a in argv if a != "RUN/nothing"]
    assert main(["-q", "finetune", target, *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("evocomp: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    assert "Traceback" not in err
    assert names in errors[0], errors[0]
    assert not (run / "finetune").exists()


def test_the_training_text_is_disjoint_from_search_and_heldout(searched, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(searched / "cache"))
    from evocomp.evaluators.data import NotEnoughText, training_tokens

    cfg, _ = runner.load_run_config(searched / "runs" / "tiny")
    exp = runner.Experiment(cfg, progress=False)
    data = training_tokens(cfg.data, exp.loaded.tokenizer, 4096 + 10)
    assert data.shape == (64, cfg.data.seq_len)
    assert torch.equal(data[: cfg.data.calibration], exp.splits.calibration)
    text = exp.loaded.tokenizer.decode(data.flatten())
    for split in (exp.splits.search, exp.splits.heldout):
        for row in split:  # a 48-byte window of each sequence would show up in the text
            assert exp.loaded.tokenizer.decode(row[8:56]) not in text
    with pytest.raises(NotEnoughText) as err:
        training_tokens(cfg.data, exp.loaded.tokenizer, 10**9)
    assert 0 < err.value.available < 10**9 and err.value.available % cfg.data.seq_len == 0
