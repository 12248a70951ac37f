import hashlib
import json
import random

import pytest
import torch
from conftest import block_stamps, flip_bytes, stored_tensors, tiny_spec
from safetensors import safe_open

from evocomp.errors import EvocompError
from evocomp.spaces import SparsitySpace
from evocomp.supernet import database
from evocomp.supernet.composite import PruneQuantize
from evocomp.supernet.compressors import COMPRESSORS
from evocomp.supernet.database import (
    DatabaseSpec,
    build_database,
    capture_block_inputs,
    open_database,
    variant_key,
    variant_name,
    verify_database,
)
from evocomp.supernet.quantizers import QuantizedWeight
from evocomp.supernet.swap import Swapper
from evocomp.supernet.units import find_linear_units


def _calibration(n: int = 4, seq: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(0))


def _setup(model, compressor="sparsegpt", **space_kw):
    units = find_linear_units(model)
    space = SparsitySpace(units, SparsitySpace.Params(target=0.5, step=0.1, levels=2, **space_kw))
    params = COMPRESSORS.get(compressor).Params()
    spec = tiny_spec(model, compressor, params, space.variants())
    return units, space, spec, params


@pytest.fixture
def built(tiny_model, tmp_path):
    units, space, spec, params = _setup(tiny_model)
    build_database(tiny_model, units, spec, tmp_path, _calibration(), params=params, progress=False)
    return tiny_model, units, space, spec, tmp_path


def test_every_variant_has_the_exact_zero_count(built):
    model, units, space, spec, root = built
    db = open_database(root, spec)
    for unit in units:
        for zeros in spec.variants[unit.name]:
            w = db.get(unit.name, zeros)
            assert w.shape == model.get_submodule(unit.name).weight.shape
            assert int((w == 0).sum()) == zeros


