"""Shared fixtures: tiny random Llama-style models and a byte-level tokenizer,
built in memory so the suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Tiny models gain nothing from intra-op threads, and two OpenMP threads on a busy
# 2-core machine turn microsecond ops into tens of milliseconds.
torch.set_num_threads(1)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real (if trivial) tokenizer: one token per byte (ids 0-255), then BOS/EOS (256, 257)."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_llama(
    *, layers: int = 4, hidden: int = 64, intermediate: int = 128, vocab: int = 258, seed: int = 0
) -> LlamaForCausalLM:
    """A randomly initialised Llama with GQA (4 heads, 2 KV heads)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=257,
    )
    model = LlamaForCausalLM(cfg).eval()
    return model


def random_weight(seed: int = 0, rows: int = 24, cols: int = 72) -> torch.Tensor:
    """A Gaussian weight matrix for per-layer compressor tests."""
    torch.manual_seed(seed)
    return torch.randn(rows, cols)


def correlated_inputs(
    tokens: int = 1024, cols: int = 72, outliers: int = 4, seed: int = 1
) -> torch.Tensor:
    """LLM-like activations: low-rank correlated columns plus a few large-scale ones."""
    gen = torch.Generator().manual_seed(seed)
    mix = (
        0.3 * torch.eye(cols)
        + torch.randn(cols, 8, generator=gen) @ torch.randn(8, cols, generator=gen) / 3
    )
    x = torch.randn(tokens, cols, generator=gen) @ mix
    x[:, torch.arange(outliers) * (cols // outliers) + 1] *= 10  # scattered, as in real LLMs
    return x


def uneven_llama(seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama whose blocks differ in sensitivity: the first blocks write
    strongly into the residual stream, the last ones barely, so pruning the first
    blocks costs far more than pruning the last."""
    model = tiny_llama(seed=seed)
    scales = [3.0, 2.0, 0.5, 0.2]
    with torch.no_grad():
        for block, scale in zip(model.model.layers, scales, strict=True):
            block.self_attn.o_proj.weight.mul_(scale)
            block.mlp.down_proj.weight.mul_(scale)
        model.lm_head.weight.mul_(20.0)  # sharper next-token distributions
    return model


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


def _saved(model: LlamaForCausalLM, out: Path) -> Path:
    """Save ``model`` with the byte tokenizer as a plain Hugging Face directory."""
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    return _saved(tiny_llama(), tmp_path / "tiny-llama")


@pytest.fixture
def uneven_model_dir(tmp_path: Path) -> Path:
    return _saved(uneven_llama(), tmp_path / "uneven-llama")
