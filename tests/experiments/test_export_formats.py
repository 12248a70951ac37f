"""``evocomp export --format compressed-tensors``: quantized layers packed at their
own bitwidths, loaded back by plain ``from_pretrained`` with the searched model's
held-out perplexity, for every space; unsupported combinations refused before
anything is written."""

import json

import pytest
import torch
from conftest import exported_model, search_config
from safetensors import safe_open

from evocomp.cli import main

SEARCH = {"generations": 2}
GPTQ_SYM = {"name": "gptq", "group_size": 32, "symmetric": True}

SPACES = {
    "sparsity": {},
    "bits": {
        "compressor": GPTQ_SYM,
        "space": {"name": "bits", "target": 3.0, "bits": [2, 3, 4, 8]},
    },
    "joint": {
        "compressor": {"name": "prune-quantize", "quantize": GPTQ_SYM},
        "space": {"name": "joint", "spaces": [
            {"name": "sparsity", "target": 0.25, "step": 0.125, "levels": 2},
            {"name": "bits", "bits": [2, 3, 4], "target": 3},
        ]},
    },
    "depth": {"space": {"name": "depth", "remove": 3}},
    "width": {
        "compressor": {"name": "structured-obs"},
        "space": {"name": "width", "target": 0.5, "step": 0.25, "levels": 2,
                  "neuron_multiple": 16},
    },
}


def _tensors(folder):
    out = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


