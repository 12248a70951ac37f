"""Gradient norms (GBLM-Pruner's / Pruner-Zero's G): per-sequence LM-loss gradients,
scaled and L2-accumulated; the model comes back untouched; the cache reloads,
separates keys and survives damaged files."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel

from evocomp.supernet import gradients
from evocomp.supernet.gradients import cached_gradient_norms, gradient_norms
from evocomp.supernet.units import find_linear_units, find_sublayer_units

CALIB = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
NAMES = ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj")


def _model():
    return tiny_llama(layers=2)


def _units(model, names=NAMES):
    by_name = {u.name: u for u in find_linear_units(model)}
    return [by_name[n] for n in names]


def _by_hand(model, names, calibration, scale=100.0, *, batch=False):
    """The textbook loop on a copy: backward per sequence, accumulate (scale*grad)**2,
    sqrt. With ``batch`` the norm of the summed loss's gradient instead."""
    model = copy.deepcopy(model).eval()
    weights = {n: model.get_submodule(n).weight for n in names}
    sums = {n: torch.zeros_like(w) for n, w in weights.items()}
    model.zero_grad()
    for seq in calibration:
        seq = seq[None]
        if not batch:
            model.zero_grad()
        model(input_ids=seq, labels=seq).loss.backward()
        if not batch:
            for n, w in weights.items():
                sums[n] += (scale * w.grad) ** 2
    if batch:
        return {n: (scale * w.grad).abs() for n, w in weights.items()}
    return {n: s.sqrt() for n, s in sums.items()}


def test_norms_are_the_per_sequence_hand_computation():
    model = _model()
    got = gradient_norms(model, _units(model), CALIB)
    want = _by_hand(model, NAMES, CALIB)
    assert set(got) == set(NAMES)
    for name in NAMES:
        assert got[name].dtype == torch.float32 and got[name].device.type == "cpu"
        assert got[name].shape == model.get_submodule(name).weight.shape
        assert got[name].abs().sum() > 0
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
    # The scale is a plain factor on G (so values match GBLM's at its default of 100).
    torch.testing.assert_close(
        gradient_norms(model, _units(model), CALIB, scale=1.0)[NAMES[0]],
        got[NAMES[0]] / 100, rtol=1e-4, atol=1e-8,
    )


def test_per_sequence_norms_are_not_the_batch_gradient():
    model = _model()
    got = gradient_norms(model, _units(model), CALIB)
    batch = _by_hand(model, NAMES, CALIB, batch=True)
    for name in NAMES:
        # Signs that differ between sequences cancel in the batch gradient, never in G.
        assert not torch.allclose(got[name], batch[name], rtol=0.05)
        assert (got[name] >= batch[name] / CALIB.shape[0] ** 0.5 - 1e-5).all()
    # One sequence twice: G = sqrt(2)·|g| per sequence, the batch gradient 2·|g|.
    twice = CALIB[:1].repeat(2, 1)
    single = _by_hand(model, NAMES, CALIB[:1])
    doubled = gradient_norms(model, _units(model), twice)
    for name in NAMES:
        torch.testing.assert_close(doubled[name], single[name] * 2**0.5, rtol=1e-4, atol=1e-6)


