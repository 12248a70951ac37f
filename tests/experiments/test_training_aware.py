"""Training-aware selection (DarwinLM) end to end on the tiny uneven Llama: every
candidate is fine-tuned before it is scored, the trained weights are gone after
scoring (bit for bit), and training tokens are counted beside evaluation tokens."""

import json

import pandas as pd
import pytest
import torch
from conftest import search_config

from evocomp import runner
from evocomp.config import load_config
from evocomp.search.base import Training


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))


STAGES = [{"tokens": 64, "keep": 2}, {"tokens": 256, "keep": 1}]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "space, compressor",
    [
        ({"name": "sparsity", "target": 0.5, "step": 0.1, "levels": 2}, {"name": "sparsegpt"}),
        ({"name": "width", "target": 0.5, "step": 0.25, "levels": 2, "neuron_multiple": 16},
         {"name": "structured-obs"}),
    ],
    ids=["sparsity", "width"],
)
@pytest.mark.parametrize("params", ["all", "lora"])
def test_a_trained_score_leaves_the_model_and_the_variants_as_they_were(
    tmp_path, uneven_model_dir, space, compressor, params
):
    cfg = load_config(search_config(tmp_path, uneven_model_dir, space=space,
                                    compressor=compressor), [])
    exp = runner.Experiment(cfg, progress=False)
    rng = __import__("random").Random(0)
    genome = exp.space.mutate(exp.space.uniform(), rng, switches=3)
    before = _state(exp.model)
    plain, _ = exp.evaluate(genome, 256)
    train = Training(tokens=256, lr=1e-3, params=params)
    trained, _ = exp.evaluate(genome, 256, train)
    assert trained["train_tokens"] == 256
    assert trained["kl"] != plain["kl"]  # training changed what was scored ...
    after = _state(exp.model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # ... and nothing else
    assert exp.evaluate(genome, 256)[0]["kl"] == plain["kl"]  # the variants too
    assert exp.evaluate(genome, 256, train)[0]["kl"] == pytest.approx(trained["kl"], abs=1e-6)


def test_a_training_aware_search_records_and_counts_its_training_tokens(
    tmp_path, uneven_model_dir
):
    search = {"name": "evopress", "generations": 2, "offspring": 3, "stages": STAGES,
              "train": {"tokens": [128, 256], "lr": 1e-3}}
    cfg = load_config(search_config(tmp_path, uneven_model_dir, search=search,
                                    final_eval={"enabled": False}), [])
    exp = runner.Experiment(cfg, progress=False)
    result = runner.run_search(exp, runner.prepare_run_dir(exp.cfg, resume=False))
    run = tmp_path / "runs" / "tiny"
    trials = pd.read_parquet(run / "trials.parquet")
    assert dict(zip(trials.tokens, trials["metric.train_tokens"], strict=True)) == {
        64: 128.0, 256: 256.0
    }
    best = json.loads((run / "best.json").read_text())
    assert best["tokens"] == {
        "evaluation": int(trials.tokens.sum()),
        "training": int(trials["metric.train_tokens"].sum()),
    }
    assert result.evaluations == len(trials)
