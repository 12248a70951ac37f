"""GGUF export: what write_gguf puts in the file is what transformers (and llama.cpp)
read back, and weights already on a type's grid come back exactly."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import byte_tokenizer, search_config, tiny_llama
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from evocomp.errors import EvocompError
from evocomp.gguf_export import WRITABLE_TYPES, gguf_type_for_bits, write_gguf
from evocomp.spaces.gguf_types import gguf_type
from evocomp.supernet.gguf import GGUFQuantizer

TYPES = {
    "model.layers.0.self_attn.q_proj": "Q4_0",
    "model.layers.0.self_attn.k_proj": "Q5_1",  # GQA: permuted with the KV head count
    "model.layers.0.self_attn.v_proj": "Q4_1",
    "model.layers.0.mlp.down_proj": "Q5_0",
    "model.layers.1.self_attn.q_proj": "Q8_0",
    "model.layers.1.self_attn.k_proj": "MXFP4",
    "model.layers.1.mlp.gate_proj": "Q4_1",
    "model.layers.2.self_attn.o_proj": "F16",
    "model.layers.3.mlp.up_proj": "Q8_0",
    "lm_head": "Q8_0",
}
ON_GRID = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
           "model.layers.1.self_attn.k_proj", "model.layers.3.mlp.up_proj", "lm_head"]


def _reload(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' reverse of llama.cpp's Q/K row layout (written independently of
    the exporter's permutation)."""
    dim = w.shape[0] // heads // 2
    return w.reshape(heads, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _file_weights(path: Path, info: dict, heads: int, kv_heads: int) -> dict[str, np.ndarray]:
    """Every tensor of the file dequantized by gguf-py, by HF name, in HF row order."""
    out = {}
    for t in GGUFReader(path).tensors:
        values = dequantize(t.data, t.tensor_type).reshape(info["tensors"][t.name]["shape"])
        if ".attn_q." in t.name:
            values = _unpermute(values, heads)
        elif ".attn_k." in t.name:
            values = _unpermute(values, kv_heads)
        out[info["tensors"][t.name]["hf_name"]] = np.array(values)  # writable
    return out


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(0, 252, 7).reshape(2, -1)
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_mixed_types_reload_as_gguf_py_dequantizes_them(tmp_path):
    model = tiny_llama()
    for name in ON_GRID:  # as a gguf-compressor variant would leave them
        linear = model.get_submodule(name)
        linear.weight.data = GGUFQuantizer(linear.weight).compress(gguf_type(TYPES[name]).id)
    path = tmp_path / "out" / "tiny.gguf"
    info = write_gguf(model, byte_tokenizer(), path, TYPES)

    assert info["bytes"] == path.stat().st_size and info["architecture"] == "llama"
    written = {v["hf_name"]: v for v in info["tensors"].values()}
    for name, kind in TYPES.items():
        assert written[f"{name}.weight"]["type"] == kind
        assert written[f"{name}.weight"]["exact"] == (name in ON_GRID)
    assert written["model.embed_tokens.weight"]["type"] == "F32"
    assert written["model.norm.weight"]["type"] == "F32"
    reader = GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_k.weight"] == "Q5_1" and types["output.weight"] == "Q8_0"
    assert reader.fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0: most weights

    reloaded = _reload(path)
    state = reloaded.state_dict()
    from_file = _file_weights(path, info, heads=4, kv_heads=2)
    for name, weight in model.state_dict().items():
        got = state[name]
        assert torch.equal(got, torch.from_numpy(from_file[name])), name
        module = name.rsplit(".", 1)[0]
        kind = TYPES.get(module, "F32")
        if kind == "F32" or module in ON_GRID:
            assert torch.equal(got, weight), name  # exact
        elif kind == "F16":
            assert torch.equal(got, weight.half().float()), name
        else:  # quantized from an off-grid weight: llama.cpp's grid, as the compressor gives
            expected = GGUFQuantizer(weight).compress(gguf_type(kind).id)
            assert torch.equal(got, expected) and not torch.equal(got, weight), name


def test_an_f32_export_reproduces_the_model_and_its_tokenizer(tmp_path):
    model, tokenizer = tiny_llama(), byte_tokenizer()
    path = tmp_path / "f32.gguf"
    info = write_gguf(model, tokenizer, path, {})
    assert info["file_type"] == "F32" and all(t["exact"] for t in info["tensors"].values())
    assert torch.equal(_logits(_reload(path)), _logits(model))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = "Hello, GGUF world!\n"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded.bos_token_id, loaded.eos_token_id) == (256, 257)


def test_half_float_type_keeps_norms_in_f32(tmp_path):
    model = tiny_llama()
    path = tmp_path / "f16.gguf"
    info = write_gguf(model, byte_tokenizer(), path, {}, float_type="BF16")
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["token_embd.weight"] == "BF16" and types["blk.0.ffn_up.weight"] == "BF16"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert info["file_type"] == "BF16"
    state = _reload(path).state_dict()
    for name, weight in model.state_dict().items():
        expected = weight if weight.ndim == 1 else weight.bfloat16().float()
        assert torch.equal(state[name], expected), name