def test_model_is_left_exactly_as_it_was_and_runs_without_dropout():
    model = _model()
    for block in model.model.layers:
        block.self_attn.attention_dropout = 0.5  # would make train-mode gradients random
    model.train()
    model.lm_head.weight.requires_grad_(False)
    before = {n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    expected = _by_hand(model, NAMES, CALIB)  # eval mode: no dropout

    with torch.inference_mode():  # callers evaluating under inference mode still work
        got = gradient_norms(model, _units(model), CALIB)

    for name in NAMES:
        assert not got[name].is_inference()  # usable once the caller leaves inference mode
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    assert model.training and all(m.training for m in model.modules())
    now = dict(model.named_parameters())
    assert now.keys() == before.keys()
    for name, (param, copy_, flag) in before.items():
        assert now[name] is param and torch.equal(param, copy_), f"{name} was written"
        assert param.requires_grad == flag, f"{name}.requires_grad changed"
        assert param.grad is None, f"{name} kept a .grad"
    assert not model.lm_head.weight.requires_grad
    assert model.get_submodule(NAMES[0]).weight.requires_grad


def test_flags_are_restored_when_the_forward_pass_fails():
    model = _model()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(IndexError):  # token ids beyond the vocabulary
        gradient_norms(model, _units(model), torch.full((1, 8), 10_000))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_half_precision_models_accumulate_in_float32():
    model = _model()
    want = gradient_norms(model, _units(model), CALIB)
    model.to(torch.bfloat16)
    got = gradient_norms(model, _units(model), CALIB)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for name in NAMES:
        assert got[name].dtype == torch.float32
        err = (got[name] - want[name]).norm() / want[name].norm()
        assert err < 0.1, f"{name}: relative error {err:.3f} against float32"


def test_gpt2_conv1d_units_come_out_as_out_by_in():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=258, n_positions=64)
    model = GPT2LMHeadModel(cfg).eval()
    units = [u for u in find_linear_units(model) if u.name.endswith(("c_attn", "mlp.c_fc"))]
    assert len(units) == 2 and all(u.transposed for u in units)
    got = gradient_norms(model, units, CALIB)
    want = _by_hand(model, [u.name for u in units], CALIB)
    for unit in units:
        out_features, in_features = unit.shape
        assert out_features != in_features
        assert got[unit.name].shape == (out_features, in_features)
        torch.testing.assert_close(got[unit.name], want[unit.name].t(), rtol=1e-4, atol=1e-6)


def test_cache_loads_separates_keys_and_recomputes_damaged_files(
    tmp_path, monkeypatch, caplog
):
    model = _model()
    units = _units(model)
    first = cached_gradient_norms(model, units, CALIB, tmp_path, "k1")
    path = tmp_path / "gradients-k1.safetensors"
    assert path.is_file() and not list(tmp_path.glob("*.tmp"))

    calls = []
    real = gradients.gradient_norms

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed although the cache holds every unit")

    monkeypatch.setattr(gradients, "gradient_norms", refuse)
    again = cached_gradient_norms(model, units, CALIB, tmp_path, "k1")
    assert again.keys() == first.keys()
    for name in first:
        assert torch.equal(again[name], first[name])

    monkeypatch.setattr(gradients, "gradient_norms", counted)
    other = cached_gradient_norms(model, units, CALIB[:1], tmp_path, "k2")
    assert len(calls) == 1 and (tmp_path / "gradients-k2.safetensors").is_file()
    assert not torch.equal(other[NAMES[0]], first[NAMES[0]])

    # A unit the file lacks makes it incomplete: computed, and then stored.
    more = [*units, _units(model, ["model.layers.1.mlp.gate_proj"])[0]]
    cached_gradient_norms(model, more, CALIB, tmp_path, "k1")
    assert len(calls) == 2
    cached_gradient_norms(model, more, CALIB, tmp_path, "k1")
    assert len(calls) == 2

    path.write_bytes(b"\x00garbage, not a safetensors file" * 10)
    with caplog.at_level(logging.WARNING, logger="evocomp"):
        fixed = cached_gradient_norms(model, units, CALIB, tmp_path, "k1")
    assert len(calls) == 3
    assert any("recomputing" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    for name in first:
        torch.testing.assert_close(fixed[name], first[name], rtol=0, atol=0)
    monkeypatch.setattr(gradients, "gradient_norms", refuse)
    cached_gradient_norms(model, units, CALIB, tmp_path, "k1")  # overwritten: loads now


def test_cache_rejects_stored_tensors_of_the_wrong_shape(tmp_path, caplog):
    from safetensors.torch import save_file

    model = _model()
    units = _units(model)
    save_file({u.name: torch.ones(2, 2) for u in units},
              str(tmp_path / "gradients-k.safetensors"))
    with caplog.at_level(logging.WARNING, logger="evocomp"):
        got = cached_gradient_norms(model, units, CALIB, tmp_path, "k")
    assert got[NAMES[0]].shape == units[0].shape
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_only_linear_units_are_accepted(tmp_path):
    model = _model()
    sublayer = find_sublayer_units(model)[0]
    with pytest.raises(ValueError, match="linear units only"):
        gradient_norms(model, [*_units(model), sublayer], CALIB)
    with pytest.raises(ValueError, match="linear units only"):
        cached_gradient_norms(model, [sublayer], CALIB, tmp_path, "k")
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="token ids"):
        gradient_norms(model, _units(model), CALIB.float())