@pytest.mark.parametrize("space", list(SPACES))
def test_compressed_tensors_export_reloads_with_the_searched_perplexity(
    tmp_path, uneven_model_dir, space
):
    cfg = search_config(tmp_path, uneven_model_dir, search=SEARCH, **SPACES[space])
    assert main(["-q", "search", cfg]) == 0
    run = tmp_path / "runs" / "tiny"
    packed_dir, hf_dir = tmp_path / "ct", tmp_path / "hf"
    model, layers = exported_model(run, packed_dir, "compressed-tensors")
    hf, _ = exported_model(run, hf_dir, "hf")
    # The very weights of the plain export, bit for bit.
    for name, tensor in hf.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    info = json.loads((packed_dir / "evocomp.json").read_text())
    stored = _tensors(packed_dir)
    quantized = [r for r in layers if "bits" in r and r["bits"] <= 8]
    if not quantized:
        assert "quantization_config" not in json.loads((packed_dir / "config.json").read_text())
        return
    config = json.loads((packed_dir / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
    targets = {t: g["weights"]["num_bits"] for g in config["config_groups"].values()
               for t in g["targets"]}
    for row in quantized:
        assert targets[row["unit"]] == row["bits"]
        packed = stored[f"{row['unit']}.weight_packed"]
        assert packed.dtype == torch.int32 and f"{row['unit']}.weight" not in stored
        rows, columns = model.get_submodule(row["unit"]).weight.shape
        assert packed.numel() == rows * columns * row["bits"] // 32
    assert info["storage"]["packed"] == {
        f"{b}-bit": sum(r["bits"] == b for r in quantized) for b in {r["bits"] for r in quantized}
    }
    assert info["size_bytes"] < json.loads((hf_dir / "evocomp.json").read_text())["size_bytes"]


def test_asymmetric_grids_are_packed_with_their_zero_points(tmp_path, uneven_model_dir, capsys):
    """What vLLM reads; transformers 5.24 cannot load it yet (compressed-tensors
    0.20 leaves the zero points unpacked in its load path), so the packed tensors
    are checked with the library's own decompressor."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    cfg = search_config(
        tmp_path, uneven_model_dir, search=SEARCH,
        compressor={"name": "gptq", "group_size": 32},
        space={"name": "bits", "target": 3.0, "bits": [2, 3, 4]},
    )
    assert main(["-q", "search", cfg]) == 0
    run = tmp_path / "runs" / "tiny"
    assert main(["-q", "export", str(run), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    out = tmp_path / "ct"
    assert main(["-q", "export", str(run), "--out", str(out), "--format",
                 "compressed-tensors"]) == 0
    err = capsys.readouterr().err
    assert "asymmetric grids" in err and "vLLM's pack-quantized kernels serve 4 and 8" in err
    plain, stored = _tensors(tmp_path / "hf"), _tensors(out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    checked = 0
    for group in config["config_groups"].values():
        scheme = QuantizationScheme.model_validate(group)
        assert scheme.weights.symmetric is False
        for name in group["targets"]:
            parts = {p: stored[f"{name}.{p}"] for p in
                     ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")}
            weight = PackedQuantizationCompressor.decompress(parts, scheme)["weight"]
            assert torch.equal(weight, plain[f"{name}.weight"]), name
            checked += 1
    assert checked == 4 * 7  # every linear of the uneven model is quantized


def _gguf_reload(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        folder, gguf_file="model.gguf", dtype=torch.float32
    ).eval()


def test_a_search_over_gguf_types_exports_exactly_what_llama_cpp_runs(
    tmp_path, uneven_model_dir
):
    cfg = search_config(
        tmp_path, uneven_model_dir, search=SEARCH, compressor={"name": "gguf"},
        space={"name": "bits", "preset": "gguf", "target": 5.0},
    )
    assert main(["-q", "search", cfg]) == 0
    run = tmp_path / "runs" / "tiny"
    hf, layers = exported_model(run, tmp_path / "hf")
    out = tmp_path / "gguf"
    assert main(["-q", "export", str(run), "--out", str(out), "--format", "gguf"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["evocomp.json", "model.gguf"]
    model = _gguf_reload(out)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    storage = json.loads((out / "evocomp.json").read_text())["storage"]
    types = [r["type"] for r in layers]
    assert storage["types"] == {t: types.count(t) for t in set(types)}
    assert storage["requantized"] == [] and len(set(types)) > 1


def test_integer_grids_go_to_gguf_requantized_and_3_bits_are_refused(
    tmp_path, uneven_model_dir, capsys
):
    cfg = search_config(
        tmp_path, uneven_model_dir, search=SEARCH, compressor=GPTQ_SYM,
        space={"name": "bits", "target": 4.5, "bits": [4, 5, 8]},
    )
    assert main(["-q", "search", cfg]) == 0
    run = tmp_path / "runs" / "tiny"
    hf, layers = exported_model(run, tmp_path / "hf")
    capsys.readouterr()
    out = tmp_path / "gguf"
    assert main(["-q", "export", str(run), "--out", str(out), "--format", "gguf"]) == 0
    assert "re-quantizes 28 layers" in capsys.readouterr().err
    storage = json.loads((out / "evocomp.json").read_text())["storage"]
    kinds = {4: "Q4_0", 5: "Q5_0", 8: "Q8_0"}
    bits = [r["bits"] for r in layers]
    assert storage["types"] == {kinds[b]: bits.count(b) for b in set(bits)}
    model = _gguf_reload(out)
    for row in layers:  # close to the searched weight, not equal: another grid
        got = model.get_submodule(row["unit"]).weight
        want = hf.get_submodule(row["unit"]).weight
        step = want.abs().amax() / 2 ** (row["bits"] - 1)
        assert 0 < (got - want).abs().max() <= step

    cfg = search_config(
        tmp_path, uneven_model_dir, name="three", search=SEARCH, compressor=GPTQ_SYM,
        space={"name": "bits", "target": 3.0, "bits": [2, 3, 4]},
        database={"path": str(tmp_path / "db-three")},
    )
    assert main(["-q", "search", cfg]) == 0
    capsys.readouterr()
    out = tmp_path / "refused"
    code = main(["-q", "export", str(tmp_path / "runs" / "three"), "--out", str(out),
                 "--format", "gguf"])
    err = [line for line in capsys.readouterr().err.splitlines() if "evocomp" in line]
    assert code == 2 and len(err) == 1, err
    assert "bits have no llama.cpp type gguf-py writes (it quantizes Q4_0" in err[0]
    assert not out.exists() and not (tmp_path / "refused.partial").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "onnx"], "--format 'onnx' is not a format; choose one of hf, "
                               "compressed-tensors, gguf"),
        (["--format", "gguf", "--compact"], "--compact writes --format hf only"),
        (["--format", "compressed-tensors"], "packs 1..8-bit weights; this model has 12-bit"),
    ],
)
def test_unsupported_exports_fail_cleanly_and_leave_nothing(
    tmp_path, uneven_model_dir, capsys, args, message
):
    cfg = search_config(
        tmp_path, uneven_model_dir, search={"generations": 1},
        compressor={"name": "rtn", "group_size": 32},
        space={"name": "bits", "target": 12, "bits": [8, 12, 16]},
    )
    assert main(["-q", "search", cfg]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["-q", "export", str(tmp_path / "runs" / "tiny"), "--out", str(out), *args]) == 2
    # (transformers' own loading bar may come first)
    err = [line for line in capsys.readouterr().err.splitlines() if "evocomp" in line]
    assert len(err) == 1 and err[0].startswith("evocomp: error: ") and message in err[0], err
    assert not out.exists() and not (tmp_path / "out.partial").exists()
