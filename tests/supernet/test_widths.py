"""Width variant databases: structured OBS per sublayer with propagated calibration
inputs, stored as kept indices + refit weights, applied as narrower tensors."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import stored_tensors, tiny_llama

from evocomp.spaces.width import WidthParams, WidthSpace
from evocomp.supernet.database import DatabaseSpec, build_database, open_database
from evocomp.supernet.structured import KEPT, StructuredOBS
from evocomp.supernet.swap import Swapper
from evocomp.supernet.units import find_sublayer_units

CALIB = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
TOKENS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))


def _build(model, root, *, gqa="per_group", propagate="expectation", target=0.5, kinds=None):
    units = [u for u in find_sublayer_units(model) if kinds is None or u.kind in kinds]
    space = WidthSpace(units, WidthParams(target=target, step=0.25, levels=2, gqa=gqa,
                                          neuron_multiple=16))
    params = StructuredOBS.Params(propagate=propagate)
    through = (
        {u.name: k for u, k in space.placements(space.uniform())}
        if StructuredOBS.needs_start(params) else None
    )
    spec = DatabaseSpec("tiny", "structured-obs", params.model_dump(), "calib", "float32",
                        space.variants(), through)
    build_database(model, units, spec, root, CALIB, params=params, batch_size=4, progress=False)
    return space, open_database(root, spec)


def _logits(model):
    with torch.no_grad():
        return model(TOKENS, use_cache=False).logits


@pytest.mark.parametrize("gqa", ["per_group", "whole_groups"])
def test_each_variant_keeps_exactly_its_heads_or_neurons_in_a_computable_layout(tmp_path, gqa):
    model = tiny_llama()  # 4 query heads in 2 KV groups, 128 neurons
    space, db = _build(model, tmp_path / "db", gqa=gqa)
    for unit in space.units:
        for key in db.variants(unit.name):
            kept = db.get(unit.name, key, part=KEPT)
            weight = db.get(unit.name, key)
            if unit.kind == "attn":
                heads, kv = key
                assert kept.numel() == heads and weight.shape == (64, heads * 16)
                per_kv = torch.bincount(kept // 2, minlength=2).tolist()
                # per_group: the same number in each KV group; whole_groups: whole groups
                assert per_kv in ([heads // 2] * 2,) if gqa == "per_group" else (
                    sorted(per_kv) in ([0, 0], [0, 2], [2, 2]) and kv == heads // 2
                )
            else:
                assert kept.numel() == key and weight.shape == (64, key)
            assert kept.tolist() == sorted(set(kept.tolist()))


def test_a_narrowed_candidate_computes_what_its_zeroed_export_computes(tmp_path):
    model = tiny_llama()
    space, db = _build(model, tmp_path / "db")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = _logits(model)
    swapper = Swapper(model, space, db)
    rng = __import__("random").Random(0)
    for _ in range(4):
        genome = space.mutate(space.uniform(), rng, switches=3)
        with swapper.apply(genome) as m:
            for i, unit in enumerate(space.units):
                kept, module = space.kept(i, genome[i]), m.get_submodule(unit.name)
                if unit.kind == "attn" and kept:
                    assert module.q_proj.weight.shape[0] == kept * 16  # really narrower
                elif unit.kind == "mlp" and kept:
                    assert module.down_proj.weight.shape[1] == kept
            narrow = _logits(m)
        with swapper.apply(genome, export=True) as m:
            assert m.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)
            zeroed = _logits(m)
        torch.testing.assert_close(narrow, zeroed, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(narrow, dense)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # restored bit for bit


def _family(name: str) -> torch.nn.Module:
    """A tiny model of a Llama-family architecture: 4 query heads in 2 KV groups."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(
        vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    )
    return getattr(transformers, f"{name}ForCausalLM")(config).eval()


@pytest.mark.parametrize("arch", ["Mistral", "Qwen2", "Qwen3", "Gemma", "Gemma2"])
def test_every_supported_attention_reshapes_by_head_dim(tmp_path, arch):
    """Narrower q/k/v/o tensors compute fewer heads (the attention infers the head
    count from the projection), exactly what zeroed heads compute."""
    model = _family(arch)
    space, db = _build(model, tmp_path / "db", gqa="whole_groups")
    swapper = Swapper(model, space, db)
    rng = __import__("random").Random(1)
    for _ in range(3):
        genome = space.mutate(space.uniform(), rng, switches=2)
        with swapper.apply(genome) as m:
            narrow = _logits(m)
        with swapper.apply(genome, export=True) as m:
            zeroed = _logits(m)
        torch.testing.assert_close(narrow, zeroed, rtol=1e-4, atol=1e-4)


