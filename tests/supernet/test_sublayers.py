import pytest
import torch
from conftest import tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

from evocomp.errors import EvocompError
from evocomp.supernet.sublayers import skip, span_importance, sublayer_importance, zeroed
from evocomp.supernet.units import find_sublayer_units

TOKENS = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=258, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS, use_cache=False).logits


def test_llama_sublayers_in_execution_order_with_parameter_counts(tiny_model):
    units = find_sublayer_units(tiny_model)
    assert [u.kind for u in units] == ["attn", "mlp"] * 4
    assert [u.block for u in units] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert units[6].name == "model.layers.3.self_attn" and units[7].name == "model.layers.3.mlp"
    # q 64x64 + k, v 64x32 (GQA) + o 64x64; gate/up/down 64x128 each.
    attn = tiny_model.model.layers[0].self_attn
    assert units[0].numel == 4096 + 2048 + 2048 + 4096 == _params(attn)
    assert units[1].numel == 3 * 64 * 128 and units[1].shape == (3 * 64 * 128, 1)


def test_gpt2_sublayers_count_biases():
    model = tiny_gpt2()
    units = find_sublayer_units(model)
    assert [(u.name, u.kind) for u in units] == [
        ("transformer.h.0.attn", "attn"),
        ("transformer.h.0.mlp", "mlp"),
        ("transformer.h.1.attn", "attn"),
        ("transformer.h.1.mlp", "mlp"),
    ]
    assert units[0].numel == 32 * 96 + 96 + 32 * 32 + 32
    assert units[1].numel == 2 * 32 * 128 + 128 + 32


def test_targets_and_ignore_filter_sublayers(tiny_model):
    attn = find_sublayer_units(tiny_model, targets=["self_attn"])
    assert [u.kind for u in attn] == ["attn"] * 4
    rest = find_sublayer_units(tiny_model, ignore=[r"re:model\.layers\.0\..*"])
    assert len(rest) == 6 and all(u.block > 0 for u in rest)
    with pytest.raises(EvocompError, match="select no sublayer"):
        find_sublayer_units(tiny_model, targets=["nothing"])


def test_opt_is_rejected_with_the_supported_architectures():
    cfg = OPTConfig(
        vocab_size=258,
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=32,
        num_attention_heads=2,
        word_embed_proj_dim=16,
        max_position_embeddings=64,
    )
    with pytest.raises(EvocompError, match=r"no mlp sublayer.*Llama.*GPT-2"):
        find_sublayer_units(OPTForCausalLM(cfg))


def test_skip_equals_zeroing_the_output_projections(tiny_model):
    units = find_sublayer_units(tiny_model)
    chosen = [units[2], units[5]]  # attention of block 1, MLP of block 2
    with skip(tiny_model, chosen):
        skipped = _logits(tiny_model)
    zeroed = tiny_llama()
    with torch.no_grad():
        zeroed.model.layers[1].self_attn.o_proj.weight.zero_()
        zeroed.model.layers[2].mlp.down_proj.weight.zero_()
    assert torch.equal(skipped, _logits(zeroed))
    assert not torch.equal(skipped, _logits(tiny_model))


def test_skip_gpt2_equals_zeroing_projections_and_biases():
    model = tiny_gpt2()
    units = find_sublayer_units(model)
    with skip(model, [units[1], units[2]]):
        skipped = _logits(model)
    zeroed = tiny_gpt2()
    with torch.no_grad():
        for proj in (zeroed.transformer.h[0].mlp.c_proj, zeroed.transformer.h[1].attn.c_proj):
            proj.weight.zero_()
            proj.bias.zero_()
    assert torch.equal(skipped, _logits(zeroed))


def test_skip_restores_bit_for_bit_also_after_an_exception(tiny_model):
    units = find_sublayer_units(tiny_model)
    before, weights = _logits(tiny_model), _snapshot(tiny_model)
    with skip(tiny_model, units[:3]):
        _logits(tiny_model)
    with pytest.raises(KeyError), skip(tiny_model, units):
        raise KeyError("boom")
    assert all("forward" not in tiny_model.get_submodule(u.name).__dict__ for u in units)
    assert torch.equal(_logits(tiny_model), before)
    after = tiny_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())


