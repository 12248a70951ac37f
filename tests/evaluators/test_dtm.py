"""The first-divergent-token evaluator: equal to free-running greedy decoding of
both models, perfect for the dense model, worse the more is pruned, cached."""

from __future__ import annotations

import pytest
import torch
from conftest import uneven_llama

from evocomp.errors import EvocompError
from evocomp.evaluators import EVALUATORS, DTMEvaluator
from evocomp.evaluators import dtm as dtm_module
from evocomp.evaluators.dtm import prompt_windows, settled
from evocomp.evaluators.reference import ReferenceCache
from evocomp.supernet.sublayers import skip
from evocomp.supernet.units import find_sublayer_units


def _tokens(n=4, seq=64):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(1))


def _params(**kw):
    return DTMEvaluator.Params(**{"prompts": 16, "prompt_len": 16, "new_tokens": 12, **kw})


def _greedy(model, prompts, new_tokens):
    """Free-running greedy decoding, one full forward per token (no KV cache)."""
    seq = prompts.clone()
    with torch.no_grad():
        for _ in range(new_tokens):
            step = model(seq, use_cache=False).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, step[:, None]], dim=1)
    return seq[:, prompts.shape[1] :]


def _agreed(a, b):
    return (a == b).long().cumprod(dim=1).sum(dim=1).double()


def _pruned(model, sparsity):
    """Magnitude-prune every block linear to ``sparsity`` (in place)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                w = module.weight
                k = int(sparsity * w.numel())
                if k:
                    cut = w.abs().flatten().kthvalue(k).values
                    w[w.abs() <= cut] = 0
    return model


def test_registered():
    assert EVALUATORS.get("dtm") is DTMEvaluator


def test_prompts_are_windows_taken_across_sequences_first():
    tokens = torch.arange(3 * 10).reshape(3, 10)
    p = prompt_windows(tokens, prompts=100, prompt_len=4)
    assert p.shape == (6, 4)  # two windows of 4 fit in each sequence of 10
    assert p[0].tolist() == [0, 1, 2, 3] and p[1].tolist() == [10, 11, 12, 13]
    assert p[3].tolist() == [4, 5, 6, 7]
    assert prompt_windows(tokens, prompts=2, prompt_len=4).shape == (2, 4)


def test_the_dense_model_agrees_on_every_token_at_every_budget():
    model = uneven_llama()
    tokens = _tokens()
    ev = DTMEvaluator.create(model, tokens, _params(batch_size=5), progress=False)
    assert torch.equal(ev.continuations, _greedy(model, ev.prompts, 12))
    for budget in (None, 1, 64, 100, tokens.numel()):
        m = ev.evaluate(model, budget)
        assert m["dtm"] == 0.0 and m["agreed"] == 12.0 and m["agree_all"] == 1.0


def test_equals_a_hand_rolled_greedy_comparison():
    model = uneven_llama()
    tokens = _tokens()
    ev = DTMEvaluator.create(model, tokens, _params(batch_size=3), progress=False)
    dense = _greedy(model, ev.prompts, 12)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(0.7)
    agreed = _agreed(_greedy(model, ev.prompts, 12), dense)
    assert 0 < agreed.mean() < 12  # the comparison is not trivial either way
    m = ev.evaluate(model)
    assert m["agreed"] == pytest.approx(agreed.mean().item())
    assert m["dtm"] == pytest.approx(1 - agreed.mean().item() / 12)
    assert m["agree_all"] == pytest.approx((agreed == 12).double().mean().item())
    assert m["tokens"] == 16 * (16 + 12 - 1)
    # A quarter of the search tokens scores a quarter of the prompts (the first ones).
    quarter = ev.evaluate(model, tokens.numel() // 4)
    assert quarter["agreed"] == pytest.approx(agreed[:4].mean().item())


def test_skipped_sublayers_score_like_greedy_decoding():
    """Candidates are scored by one forward, so sublayers skipped without a KV cache
    (depth search) are scored exactly as free-running decoding scores them."""
    model = uneven_llama()
    ev = DTMEvaluator.create(model, _tokens(), _params(), progress=False)
    dense = _greedy(model, ev.prompts, 12)
    units = [u for u in find_sublayer_units(model) if u.name.endswith(("0.self_attn", "2.mlp"))]
    assert len(units) == 2
    with skip(model, units):
        agreed = _agreed(_greedy(model, ev.prompts, 12), dense)
        assert ev.evaluate(model)["agreed"] == pytest.approx(agreed.mean().item())


def test_a_heavily_pruned_model_scores_worse():
    tokens = _tokens()
    dense = uneven_llama()
    ev = DTMEvaluator.create(dense, tokens, _params(), progress=False)
    light = ev.evaluate(_pruned(uneven_llama(), 0.2))
    heavy = ev.evaluate(_pruned(uneven_llama(), 0.8))
    assert 0.0 <= light["dtm"] < heavy["dtm"] <= 1.0
    assert light["agree_all"] >= heavy["agree_all"]


def test_settling_makes_the_continuation_a_fixed_point_of_scoring():
    model = uneven_llama()
    ev = DTMEvaluator.create(model, _tokens(), _params(), progress=False)
    broken = ev.continuations.clone()
    broken[:, 5:] = (broken[:, 5:] + 1) % 256  # every token from position 5 on is wrong
    assert torch.equal(settled(model, ev.prompts, broken, batch_size=4), ev.continuations)


def test_dense_continuations_are_cached_per_model_tokens_and_settings(tmp_path, monkeypatch):
    calls = []
    real = dtm_module.greedy_continuations

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dtm_module, "greedy_continuations", counted)
    model, tokens = uneven_llama(), _tokens()

    def create(model_fp="m", tokens_fp="t", **kw):
        cache = ReferenceCache(tmp_path, model_fp, tokens_fp)
        return DTMEvaluator.create(model, tokens, _params(**kw), cache=cache, progress=False)

    first = create()
    assert len(calls) == 1 and len(list(tmp_path.glob("dtm-*.safetensors"))) == 1
    again = create(batch_size=2)  # batching changes nothing: a hit
    assert len(calls) == 1 and torch.equal(again.continuations, first.continuations)
    create(new_tokens=8)
    create(prompts=8)
    create(prompt_len=8)
    create(model_fp="other")
    create(tokens_fp="other")
    assert len(calls) == 6
    assert len(list(tmp_path.glob("dtm-*.safetensors"))) == 6


def test_bad_lengths_are_one_line_errors_naming_the_option():
    model = uneven_llama()
    with pytest.raises(EvocompError, match=r"prompt_len=65 .*data.seq_len=64"):
        DTMEvaluator.create(model, _tokens(), _params(prompt_len=65), progress=False)
    with pytest.raises(EvocompError, match=r"prompt_len \+ new_tokens = 560 exceeds .* 512"):
        DTMEvaluator.create(model, _tokens(), _params(prompt_len=60, new_tokens=500),
                            progress=False)