def test_gpt2_mlps_are_narrowed_through_their_conv1d_projections(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=258, n_positions=64)
    model = GPT2LMHeadModel(cfg).eval()
    space, db = _build(model, tmp_path / "db", kinds={"mlp"})  # GPT-2's attention is fused
    assert [u.groups for u in space.units] == [256, 256]
    swapper = Swapper(model, space, db)
    rng = __import__("random").Random(2)
    for _ in range(3):
        genome = space.mutate(space.uniform(), rng, switches=2)
        with swapper.apply(genome) as m:
            kept = space.kept(0, genome[0])
            if kept:
                assert m.transformer.h[0].mlp.c_fc.weight.shape == (64, kept)
            narrow = _logits(m)
        with swapper.apply(genome, export=True) as m:
            zeroed = _logits(m)
        torch.testing.assert_close(narrow, zeroed, rtol=1e-4, atol=1e-4)


def test_a_sublayer_keeping_nothing_is_skipped(tmp_path):
    model = tiny_llama()
    space, db = _build(model, tmp_path / "db")
    genome = list(space.uniform())
    genome[1] = 0  # block 0's MLP keeps no neuron
    assert space.kept(1, 0) == 0
    swapper = Swapper(model, space, db)
    assert [u.name for u in swapper.removed(tuple(genome))] == ["model.layers.0.mlp"]
    with swapper.apply(tuple(genome)) as m:
        assert m.model.layers[0].mlp.forward(torch.ones(1, 2, 64)).abs().sum() == 0


def test_propagation_changes_what_later_blocks_are_fit_to(tmp_path):
    model = tiny_llama()
    stored = {}
    for mode in ("dense", "level", "expectation"):
        _build(model, tmp_path / mode, propagate=mode)
        stored[mode] = stored_tensors(tmp_path / mode)
    first = [k for k in stored["dense"] if k[1].startswith("model.layers.0.self_attn@")]
    last = [k for k in stored["dense"] if k[1].startswith("model.layers.3.mlp@")]
    for mode in ("level", "expectation"):
        # Block 0's attention sees the same inputs in every mode; later layers do not.
        assert all(torch.equal(stored[mode][k], stored["dense"][k]) for k in first)
        assert any(not torch.equal(stored[mode][k], stored["dense"][k]) for k in last)
    assert any(not torch.equal(stored["level"][k], stored["expectation"][k]) for k in last)


def test_a_damaged_block_of_a_propagated_build_is_rebuilt_bit_for_bit(tmp_path):
    model = tiny_llama()
    _build(model, tmp_path / "db")
    before = stored_tensors(tmp_path / "db")
    (tmp_path / "db" / "block_002.safetensors").unlink()
    _build(model, tmp_path / "db")  # blocks 0-1 are recomputed to propagate, not rewritten
    after = stored_tensors(tmp_path / "db")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_compact_copy_generates_like_the_zeroed_model_with_removed_sublayers(tmp_path):
    from evocomp.supernet.shrink import compact_copy

    model = tiny_llama()
    space, db = _build(model, tmp_path / "db")
    genome = list(space.uniform())
    genome[0] = 0  # block 0's attention keeps no head: the KV cache's first layer
    genome[3] = 0  # block 1's MLP keeps no neuron
    genome = tuple(genome)
    swapper = Swapper(model, space, db)
    with swapper.apply(genome) as m:
        removed = {u.name for u in swapper.removed(genome)}
        small = compact_copy(m, removed)
    assert small.config.layer_heads[0] == 0 and small.config.layer_intermediate[1] == 0
    prompt = TOKENS[:1, :6]
    with torch.no_grad(), swapper.apply(genome, export=True) as m:
        want = m.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        logits = _logits(m)
    with torch.no_grad():
        got = small.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        torch.testing.assert_close(_logits(small), logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(got, want)


def test_the_expectation_averages_over_at_most_nine_widths_spread_evenly(monkeypatch):
    """A fine grid (coarse-to-fine's) must not cost a block forward per level."""
    from evocomp.supernet import widths

    unit = find_sublayer_units(tiny_llama())[1]  # an MLP of 128 neurons
    built = {k: widths.WidthVariant(torch.arange(k), torch.zeros(1)) for k in range(0, 129, 8)}
    ran: list[int] = []

    class Block(torch.nn.Module):
        def forward(self, hidden, **kw):
            return (hidden * ran[-1],)

    def applied(model, u, variant):
        ran.append(variant.kept.numel())
        return contextlib.nullcontext()

    monkeypatch.setattr(widths, "applied", applied)
    batch = widths.Batch(torch.ones(1, 2, 4), {})
    dense = [torch.full((1, 2, 4), 128.0)]
    out = widths._expectation(None, Block(), unit, [batch], built, dense)
    assert ran == [16 * k for k in range(1, 9)]  # 0, 16, ..., 128 of 17; 0 adds nothing
    weights = [k / 128 for k in ran]
    want = (128 + sum(w * k for w, k in zip(weights, ran, strict=True))) / (1 + sum(weights))
    assert torch.allclose(out[0], torch.full((1, 2, 4), want))
