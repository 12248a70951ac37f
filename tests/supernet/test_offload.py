"""Offloaded models: blocks in CPU memory, each copied to the device only while it
works. On the CPU the device is the CPU too, but every visit is a real copy, so
which block is visiting shows as parameters that are not their CPU tensors."""

import copy

import torch
from conftest import tiny_llama, tiny_spec

from evocomp.spaces import SparsitySpace
from evocomp.supernet.compressors import COMPRESSORS, SparseGPT
from evocomp.supernet.database import (
    build_database,
    capture_block_inputs,
    open_database,
)
from evocomp.supernet.models import ModelConfig, load_model, model_fingerprint
from evocomp.supernet.offload import offload_blocks, offloaded
from evocomp.supernet.swap import Swapper
from evocomp.supernet.units import find_blocks, find_linear_units


def _masters(model):
    """data_ptr of every block parameter: where its CPU tensor lives."""
    _, blocks = find_blocks(model)
    return [{n: p.data_ptr() for n, p in b.named_parameters()} for b in blocks]


def _visiting(model, masters):
    """The blocks whose parameters now point elsewhere than their CPU tensors."""
    _, blocks = find_blocks(model)
    out = []
    for i, b in enumerate(blocks):
        moved = {n: p.data_ptr() != masters[i][n] for n, p in b.named_parameters()}
        assert len(set(moved.values())) == 1, f"block {i} is half on the device"
        if any(moved.values()):
            out.append(i)
    return out


def _spec(model):
    units = find_linear_units(model)
    space = SparsitySpace(units, SparsitySpace.Params(target=0.5, step=0.1, levels=2))
    params = COMPRESSORS.get("sparsegpt").Params()  # propagate: level, through the uniform
    through = {u.name: k for u, k in space.placements(space.uniform())}
    spec = tiny_spec(model, "sparsegpt", params, space.variants(), through=through)
    return units, space, spec, params


def _calibration():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def test_forward_visits_one_block_at_a_time_and_matches_the_plain_model():
    plain, model = tiny_llama(), tiny_llama()
    tokens = _calibration()
    state = offload_blocks(model, "cpu")
    masters = _masters(model)
    seen = []
    _, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        block.mlp.down_proj.register_forward_hook(
            lambda *_, i=i: seen.append((i, _visiting(model, masters)))
        )
    with torch.inference_mode():
        assert torch.equal(model(tokens).logits, plain(tokens).logits)
    assert seen == [(i, [i]) for i in range(len(blocks))]
    assert _visiting(model, masters) == [] and not state.resident
    assert model_fingerprint(model) == model_fingerprint(plain)


def test_a_forward_stopped_by_a_hook_leaves_no_block_on_the_device():
    model = tiny_llama()
    offload_blocks(model, "cpu")
    masters = _masters(model)
    capture_block_inputs(model, _calibration(), 2)  # stops in block 0's pre-hook
    assert _visiting(model, masters) == []


def test_offloaded_build_is_byte_identical_and_holds_one_block_at_a_time(
    tmp_path, monkeypatch
):
    plain, model = tiny_llama(), tiny_llama()
    units, space, spec, params = _spec(plain)
    build_database(plain, units, spec, tmp_path / "plain", _calibration(), params=params,
                   progress=False)

    state = offload_blocks(model, "cpu")
    masters = _masters(model)
    at_compress = []
    prune = SparseGPT._prune

    def recording(self, level):
        at_compress.append(_visiting(model, masters))
        return prune(self, level)

    monkeypatch.setattr(SparseGPT, "_prune", recording)
    units, _, spec_o, _ = _spec(model)
    assert spec_o.key == spec.key  # the fingerprint does not see where blocks live
    build_database(model, units, spec, tmp_path / "offloaded", _calibration(), params=params,
                   progress=False)

    n_blocks = len(find_blocks(model)[1])
    # Every compression ran with exactly one block on the device, in block order.
    per_block = len(units) // n_blocks * len(spec.variants[units[0].name])
    assert at_compress == [[b] for b in range(n_blocks) for _ in range(per_block)]
    assert _visiting(model, masters) == [] and not state.resident
    assert state.visits == n_blocks  # the build's own visits; its forwards copy nothing more
    for f in sorted((tmp_path / "plain").glob("block_*.safetensors")):
        assert f.read_bytes() == (tmp_path / "offloaded" / f.name).read_bytes(), f.name


def test_swapped_variants_run_on_an_offloaded_model(tmp_path):
    plain, model = tiny_llama(), tiny_llama()
    units, space, spec, params = _spec(plain)
    build_database(plain, units, spec, tmp_path, _calibration(), params=params, progress=False)
    db = open_database(tmp_path, spec)
    offload_blocks(model, "cpu")
    genome = space.uniform()
    tokens = _calibration()
    with torch.inference_mode():
        with Swapper(plain, space, db).apply(genome) as m:
            want = m(tokens).logits
        with Swapper(model, space, db).apply(genome) as m:
            got = m(tokens).logits
        dense = model(tokens).logits
    assert torch.equal(got, want)
    assert torch.equal(dense, plain(tokens).logits)  # the swap was undone


def test_a_deep_copy_runs_its_own_blocks():
    model = tiny_llama()
    offload_blocks(model, "cpu")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.layers[0].mlp.down_proj.weight.zero_()
    tokens = _calibration()[:1]
    with torch.inference_mode():
        assert not torch.equal(twin(tokens).logits, model(tokens).logits)
    assert offloaded(twin) is not offloaded(model)


def test_load_model_offloads_the_blocks(tiny_model_dir):
    cfg = ModelConfig(name=str(tiny_model_dir))
    plain = load_model(cfg)
    loaded = load_model(cfg.model_copy(update={"offload": True}))
    state = offloaded(loaded.model)
    assert state is not None and state.device == torch.device("cpu")
    assert offloaded(plain.model) is None
    assert loaded.fingerprint == plain.fingerprint

