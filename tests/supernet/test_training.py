"""Recovery fine-tuning in place: the loss falls, the compressed structure survives
(exact zeros, removed and narrowed sublayers, frozen weights), the model comes back
bit for bit, and a run stopped and resumed from its state ends like an
uninterrupted one."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import tiny_llama, uneven_llama
from pydantic import ValidationError

from evocomp.errors import EvocompError
from evocomp.supernet.shrink import narrowed, widened
from evocomp.supernet.sublayers import skip
from evocomp.supernet.training import (
    TrainParams,
    distillation_loss,
    language_model_loss,
    loaded_weights,
    max_lora_rank,
    training,
)
from evocomp.supernet.units import find_sublayer_units

DATA = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(PROBE, use_cache=False).logits


def _pruned_student():
    """A tiny Llama (sharp next-token distributions) with every block weight half
    pruned (every other column), as loaded for evaluation (no gradients), and a copy
    of its dense self as teacher."""
    model = uneven_llama()
    teacher = copy.deepcopy(model)
    model.requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in PRUNED or (".layers." in name and p.ndim == 2):
                p[:, ::2] = 0
    return model, teacher


PRUNED = [n for n, p in uneven_llama().named_parameters() if ".layers." in n and p.ndim == 2]


def _params(**kw):
    base = {"tokens": 32 * 12, "batch_size": 2, "lr": 1e-3, "warmup": 0.0}
    return TrainParams(**{**base, **kw})


def _snapshot(model):
    return {n: (p.data, p.data.clone()) for n, p in model.named_parameters()}


def _assert_restored(model, before):
    now = dict(model.named_parameters())
    assert set(now) == set(before), "adapters were left behind"
    for name, (tensor, copy_) in before.items():
        assert now[name].data_ptr() == tensor.data_ptr(), f"{name} points at another tensor"
        assert torch.equal(tensor, copy_), f"{name} was written"
        assert not now[name].requires_grad and now[name].grad is None
    assert not any("lora" in type(m).__name__.lower() for m in model.modules())


@pytest.mark.parametrize("method", ["full", "lora"])
def test_distillation_recovers_and_exact_zeros_stay_zero(method):
    model, teacher = _pruned_student()
    before = _snapshot(model)
    params = _params(method=method, tokens=32 * 24)
    with training(model, DATA, params, teacher=teacher) as trainer:
        result = trainer.run()
        weights = trainer.weights()
    assert result.steps == trainer.steps == 12 and result.tokens == 24 * 32
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.6 * first, result.losses
    for name in PRUNED:
        assert bool((weights[name][:, ::2] == 0).all()), name
        assert not torch.equal(weights[name][:, 1::2], before[name][1][:, 1::2])
    _assert_restored(model, before)
    with loaded_weights(model, weights):  # the trained model, on the untouched tensors
        trained_kl = distillation_loss(_logits(model), _logits(teacher))
    assert trained_kl < distillation_loss(_logits(model), _logits(teacher))
    _assert_restored(model, before)


def test_merged_lora_weights_compute_what_the_adapters_did():
    model, teacher = tiny_llama(), tiny_llama(seed=1)
    model.requires_grad_(False)
    with training(model, DATA, _params(method="lora", lora_rank=4), teacher=teacher) as trainer:
        trainer.run()
        with_adapters = _logits(model)
        weights = trainer.weights()
    assert set(weights) == {f"{n}.weight" for n, m in model.named_modules()
                            if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    with loaded_weights(model, weights):
        torch.testing.assert_close(_logits(model), with_adapters, rtol=1e-4, atol=1e-5)


def test_removed_narrowed_and_frozen_parts_stay_as_the_candidate_has_them():
    model, teacher = _pruned_student()
    units = {u.name: u for u in find_sublayer_units(model)}
    gone, narrow = units["model.layers.2.mlp"], units["model.layers.1.self_attn"]
    frozen = "model.layers.3.mlp.up_proj.weight"
    o_proj = model.get_submodule(narrow.name).o_proj.weight
    kept = torch.tensor([0, 2])  # one query head of each KV group
    before = _snapshot(model)
    with (
        skip(model, [gone]),
        narrowed(model.get_submodule(narrow.name), "attn", kept, o_proj[:, [*range(16),
                                                                            *range(32, 48)]]),
        training(model, DATA, _params(), teacher=teacher, frozen={frozen},
                 removed=[gone.name]) as trainer,
    ):
        trainer.run()
        weights = trainer.weights()
        params = dict(model.named_parameters())
        assert params[f"{narrow.name}.q_proj.weight"].shape == (32, 64)
    assert not any(k.startswith(gone.name + ".") for k in weights)
    assert frozen not in weights
    assert weights[f"{narrow.name}.q_proj.weight"].shape == (32, 64)
    assert weights[f"{narrow.name}.o_proj.weight"].shape == (64, 32)
    _assert_restored(model, before)


def test_widened_puts_narrow_values_where_the_zeroed_export_has_them():
    model = tiny_llama()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    cases = [
        (attn, "attn", torch.tensor([0, 2])),  # a head of each KV group: K/V stay whole
        (attn, "attn", torch.tensor([2, 3])),  # a whole KV group goes with its K/V rows
        (mlp, "mlp", torch.tensor([1, 5, 6, 40, 127])),
    ]
    for sub, kind, kept in cases:
        out = sub.o_proj if kind == "attn" else sub.down_proj
        cols = kept if kind == "mlp" else (kept[:, None] * 16 + torch.arange(16)).flatten()
        refit = torch.randn(64, cols.numel())
        with narrowed(sub, kind, kept, refit):
            small = {n: p.data.clone() for n, p in sub.named_parameters()}
        with narrowed(sub, kind, kept, refit, zero=True):
            zeroed = {n: p.data.clone() for n, p in sub.named_parameters()}
            full = widened(sub, kind, kept, small)
        assert set(full) == set(zeroed)
        for name, value in full.items():
            assert torch.equal(value, zeroed[name]), (kind, kept.tolist(), name)
        assert out.weight.shape == (64, out.in_features)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_stopped_and_resumed_training_ends_like_an_uninterrupted_run(method):
    params = _params(method=method, tokens=32 * 9, warmup=0.2, weight_decay=0.01)

    def trained(stop_at=None, state=None):
        model, teacher = _pruned_student()
        saved = {}

        def on_step(trainer):
            if trainer.step == stop_at:
                buffer = io.BytesIO()
                torch.save(trainer.state_dict(), buffer)
                saved["state"] = buffer.getvalue()
                raise KeyboardInterrupt  # a kill right after a checkpoint

        with training(model, DATA, params, teacher=teacher) as trainer:
            if state is not None:
                trainer.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
            try:
                result = trainer.run(on_step)
            except KeyboardInterrupt:
                return saved["state"], None
            return result, trainer.weights()

    whole, want = trained()
    state, _ = trained(stop_at=2)
    resumed, got = trained(state=state)
    assert resumed.losses == whole.losses and resumed.steps == whole.steps == 5
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_settings_that_cannot_work_are_clear_errors():
    model, teacher = _pruned_student()
    refused = {
        "less than one training sequence": (_params(tokens=31), teacher),
        "lora_rank=33 exceeds 32": (_params(method="lora", lora_rank=33), teacher),
        "needs a teacher": (_params(), None),
    }
    for message, (params, given) in refused.items():
        with pytest.raises(EvocompError, match=message), training(model, DATA, params,
                                                                  teacher=given):
            pass
    with pytest.raises(ValidationError, match="nothing to train"):
        TrainParams(kd_weight=0, lm_weight=0)
    assert max_lora_rank(model) == 32  # k_proj: 2 KV heads of 16
    _assert_restored(model, _snapshot(model))


def test_data_is_cycled_in_a_fresh_order_each_pass():
    model, _ = _pruned_student()
    data = torch.arange(4 * 8).view(4, 8) % 256  # row r starts with token 8r
    seen = []
    params = _params(tokens=8 * 12, kd_weight=0, lm_weight=1, batch_size=3)
    with training(model, data, params) as trainer:
        forward = model.forward

        def spy(batch, **kw):
            seen.extend((batch[:, 0] // 8).tolist())
            return forward(batch, **kw)

        model.forward = spy
        trainer.run()
        del model.forward
    assert len(seen) == 12
    passes = [seen[i : i + 4] for i in range(0, 12, 4)]
    assert all(sorted(p) == [0, 1, 2, 3] for p in passes)
    assert len({tuple(p) for p in passes}) > 1


def test_losses_are_the_textbook_ones():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    p, logq = t.softmax(-1), s.log_softmax(-1)
    want = (p * (p.log() - logq)).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(s, t), want)
    assert float(distillation_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    tokens = torch.randint(0, 11, (2, 5))
    nll = -logq[:, :-1].gather(-1, tokens[:, 1:, None]).mean()
    torch.testing.assert_close(language_model_loss(s, tokens), nll)