def test_int_keys_keep_the_original_tensor_names(built):
    _, units, _, spec, root = built
    assert variant_name("a.b", 7) == "a.b@7" and variant_name("a.b", (1024, 3)) == "a.b@1024x3"
    blocks = {u.block for u in units}
    with safe_open(str(root / "block_000.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert len(blocks) > 1
    # Sparse weights are stored as pieces of their name (unit@7:mask, unit@7:values).
    assert {n.split(":")[0] for n in names} == {
        f"{u.name}@{z}" for u in units if u.block == 0 for z in spec.variants[u.name]
    }


def test_variant_keys_normalise_json_lists_and_reject_others():
    assert variant_key([3, 4]) == (3, 4) and variant_key(5) == 5
    for bad in ["7", 2.5, (), [1, "x"], None]:
        with pytest.raises(EvocompError, match="variant key"):
            variant_key(bad)


def test_tuple_keys_store_and_load_prune_quantize_variants(tiny_model, tmp_path):
    names = ["model.layers.0.self_attn.k_proj", "model.layers.2.mlp.down_proj"]
    units = [u for u in find_linear_units(tiny_model) if u.name in names]
    params = PruneQuantize.Params()  # sparsegpt, then gptq
    variants = {u.name: [(0, 4), (u.numel // 2, 3)] for u in units}
    spec = tiny_spec(tiny_model, "prune-quantize", params, variants)
    assert build_database(tiny_model, units, spec, tmp_path, _calibration(), params=params,
                          progress=False)
    # What JSON gives back (lists) names the same database.
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    again = DatabaseSpec(**{**spec.__dict__, "variants": {
        name: info["variants"] for name, info in manifest["units"].items()
    }})
    assert again.key == spec.key
    db = open_database(tmp_path, again)
    for u in units:
        assert db.variants(u.name) == [(0, 4), (u.numel // 2, 3)]
        shape = tiny_model.get_submodule(u.name).weight.shape
        dense = db.get(u.name, (0, 4))
        # Unpruned: only the weights within half a 4-bit step of 0 (~13%) are zero.
        assert dense.shape == shape and int((dense == 0).sum()) < u.numel // 4
        w = db.get(u.name, [u.numel // 2, 3])  # a key as JSON brings it back
        assert w.shape == shape and int((w == 0).sum()) >= u.numel // 2
    with pytest.raises(EvocompError, match=r"no variant \(1, 3\) .* holds 2: \(0, 4\)"):
        db.get(units[0].name, (1, 3))
    with safe_open(str(tmp_path / "block_002.safetensors"), framework="pt") as f:
        keys = [f"{names[1]}@0x4", f"{names[1]}@{units[1].numel // 2}x3"]
        # Each variant is stored as packed codes with its quantization grid, which an
        # export packs.
        assert set(f.keys()) == {f"{k}{p}" for k in keys for p in (":codes", ".scale", ".zero")}
    for u in units:
        assert db.stored_parts(u.name) == ("scale", "zero")
        for key, bits in (((0, 4), 4), ((u.numel // 2, 3), 3)):
            w = db.get(u.name, key)
            q = QuantizedWeight.recover(
                w, db.get(u.name, key, part="scale"), db.get(u.name, key, part="zero"), bits
            )
            assert q is not None and torch.equal(q.dequantize(w.dtype), w)
            assert int(q.codes.max()) <= 2**bits - 1 and q.group_size == 64

    # Block 0 sees the embeddings, so its unit is easy to recompute directly.
    layer = tiny_model.get_submodule(names[0])
    direct = PruneQuantize(layer.weight.detach(), params)
    handle = layer.register_forward_hook(lambda _m, a, _o: direct.add_batch(a[0]))
    with torch.inference_mode():
        for hidden, kw in capture_block_inputs(tiny_model, _calibration(), 4):
            tiny_model.model.layers[0](hidden, **kw)
    handle.remove()
    for key in variants[names[0]]:
        assert torch.equal(db.get(names[0], key), direct.compress(key))


def test_stored_weights_equal_a_direct_compression_of_block_zero(built):
    model, units, _, spec, root = built
    db = open_database(root, spec)
    unit = units[0]  # block 0 sees the embeddings, easy to recompute directly
    comp = COMPRESSORS.get("sparsegpt")(model.get_submodule(unit.name).weight.detach())
    layer = model.get_submodule(unit.name)
    handle = layer.register_forward_hook(lambda _m, a, _o: comp.add_batch(a[0]))
    with torch.inference_mode():
        for hidden, kw in capture_block_inputs(model, _calibration(), 4):
            model.model.layers[0](hidden, **kw)
    handle.remove()
    zeros = spec.variants[unit.name][0]
    assert torch.equal(db.get(unit.name, zeros), comp.compress(zeros))


def test_reopening_with_other_inputs_names_what_differs(built):
    _, _, _, spec, root = built
    other = DatabaseSpec(**{**spec.__dict__, "compressor": "wanda"})
    with pytest.raises(EvocompError, match="differs in: compressor"):
        open_database(root, other)
    other = DatabaseSpec(**{**spec.__dict__, "calibration_fingerprint": "calib-1"})
    with pytest.raises(EvocompError, match="differs in: calibration"):
        open_database(root, other)


def test_a_finished_database_serves_a_subset_of_its_levels(built):
    model, units, _, spec, root = built
    fewer = {name: keys[1:3] for name, keys in spec.variants.items()}
    subset = DatabaseSpec(**{**spec.__dict__, "variants": fewer})
    db = open_database(root, subset)
    name, keys = next(iter(fewer.items()))
    assert int((db.get(name, keys[0]) == 0).sum()) == keys[0]
    assert not build_database(model, units, subset, root, _calibration(), progress=False)
    more = {name: [*keys, 1] for name, keys in spec.variants.items()}
    with pytest.raises(EvocompError, match="differs in: variants"):
        open_database(root, DatabaseSpec(**{**spec.__dict__, "variants": more}))








def _unit_in(units, block):
    return next(u for u in units if u.block == block)


def test_corrupt_block_file_is_reported(built):
    _, _, _, spec, root = built
    (root / "block_002.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(
        EvocompError,
        match=r"block_002.safetensors has 8 bytes, not the \d+ written .*; "
        r"run `evocomp database build` to rebuild it",
    ):
        open_database(root, spec)


def test_manifest_records_each_block_files_size_and_sha256(built):
    _, units, _, _, root = built
    manifest = json.loads((root / "manifest.json").read_text())
    files = sorted(p.name for p in root.glob("block_*.safetensors"))
    assert len(files) == len({u.block for u in units}) and sorted(manifest["checksums"]) == files
    for name in files:
        data = (root / name).read_bytes()
        assert manifest["checksums"][name] == {
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
        }
    assert not list(root.glob("*.tmp"))


def test_flipped_bytes_fail_loudly_and_a_build_restores_them_bit_for_bit(built):
    model, units, _, spec, root = built
    original = stored_tensors(root)
    checksums = json.loads((root / "manifest.json").read_text())["checksums"]
    stamps = block_stamps(root)
    bad_weight = open_database(root, spec).get(
        _unit_in(units, 1).name, spec.variants[_unit_in(units, 1).name][0]
    )
    flip_bytes(root / "block_001.safetensors")
    database._VERIFIED.clear()  # as in a fresh process

    db = open_database(root, spec)  # size and header still fine: caught on first read
    ok, bad = _unit_in(units, 0), _unit_in(units, 1)
    db.get(ok.name, spec.variants[ok.name][0])
    with pytest.raises(
        EvocompError,
        match=r"^database file \S+/block_001.safetensors fails its checksum .*; "
        r"run `evocomp database build` to rebuild it$",
    ):
        db.get(bad.name, spec.variants[bad.name][0])
    found = verify_database(root, spec)
    assert list(found.problems) == ["block_001.safetensors"] and found.unchecked == 0
    assert found.hashed_bytes == sum(c["bytes"] for c in checksums.values())

    assert build_database(model, units, spec, root, _calibration(), progress=False)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["complete"] and manifest["done_blocks"] == [0, 1, 2, 3]
    assert manifest["checksums"] == checksums  # the very bytes first written
    after = block_stamps(root)
    assert after["block_001.safetensors"] != stamps["block_001.safetensors"]
    assert {k: v for k, v in after.items() if k != "block_001.safetensors"} == {
        k: v for k, v in stamps.items() if k != "block_001.safetensors"
    }
    rebuilt = stored_tensors(root)
    assert rebuilt.keys() == original.keys()
    assert all(torch.equal(rebuilt[k], original[k]) for k in original)
    assert not verify_database(root, spec).problems
    db = open_database(root, spec)
    assert torch.equal(db.get(bad.name, spec.variants[bad.name][0]), bad_weight)


def test_truncated_and_deleted_blocks_are_rebuilt_not_looped(built):
    model, units, _, spec, root = built
    original = stored_tensors(root)
    stamps = block_stamps(root)
    path = root / "block_000.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (root / "block_002.safetensors").unlink()
    with pytest.raises(EvocompError, match=r"block_000.safetensors has \d+ bytes, not the"):
        open_database(root, spec)
    found = verify_database(root, spec)
    assert found.problems == {
        "block_000.safetensors": found.problems["block_000.safetensors"],
        "block_002.safetensors": "is missing",
    }
    built_now = []
    assert build_database(model, units, spec, root, _calibration(), progress=False,
                          on_block=built_now.append)
    # The calibration forward stops at the last block rebuilt.
    assert built_now == [0, 1, 2]
    after = block_stamps(root)
    assert {n for n in after if after[n] != stamps.get(n)} == {
        "block_000.safetensors", "block_002.safetensors",
    }
    rebuilt = stored_tensors(root)
    assert rebuilt.keys() == original.keys()
    assert all(torch.equal(rebuilt[k], original[k]) for k in original)
    assert not build_database(model, units, spec, root, _calibration(), progress=False)
    open_database(root, spec)


def test_each_block_file_is_hashed_once_per_process(built, monkeypatch):
    _, units, _, spec, root = built
    hashed = []
    real = database._sha256
    monkeypatch.setattr(database, "_sha256", lambda p: hashed.append(p.name) or real(p))

    def read_everything():
        db = open_database(root, spec)
        for u in units:
            for key in spec.variants[u.name]:
                db.get(u.name, key)

    read_everything()
    assert hashed == []  # the build hashed what it wrote
    database._VERIFIED.clear()  # a fresh process
    read_everything()
    read_everything()
    assert sorted(hashed) == sorted(p.name for p in root.glob("block_*.safetensors"))


def test_a_database_without_checksums_is_accepted_unchecked(built):
    model, units, _, spec, root = built
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["checksums"]  # as written before checksums were recorded
    (root / "manifest.json").write_text(json.dumps(manifest))
    database._VERIFIED.clear()
    flip_bytes(root / "block_001.safetensors")  # nothing to tell this from real weights
    assert not build_database(model, units, spec, root, _calibration(), progress=False)
    db = open_database(root, spec)
    bad = _unit_in(units, 1)
    db.get(bad.name, spec.variants[bad.name][0])
    found = verify_database(root, spec)
    assert not found.problems and found.unchecked == found.files == 4
    (root / "block_003.safetensors").unlink()  # what it can tell: missing or unreadable
    assert build_database(model, units, spec, root, _calibration(), progress=False)
    manifest = json.loads((root / "manifest.json").read_text())
    assert list(manifest["checksums"]) == ["block_003.safetensors"]
    assert verify_database(root, spec).unchecked == 3


def test_a_subset_config_rebuilds_a_damaged_block_with_every_level(built):
    model, units, _, spec, root = built
    original = stored_tensors(root)
    fewer = {name: keys[1:3] for name, keys in spec.variants.items()}
    subset = DatabaseSpec(**{**spec.__dict__, "variants": fewer})
    flip_bytes(root / "block_002.safetensors")
    database._VERIFIED.clear()
    assert build_database(model, units, subset, root, _calibration(), progress=False)
    rebuilt = stored_tensors(root)
    assert rebuilt.keys() == original.keys()
    assert all(torch.equal(rebuilt[k], original[k]) for k in original)
    # A config lacking a unit of the damaged block cannot rebuild it, and says so
    # before touching the manifest.
    flip_bytes(root / "block_002.safetensors")
    database._VERIFIED.clear()
    manifest = (root / "manifest.json").read_bytes()
    few_units = [u for u in units if u.name != _unit_in(units, 2).name]
    with pytest.raises(EvocompError, match="must be rebuilt, but this config lacks its unit"):
        build_database(model, few_units, subset, root, _calibration(), progress=False)
    assert (root / "manifest.json").read_bytes() == manifest


def test_interrupted_build_resumes_without_redoing_finished_blocks(tiny_model, tmp_path):
    units, _, spec, params = _setup(tiny_model)

    def crash_after_block_1(block: int) -> None:
        if block == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_database(tiny_model, units, spec, tmp_path, _calibration(), params=params,
                       progress=False, on_block=crash_after_block_1)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["done_blocks"] == [0, 1] and not manifest["complete"]
    before = {b: (tmp_path / f"block_00{b}.safetensors").stat().st_mtime_ns for b in (0, 1)}
    with pytest.raises(EvocompError, match="no finished variant database"):
        open_database(tmp_path, spec)
    build_database(tiny_model, units, spec, tmp_path, _calibration(), params=params,
                   progress=False)
    after = {b: (tmp_path / f"block_00{b}.safetensors").stat().st_mtime_ns for b in (0, 1)}
    assert before == after
    db = open_database(tmp_path, spec)
    assert int((db.get(units[-1].name, spec.variants[units[-1].name][0]) == 0).sum()) > 0


def test_apply_swaps_in_place_and_restores_bit_for_bit(built):
    model, units, space, spec, root = built
    swapper = Swapper(model, space, open_database(root, spec))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    ids = {u.name: model.get_submodule(u.name).weight.data_ptr() for u in units}
    x = torch.randint(0, 256, (1, 16))
    rng = random.Random(0)
    for _ in range(5):
        genome = space.random(rng, steps=30)
        with swapper.apply(genome) as m:
            assert m is model
            for i, unit in enumerate(units):
                w = model.get_submodule(unit.name).weight
                assert int((w == 0).sum()) == space.units[i].numel - space.level_cost(i, genome[i])
            sparse_out = model(x).logits
        for k, v in model.state_dict().items():
            assert torch.equal(v, dense[k]), k
        assert ids == {u.name: model.get_submodule(u.name).weight.data_ptr() for u in units}
        assert not torch.equal(sparse_out, model(x).logits)


def test_apply_restores_after_an_exception(built):
    model, _, space, spec, root = built
    swapper = Swapper(model, space, open_database(root, spec))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), swapper.apply(space.uniform()):
        raise RuntimeError("boom")
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


def test_a_quantized_database_built_before_grids_were_stored_is_rebuilt_with_them(
    tiny_model, tmp_path
):
    units = [u for u in find_linear_units(tiny_model) if u.block == 0][:2]
    params = COMPRESSORS.get("rtn").Params(group_size=32)
    spec = tiny_spec(tiny_model, "rtn", params, {u.name: [3, 4] for u in units})
    assert build_database(tiny_model, units, spec, tmp_path, _calibration(), params=params,
                          progress=False)
    weights = {u.name: open_database(tmp_path, spec).get(u.name, 3) for u in units}
    # What an older evocomp wrote: the weights only, no parts in the manifest.
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for info in manifest["units"].values():
        del info["parts"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    old = open_database(tmp_path, spec)
    assert old.stored_parts(units[0].name) == ()
    assert torch.equal(old.get(units[0].name, 3), weights[units[0].name])  # still serves

    assert build_database(tiny_model, units, spec, tmp_path, _calibration(), params=params,
                          progress=False)
    db = open_database(tmp_path, spec)
    assert not build_database(tiny_model, units, spec, tmp_path, _calibration(), params=params,
                              progress=False)
    for u in units:
        assert db.stored_parts(u.name) == ("scale", "zero")
        assert torch.equal(db.get(u.name, 3), weights[u.name])
        assert db.get(u.name, 3, part="scale").shape == (u.shape[0], u.shape[1] // 32)


def _quantized_variants(units, compressor):
    if compressor == "prune-quantize":
        return {u.name: [(0, 4), (u.numel // 4, 2), (u.numel // 2, 3)] for u in units}
    return {u.name: [2, 3, 4, 8] for u in units}


def _compact_cases():
    yield "sparsegpt", {}
    yield "magnitude", {}
    for name in ("rtn", "gptq"):
        for symmetric in (False, True):
            yield name, {"group_size": 32, "symmetric": symmetric}
    yield "prune-quantize", {"quantize": {"name": "gptq", "group_size": 32}}


def _block_bytes(root):
    return sum(p.stat().st_size for p in root.glob("block_*.safetensors"))


def _as_written_before_encodings(root):
    """Strip what an older evocomp's manifest did not have."""
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest.pop("storage") == 1 and not any(manifest.pop("encodings").values())
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(("compressor", "options"), list(_compact_cases()))
def test_compact_variants_read_back_exactly_as_the_dense_layout_stores_them(
    tiny_model, tmp_path, monkeypatch, compressor, options
):
    units = find_linear_units(tiny_model)
    params = COMPRESSORS.get(compressor).Params(**options)
    if COMPRESSORS.get(compressor).kind == "sparsity":
        variants = _setup(tiny_model, compressor)[2].variants
    else:
        variants = _quantized_variants(units, compressor)
    spec = tiny_spec(tiny_model, compressor, params, variants)
    monkeypatch.setattr(database, "_ENCODE", False)
    build_database(tiny_model, units, spec, tmp_path / "dense", _calibration(), params=params,
                   progress=False)
    monkeypatch.setattr(database, "_ENCODE", True)
    build_database(tiny_model, units, spec, tmp_path / "compact", _calibration(),
                   params=params, progress=False)
    _as_written_before_encodings(tmp_path / "dense")
    old, db = open_database(tmp_path / "dense", spec), open_database(tmp_path / "compact", spec)
    assert "storage" not in old.manifest and db.manifest["storage"] == 2
    for u in units:
        assert db.stored_parts(u.name) == old.stored_parts(u.name)
        for key in db.variants(u.name):
            for part in ("", *db.stored_parts(u.name)):
                a, b = db.get(u.name, key, part=part), old.get(u.name, key, part=part)
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    forms = {
        meta["encoding"] for block in db.manifest["encodings"].values() for meta in block.values()
    }
    if COMPRESSORS.get(compressor).kind == "sparsity":
        # Every level prunes at least 20% (a sparse encoding pays from ~3%).
        assert forms == {"sparse"}
        assert _block_bytes(tmp_path / "compact") < 0.8 * _block_bytes(tmp_path / "dense")
    else:
        # Every weight as packed codes (the 8-bit ones at a quarter of float32).
        assert forms == {"codes"}
        assert sum(len(b) for b in db.manifest["encodings"].values()) == sum(
            len(keys) for keys in variants.values()
        )
        assert _block_bytes(tmp_path / "compact") < 0.5 * _block_bytes(tmp_path / "dense")
    assert not verify_database(tmp_path / "compact", spec).problems


def test_start_variants_are_decoded_when_a_resumed_build_propagates_through_them(
    tiny_model, tmp_path
):
    units = find_linear_units(tiny_model)
    params = COMPRESSORS.get("gptq").Params(group_size=32)
    spec = tiny_spec(tiny_model, "gptq", params, {u.name: [3, 4] for u in units},
                     through={u.name: 3 for u in units})
    whole = tmp_path / "whole"
    build_database(tiny_model, units, spec, whole, _calibration(), params=params, progress=False)

    def crash_after_block_1(block: int) -> None:
        if block == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_database(tiny_model, units, spec, tmp_path / "resumed", _calibration(),
                       params=params, progress=False, on_block=crash_after_block_1)
    # Resumed, block 2 sees inputs propagated through block 1's stored (encoded) variants.
    build_database(tiny_model, units, spec, tmp_path / "resumed", _calibration(), params=params,
                   progress=False)
    a, b = open_database(whole, spec), open_database(tmp_path / "resumed", spec)
    for u in units:
        assert torch.equal(a.get(u.name, 3), b.get(u.name, 3))
    unit = _unit_in(units, 1)
    assert torch.equal(database._read_variant(whole, 1, unit.name, 3), a.get(unit.name, 3))


def test_width_variants_and_their_kept_parts_read_back_exactly(tmp_path, monkeypatch):
    from conftest import tiny_llama

    from evocomp.spaces.width import WidthParams, WidthSpace
    from evocomp.supernet.structured import KEPT, StructuredOBS
    from evocomp.supernet.units import find_sublayer_units

    model = tiny_llama()
    units = find_sublayer_units(model)
    space = WidthSpace(units, WidthParams(target=0.5, step=0.25, levels=2, neuron_multiple=16))
    params = StructuredOBS.Params(propagate="dense")
    spec = DatabaseSpec("tiny", "structured-obs", params.model_dump(), "calib", "float32",
                        space.variants())
    monkeypatch.setattr(database, "_ENCODE", False)
    build_database(model, units, spec, tmp_path / "dense", _calibration(8), params=params,
                   progress=False)
    monkeypatch.setattr(database, "_ENCODE", True)
    build_database(model, units, spec, tmp_path / "compact", _calibration(8), params=params,
                   progress=False)
    _as_written_before_encodings(tmp_path / "dense")
    old, db = open_database(tmp_path / "dense", spec), open_database(tmp_path / "compact", spec)
    for u in units:
        for key in db.variants(u.name):
            for part in ("", KEPT):
                a, b = db.get(u.name, key, part=part), old.get(u.name, key, part=part)
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    # Refit weights have no zeros to drop: stored dense, no larger than before.
    assert _block_bytes(tmp_path / "compact") <= _block_bytes(tmp_path / "dense")


def test_a_database_from_a_newer_evocomp_is_refused(built):
    _, _, _, spec, root = built
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["storage"] = database.STORAGE_VERSION + 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EvocompError, match="written by a newer evocomp"):
        open_database(root, spec)

