"""The combined fitness: a weighted sum of evaluators normalised by the baseline."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import uneven_llama

from evocomp.config import load_config
from evocomp.errors import EvocompError
from evocomp.evaluators import EVALUATORS, CombinedEvaluator, forward_logits


def _tokens(n=4, seq=64):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(1))


def _create(model, parts):
    params = CombinedEvaluator.Params(parts=parts)
    return CombinedEvaluator.create(model, _tokens(), params, progress=False)


def _damaged(model, scale):
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(scale)
    return model


PARTS = {"kl": 1.0, "dtm": {"weight": 0.2, "prompts": 8, "prompt_len": 16, "new_tokens": 8}}


def test_registered_and_needs_a_baseline():
    assert EVALUATORS.get("combined") is CombinedEvaluator
    assert CombinedEvaluator.needs_baseline
    assert not EVALUATORS.get("kl").needs_baseline


def test_the_baseline_scores_the_sum_of_the_weights_and_the_dense_model_zero():
    model = uneven_llama()
    ev = _create(model, PARTS)
    with pytest.raises(RuntimeError, match="set_baseline"):
        ev.evaluate(model)
    _damaged(model, 0.6)  # stands in for the uniform genome
    baseline = ev.measure_baseline(model)
    assert set(baseline) == {"kl", "dtm"} and all(v > 0 for v in baseline.values())
    ev.set_baseline(baseline)
    m = ev.evaluate(model)
    assert m["combined"] == pytest.approx(1.2, rel=1e-12)
    assert m["kl"] == baseline["kl"] and m["dtm"] == baseline["dtm"]
    assert {"kl.ppl", "dtm.agreed", "dtm.agree_all"} <= set(m)
    worse = ev.evaluate(_damaged(model, 0.5))
    expected = worse["kl"] / baseline["kl"] + 0.2 * worse["dtm"] / baseline["dtm"]
    assert worse["combined"] == pytest.approx(expected)
    dense = _create(uneven_llama(), PARTS)
    dense.set_baseline(baseline)
    assert dense.evaluate(uneven_llama())["combined"] == pytest.approx(0.0, abs=1e-6)


def test_parts_that_take_a_forward_get_it():
    model = uneven_llama()
    ev = _create(model, PARTS)
    ev.set_baseline({"kl": 1.0, "dtm": 1.0})
    calls = []

    def forward(batch, rows):
        calls.append(list(rows))
        return forward_logits(model, batch)

    assert CombinedEvaluator.takes_forward
    ev.evaluate(model, forward=forward)
    assert calls == [[0, 1, 2, 3]]  # kl's one batch of four sequences; dtm decodes on its own


def test_unusable_baselines_are_refused():
    ev = _create(uneven_llama(), PARTS)
    with pytest.raises(EvocompError, match=r"part 'dtm' scores 0.0 on the uniform baseline"):
        ev.set_baseline({"kl": 0.1, "dtm": 0.0})
    with pytest.raises(EvocompError, match=r"part 'kl' scores inf"):
        ev.set_baseline({"kl": float("inf"), "dtm": 0.5})
    with pytest.raises(EvocompError, match=r"recorded baseline has parts 'kl'"):
        ev.set_baseline({"kl": 0.1})


def test_config_fills_in_each_parts_options():
    cfg = load_config(None, ["evaluator.name=combined", "evaluator.parts={kl: 1.0, dtm: 0.2}"])
    parts = cfg.dump()["evaluator"]["parts"]
    assert parts["kl"] == {"weight": 1.0, "batch_size": 4, "topk": None}
    assert parts["dtm"] == {
        "weight": 0.2, "batch_size": 8, "prompts": 32, "prompt_len": 64, "new_tokens": 32
    }
    again = load_config(None, ["evaluator.name=combined", f"evaluator.parts={json.dumps(parts)}"])
    assert again.dump()["evaluator"] == cfg.dump()["evaluator"]


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ("{kl: 1.0, foo: 0.2}", r"parts\.foo: unknown evaluator; allowed: 'dtm', 'kl', "),
        ("{kl: 1.0, combined: 1}", r"parts\.combined: unknown evaluator"),
        ("{dtm: {weight: 1, promts: 3}}", r"parts\.dtm\.promts: unknown field; allowed: .*"
         r"'prompts', 'weight'"),
        ("{dtm: {prompts: 0}}", r"parts\.dtm\.prompts: .*greater than or equal to 1 \(got 0\)"),
        ("{kl: -1}", r"parts\.kl\.weight: .*greater than 0 \(got -1\)"),
        ("{kl: a}", r"part 'kl' takes a weight or \{weight: \.\., <options>\.\.\}, got 'a'"),
        ("{}", r"parts: .*at least 1 item"),
    ],
)
def test_bad_parts_are_one_line_errors_naming_the_field(parts, message):
    with pytest.raises(EvocompError, match=message) as err:
        load_config(None, ["evaluator.name=combined", f"evaluator.parts={parts}"])
    assert "\n" not in str(err.value)
    assert "evaluator 'combined'" in str(err.value)
