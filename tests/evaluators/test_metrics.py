import math

import pytest
import torch
from conftest import tiny_llama

from evocomp.evaluators import (
    EVALUATORS,
    KLEvaluator,
    PerplexityEvaluator,
    compute_reference,
    kl_divergence,
)


def _tokens(n=4, seq=24):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(1))


def _perturbed(model, scale=0.5):
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(scale)
    return model


def test_kl_of_the_dense_model_to_itself_is_zero(tiny_model):
    tokens = _tokens()
    ev = KLEvaluator.create(tiny_model, tokens, KLEvaluator.Params(), progress=False)
    m = ev.evaluate(tiny_model)
    assert m["kl"] == pytest.approx(0.0, abs=1e-6)
    assert m["tokens"] == tokens.numel()


def test_kl_matches_a_direct_computation_and_grows_with_damage(tiny_model):
    tokens = _tokens()
    ev = KLEvaluator.create(tiny_model, tokens, KLEvaluator.Params(batch_size=3), progress=False)
    with torch.no_grad():
        p = torch.log_softmax(tiny_model(tokens).logits, -1)
    small = ev.evaluate(_perturbed(tiny_model, 0.8))["kl"]
    with torch.no_grad():
        q = torch.log_softmax(tiny_model(tokens).logits, -1)
    direct = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean()
    assert small == pytest.approx(direct.item(), rel=1e-2)
    large = ev.evaluate(_perturbed(tiny_model, 0.1))["kl"]
    assert large > small > 0


def test_topk_kl_is_between_zero_and_the_full_kl():
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(10, 50, generator=g) * 3, -1)
    q = torch.log_softmax(torch.randn(10, 50, generator=g) * 3, -1)
    full = kl_divergence(p, None, q)
    for k in (1, 5, 20, 49):
        v, ix = p.topk(k, -1)
        approx = kl_divergence(v, ix, q)
        assert (approx >= -1e-6).all() and (approx <= full + 1e-5).all()
    v, ix = p.topk(50, -1)
    assert torch.allclose(kl_divergence(v, ix, q), full, atol=1e-4)


def test_topk_over_the_whole_vocabulary_equals_the_full_kl(tiny_model):
    tokens = _tokens()
    full = KLEvaluator.create(tiny_model, tokens, KLEvaluator.Params(), progress=False)
    topk = KLEvaluator.create(tiny_model, tokens, KLEvaluator.Params(topk=258), progress=False)
    few = KLEvaluator.create(tiny_model, tokens, KLEvaluator.Params(topk=4), progress=False)
    damaged = _perturbed(tiny_model, 0.3)
    a, b, c = (ev.evaluate(damaged) for ev in (full, topk, few))
    # With k = vocabulary the tail bucket holds only float32 rounding (~1e-7 mass).
    assert b["kl"] == pytest.approx(a["kl"], abs=2e-6)
    assert 0 < c["kl"] <= a["kl"]
    assert a["ppl"] == pytest.approx(c["ppl"], rel=1e-6)


def test_token_budget_selects_leading_sequences(tiny_model):
    tokens = _tokens(n=4, seq=10)
    ev = PerplexityEvaluator(tokens, batch_size=2)
    assert ev.evaluate(tiny_model, 10)["tokens"] == 10
    assert ev.evaluate(tiny_model, 11)["tokens"] == 20
    assert ev.evaluate(tiny_model, 10**6)["tokens"] == 40
    one = ev.evaluate(tiny_model, 10)["ppl"]
    solo = PerplexityEvaluator(tokens[:1]).evaluate(tiny_model)["ppl"]
    assert one == pytest.approx(solo, rel=1e-6)


def test_perplexity_is_exp_of_mean_next_token_nll(tiny_model):
    tokens = _tokens(n=3, seq=16)
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(tokens).logits[:, :-1], -1)
    nll = -logp.gather(-1, tokens[:, 1:, None]).mean()
    assert PerplexityEvaluator(tokens).evaluate(tiny_model)["ppl"] == pytest.approx(
        math.exp(nll.item()), rel=1e-5
    )
    # The KL evaluator reports the same perplexity as a by-product.
    kl = KLEvaluator.create(tiny_model, tokens, KLEvaluator.Params(), progress=False)
    assert kl.evaluate(tiny_model)["ppl"] == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_reference_is_cached_on_disk(tiny_model, tmp_path):
    tokens = _tokens()
    path = tmp_path / "ref.safetensors"
    first = compute_reference(tiny_model, tokens, topk=8, cache_path=path, progress=False)
    assert path.exists()
    _perturbed(tiny_model, 0.1)  # a cache hit must not recompute
    second = compute_reference(tiny_model, tokens, topk=8, cache_path=path, progress=False)
    assert torch.equal(first.probs, second.probs)
    assert torch.equal(first.indices, second.indices)


def test_evaluators_are_registered():
    assert EVALUATORS.get("kl") is KLEvaluator
    assert EVALUATORS.get("ppl") is PerplexityEvaluator


def test_a_diverged_model_scores_infinite_perplexity_instead_of_failing(tiny_model):
    """A per-token loss past ~709 nats overflows exp(): the candidate ranks last
    (perplexity inf, finite KL) instead of the search dying on it."""
    tokens = _tokens()
    kl = KLEvaluator.create(tiny_model, tokens, KLEvaluator.Params(), progress=False)
    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(1e5)
    ppl = PerplexityEvaluator(tokens).evaluate(tiny_model)
    assert ppl["ppl"] == math.inf
    m = kl.evaluate(tiny_model)
    assert m["ppl"] == math.inf and math.isfinite(m["kl"]) and m["kl"] > 100



@pytest.mark.parametrize("name", ["kl", "ppl"])
def test_an_order_scores_its_first_rows_as_an_evaluator_of_those_rows_alone(name):
    model = tiny_llama()
    tokens = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    order, budget = [2, 0, 3, 1], 32  # two sequences: rows 2 and 0

    def evaluator(rows):  # the KL reference is the dense model's
        if name == "ppl":
            return PerplexityEvaluator(tokens[rows], batch_size=3)
        return KLEvaluator.create(model, tokens[rows], KLEvaluator.Params(batch_size=3),
                                  progress=False)

    drawn, alone = evaluator([0, 1, 2, 3]), evaluator([2, 0])
    with torch.no_grad():  # pruned, so that the KL is not zero
        model.model.layers[0].mlp.down_proj.weight[:, ::2] = 0
    assert drawn.rows_for(budget, order) == [2, 0]
    value = drawn.evaluate(model, budget, order=order)[name]
    assert value > 0 and value == pytest.approx(alone.evaluate(model)[name], rel=1e-6)
    assert value != pytest.approx(drawn.evaluate(model, budget)[name], rel=1e-6)  # rows 0, 1
    with pytest.raises(ValueError, match="permutation"):
        drawn.rows_for(budget, [0, 0, 1, 2])


@pytest.mark.parametrize("name", ["kl", "ppl"])
def test_rows_scored_apart_combine_to_the_metrics_of_all_rows_bit_for_bit(tiny_model, name):
    tokens = _tokens(n=5)
    cls = EVALUATORS.get(name)
    ev = cls.create(tiny_model, tokens, cls.Params(batch_size=1), progress=False)
    model = _perturbed(tiny_model, 0.7)
    whole = ev.evaluate(model, 4 * tokens.shape[1])
    first, rest = ev.row_sums(model, [0]), ev.row_sums(model, [1, 2, 3])
    assert ev.combine(first + rest) == whole
    assert ev.combine(first) == ev.evaluate(model, tokens.shape[1])
    assert whole["tokens"] == 4 * tokens.shape[1]