def test_skip_keeps_a_forward_already_on_the_instance(tiny_model):
    attn = tiny_model.model.layers[0].self_attn
    calls = []

    def wrapped(*args, **kwargs):  # like accelerate's hooks, which live on the instance
        calls.append(1)
        return type(attn).forward(attn, *args, **kwargs)

    attn.forward = wrapped
    before = _logits(tiny_model)
    with skip(tiny_model, find_sublayer_units(tiny_model)[:1]):
        _logits(tiny_model)
    assert attn.__dict__["forward"] is wrapped
    assert torch.equal(_logits(tiny_model), before)


def test_skipped_sublayers_do_no_compute(tiny_model):
    units = find_sublayer_units(tiny_model)
    with skip(tiny_model, units):
        _logits(tiny_model)  # the first call per class may probe the output structure
    calls = []
    for block in tiny_model.model.layers:
        for proj in (block.self_attn.q_proj, block.mlp.down_proj):
            proj.register_forward_hook(lambda *_: calls.append(1))
    with skip(tiny_model, units):
        _logits(tiny_model)
    assert calls == []
    _logits(tiny_model)
    assert len(calls) == 8


def test_importance_in_range_and_larger_for_a_scaled_up_sublayer(tiny_model):
    units = find_sublayer_units(tiny_model)
    base = sublayer_importance(tiny_model, TOKENS, units, batch_size=2)
    assert set(base) == {u.name for u in units}
    assert all(0.0 <= s <= 2.0 for s in base.values())
    with torch.no_grad():
        tiny_model.model.layers[2].self_attn.o_proj.weight.mul_(10.0)
        tiny_model.model.layers[2].mlp.down_proj.weight.mul_(10.0)
    scaled = sublayer_importance(tiny_model, TOKENS, units, batch_size=3)
    assert all(0.0 <= s <= 2.0 for s in scaled.values())
    for name in ("model.layers.2.self_attn", "model.layers.2.mlp"):
        assert scaled[name] > 2 * base[name]
    assert max(scaled, key=scaled.get) == "model.layers.2.self_attn"


def test_block_span_is_shortgpt_block_influence(tiny_model):
    units = find_sublayer_units(tiny_model)
    blocks = [units[0:2], units[2:4]]
    ours = span_importance(tiny_model, TOKENS, blocks, batch_size=2)
    with torch.no_grad():
        hs = tiny_model(TOKENS, use_cache=False, output_hidden_states=True).hidden_states
    for b, score in enumerate(ours):
        cos = torch.nn.functional.cosine_similarity(hs[b], hs[b + 1], dim=-1)
        assert score == pytest.approx(1 - cos.mean().item(), abs=1e-5)


def test_sublayer_importance_matches_manual_cosine(tiny_model):
    units = find_sublayer_units(tiny_model)
    block = tiny_model.model.layers[1]
    captured = {}

    def pre(_m, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]

    block.register_forward_pre_hook(pre, with_kwargs=True)
    block.self_attn.register_forward_hook(lambda _m, _a, out: captured.__setitem__("a", out[0]))
    with torch.no_grad():
        tiny_model(TOKENS, use_cache=False)
    h, a = captured["h"], captured["a"]
    manual = 1 - torch.nn.functional.cosine_similarity(h, h + a, dim=-1).mean().item()
    ours = sublayer_importance(tiny_model, TOKENS, [units[2]], batch_size=3)
    assert ours["model.layers.1.self_attn"] == pytest.approx(manual, abs=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_zeroed_sublayers_match_skipping_and_save(make, tmp_path):
    model = make()
    units = find_sublayer_units(model)
    chosen = [units[0], units[3]]
    before, weights = _logits(model), _snapshot(model)
    with skip(model, chosen):
        skipped = _logits(model)
    with zeroed(model, chosen):
        assert torch.equal(_logits(model), skipped)
        model.save_pretrained(tmp_path)
    assert torch.equal(_logits(model), before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(reloaded), skipped)