def test_tied_embeddings_and_removed_blocks(tmp_path):
    model = tiny_llama(seed=3)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    del model.model.layers[1]  # a depth-searched model keeps the blocks it has
    del model.model.layers[2]
    model.config.num_hidden_layers = 2
    path = tmp_path / "tied.gguf"
    info = write_gguf(model, byte_tokenizer(), path, {"model.layers.1.mlp.down_proj": "Q8_0"})
    assert "output.weight" not in info["tensors"] and "blk.1.ffn_down.weight" in info["tensors"]
    assert not any(name.startswith("blk.2.") for name in info["tensors"])
    reloaded = _reload(path)
    assert reloaded.config.tie_word_embeddings and reloaded.config.num_hidden_layers == 2
    model.model.layers[1].mlp.down_proj.weight.data = reloaded.model.layers[1].mlp.down_proj.weight
    assert torch.equal(_logits(reloaded), _logits(model))


def test_a_searched_gguf_model_exports_exactly(tmp_path, tiny_model_dir):
    """A search over GGUF types (gguf compressor variants from the database), then the
    best genome written: the file reproduces the searched model's logits bit for bit."""
    from evocomp import runner
    from evocomp.cli import main

    cfg = search_config(
        tmp_path, tiny_model_dir, compressor={"name": "gguf"},
        space={"name": "bits", "preset": "gguf", "target": 5.5},
    )
    assert main(["-q", "search", cfg, "--no-eval"]) == 0
    run = tmp_path / "runs" / "tiny"
    best = json.loads((run / "best.json").read_text())
    types = {row["unit"]: row["type"] for row in best["layers"]}
    assert len(set(types.values())) > 1
    exp = runner.Experiment(runner.load_run_config(run)[0], progress=False)
    path = tmp_path / "searched.gguf"
    with exp.swapper.apply(tuple(best["genome"])) as model:
        info = write_gguf(model, exp.loaded.tokenizer, path, types)
        expected = _logits(model)
    assert all(t["exact"] for t in info["tensors"].values())
    assert torch.equal(_logits(_reload(path)), expected)


def test_bad_requests_are_refused(tmp_path):
    model, tok = tiny_llama(), byte_tokenizer()
    out = tmp_path / "x.gguf"
    with pytest.raises(EvocompError, match=r"not a GGUF type evocomp writes; allowed: .*'Q4_0'"):
        write_gguf(model, tok, out, {"lm_head": "Q4_K"})
    with pytest.raises(EvocompError, match="'model.layers.0.mlp', which is not a linear layer"):
        write_gguf(model, tok, out, {"model.layers.0.mlp": "Q8_0"})
    with pytest.raises(EvocompError, match="float_type 'Q8_0': choose 'BF16', 'F16', 'F32'"):
        write_gguf(model, tok, out, {}, float_type="Q8_0")
    with pytest.raises(EvocompError, match="TQ2_0 stores rows in blocks of 256.*rows have 64"):
        write_gguf(model, tok, out, {"model.layers.0.mlp.up_proj": "TQ2_0"})
    model.lm_head.weight = model.model.embed_tokens.weight
    with pytest.raises(EvocompError, match="lm_head, which shares its weight"):
        write_gguf(model, tok, out, {"lm_head": "Q8_0"})
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=258))
    with pytest.raises(EvocompError, match="supports llama causal LMs.*GPT2LMHeadModel"):
        write_gguf(gpt2, tok, out, {})
    assert not out.exists()


def test_bitwidths_map_onto_llama_cpp_types():
    assert [gguf_type_for_bits(b, False) for b in (2, 3, 4, 5, 6, 8)] == [
        None, None, "Q4_1", "Q5_1", None, "Q8_0"]
    assert [gguf_type_for_bits(b, True) for b in (4, 5, 8, 16)] == ["Q4_0", "Q5_0", "Q8_0", None]
    assert {"Q4_0", "Q8_0", "F32", "F16", "BF16"} <= set(WRITABLE_TYPES)


@pytest.mark.slow
def test_smollm2_exports_with_its_own_tokenizer(tmp_path):
    from evocomp.supernet.models import ModelConfig, _smollm2_135m, load_model

    loaded = load_model(ModelConfig())
    model, source = loaded.model, _smollm2_135m()
    # The packaged file is Q4_1: its linears are on the Q4_1 grid already.
    types = {f"model.layers.{b}.{n}": "Q4_1" for b in (0, 29) for n in
             ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")}
    types |= {"model.layers.5.mlp.up_proj": "Q8_0", "model.layers.5.self_attn.v_proj": "Q8_0"}
    path = tmp_path / "smollm2.gguf"
    info = write_gguf(model, loaded.tokenizer, path, types, source=source)
    written = {v["hf_name"]: v for v in info["tensors"].values()}
    assert all(written[f"{n}.weight"]["exact"] for n, t in types.items() if t == "Q4_1")
    assert "output.weight" not in info["tensors"]  # tied embeddings

    reader = GGUFReader(path)
    original = GGUFReader(source)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre"):
        assert reader.fields[key].contents() == original.fields[key].contents()
    reloaded = _reload(path)
    state = reloaded.state_dict()
    for name, weight in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if types.get(module) == "Q8_0":
            expected = GGUFQuantizer(weight).compress(int(GGMLQuantizationType.Q8_0))
            assert torch.equal(state[name], expected), name
        else:
            assert torch.equal(state[name], weight), name
    text = "The quick brown fox jumps over the lazy dog."
    tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert tok(text)["input_ids"] == loaded.tokenizer(text)["input_ids"]
