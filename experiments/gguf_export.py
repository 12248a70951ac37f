"""Write a Hugging Face Llama as a llama.cpp GGUF file, chosen linears quantized.

:func:`write_gguf` follows llama.cpp's ``convert_hf_to_gguf.py`` for the ``llama``
architecture: tensor names from gguf-py's name map, Q/K rows permuted into
llama.cpp's rotary layout (transformers undoes it on load), the same metadata
keys, norms and other 1-D tensors in F32. Linears named in ``types`` are
quantized with gguf-py (a port of ggml's reference quantizers); a weight that a
``gguf`` compressor variant put there is already on its type's grid, so the file
holds exactly the searched weight. Everything else is written as ``float_type``.

The tokenizer is copied from the source GGUF when there is one (the packaged
SmolLM2), else written from the Hugging Face tokenizer's byte-level BPE
vocabulary, so that llama.cpp and ``transformers`` (``gguf_file=``) load the file.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import dequantize, quantize
from torch import nn

from evocomp.errors import EvocompError, choices
from evocomp.spaces.gguf_types import FLOAT_TYPES, GGUF_TYPES, QUANT_TYPES

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "WRITABLE_TYPES",
    "gguf_type_for_bits",
    "write_gguf",
]

WRITABLE_TYPES: tuple[str, ...] = QUANT_TYPES + FLOAT_TYPES
"""The GGUF tensor types :func:`write_gguf` writes (a linear may take any; the
rest of the model one of the float types)."""

SUPPORTED_ARCHITECTURES: dict[str, str] = {"llama": "llama"}
"""Hugging Face ``model_type`` -> llama.cpp architecture that :func:`write_gguf` writes."""

_BITS_TO_TYPE: dict[tuple[int, bool], str] = {
    (4, False): "Q4_1",
    (5, False): "Q5_1",
    (8, False): "Q8_0",  # llama.cpp has no asymmetric 8-bit type it quantizes to
    (4, True): "Q4_0",
    (5, True): "Q5_0",
    (8, True): "Q8_0",
}

# Token types as llama.cpp numbers them (gguf.TokenType).
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = (
    int(gguf.TokenType.NORMAL),
    int(gguf.TokenType.CONTROL),
    int(gguf.TokenType.USER_DEFINED),
    int(gguf.TokenType.UNUSED),
)


def gguf_type_for_bits(bits: int, symmetric: bool) -> str | None:
    """The llama.cpp type an evocomp integer-bit grid maps onto: asymmetric (scale and
    zero point) 4 / 5 / 8 bits -> Q4_1 / Q5_1 / Q8_0, symmetric -> Q4_0 / Q5_0 / Q8_0;
    None for bitwidths llama.cpp has no such type for. The grids differ (GGUF blocks
    hold 32 weights with fp16 scales), so writing such a layer re-quantizes it."""
    return _BITS_TO_TYPE.get((bits, bool(symmetric)))


def write_gguf(
    model: nn.Module,
    tokenizer: Any,
    path: Path,
    types: Mapping[str, str],
    *,
    float_type: str = "F32",
    source: Path | None = None,
) -> dict[str, Any]:
    """Write ``model`` (a Hugging Face ``LlamaForCausalLM``) to the GGUF file ``path``.

    ``types`` maps linear module names (``model.layers.0.mlp.down_proj``) to the GGUF
    type their weight is written in (one of :data:`WRITABLE_TYPES`), quantized from
    the model's current weight; every other 2-D tensor (embeddings, ``lm_head``,
    other linears) is written as ``float_type`` (F32, F16 or BF16) and 1-D tensors
    (norms, biases) as F32. A tied ``lm_head`` is not written (llama.cpp then reads
    the token embeddings). Models whose blocks were removed write the blocks they
    have. With ``source`` a ``.gguf`` file, its ``tokenizer.*`` metadata is copied;
    otherwise ``tokenizer``'s byte-level BPE vocabulary is written.

    Returns what was written: ``path``, ``bytes`` (file size), ``file_type``, and per
    GGUF tensor its HF name, type, shape, bytes and whether it dequantizes to the
    model's weight exactly (``exact``).
    """
    path = Path(path)
    arch = _architecture(model)
    if float_type not in FLOAT_TYPES:
        raise EvocompError(f"float_type {float_type!r}: choose {choices(FLOAT_TYPES)}")
    cfg = model.config
    layers = _decoder_layers(model)
    shape = _Shape.of(cfg, len(layers))
    _check_widths(layers, shape)
    chosen = _check_types(model, types)

    writer = gguf.GGUFWriter(None, arch)
    _write_metadata(writer, cfg, shape)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, shape.blocks)
    tensors: dict[str, dict[str, Any]] = {}
    for hf_name, param in _parameters(model):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise EvocompError(f"tensor {hf_name!r} has no llama.cpp name (gguf-py's name map)")
        data = param.detach().to(device="cpu", dtype=torch.float32).numpy()
        if name.endswith((".attn_q.weight", ".attn_q.bias")):
            data = _permute(data, shape.heads, shape.heads)
        elif name.endswith((".attn_k.weight", ".attn_k.bias")):
            data = _permute(data, shape.heads, shape.kv_heads)
        module = hf_name.rsplit(".", 1)[0]
        if data.ndim < 2:
            kind = "F32"  # llama.cpp keeps norms and biases in F32
        elif module in chosen and hf_name.endswith(".weight"):
            kind = chosen[module]
        else:
            kind = float_type
        packed, exact = _encode(data, kind, hf_name)
        qtype = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, packed, raw_dtype=qtype if packed.dtype == np.uint8 else None)
        tensors[name] = {
            "hf_name": hf_name,
            "type": kind,
            "shape": list(data.shape),
            "bytes": int(packed.nbytes),
            "exact": exact,
        }
    file_type = _file_type(tensors, chosen, float_type)
    member = {"F32": "ALL_F32", "MXFP4": "MOSTLY_MXFP4_MOE"}.get(file_type, f"MOSTLY_{file_type}")
    writer.add_file_type(int(gguf.LlamaFileType[member]))
    _write_tokenizer(writer, tokenizer, source, shape.vocab)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "architecture": arch,
        "file_type": file_type,
        "tensors": tensors,
    }


# -- the model --------------------------------------------------------------------


def _architecture(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES or not hasattr(model, "lm_head"):
        raise EvocompError(
            f"GGUF export supports {', '.join(SUPPORTED_ARCHITECTURES)} causal LMs "
            f"(model_type {choices(SUPPORTED_ARCHITECTURES)}), not {type(model).__name__} "
            f"(model_type {model_type!r})"
        )
    return SUPPORTED_ARCHITECTURES[model_type]


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers  # type: ignore[union-attr,return-value]


@dataclass(frozen=True)
class _Shape:
    """The hyperparameters llama.cpp reads, from the config and the blocks present."""

    blocks: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    rope_theta: float
    rms_eps: float
    vocab: int

    @classmethod
    def of(cls, cfg: Any, blocks: int) -> _Shape:
        rope = dict(getattr(cfg, "rope_parameters", None) or {})
        scaling = getattr(cfg, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
        if rope_type not in (None, "default"):
            raise EvocompError(
                f"GGUF export writes plain rotary embeddings; this model uses rope_type "
                f"{rope_type!r}"
            )
        heads = cfg.num_attention_heads
        return cls(
            blocks=blocks,
            hidden=cfg.hidden_size,
            ffn=cfg.intermediate_size,
            heads=heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            context=cfg.max_position_embeddings,
            rope_theta=float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))),
            rms_eps=float(cfg.rms_norm_eps),
            vocab=cfg.vocab_size,
        )


def _check_widths(layers: nn.ModuleList, shape: _Shape) -> None:
    """llama.cpp's llama has one width for every block; narrowed blocks cannot go."""
    want = {
        "self_attn.q_proj": shape.heads * shape.head_dim,
        "self_attn.k_proj": shape.kv_heads * shape.head_dim,
        "self_attn.v_proj": shape.kv_heads * shape.head_dim,
        "mlp.up_proj": shape.ffn,
    }
    for b, layer in enumerate(layers):
        for name, rows in want.items():
            got = layer.get_submodule(name).weight.shape[0]
            if got != rows:
                raise EvocompError(
                    f"block {b}'s {name} has {got} outputs, the config {rows}: GGUF export "
                    "needs every block at the config's width (export width-searched models "
                    "as Hugging Face directories)"
                )


def _check_types(model: nn.Module, types: Mapping[str, str]) -> dict[str, str]:
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    tied = _tied(model)
    for name, kind in types.items():
        if kind not in WRITABLE_TYPES:
            raise EvocompError(
                f"types[{name!r}] = {kind!r} is not a GGUF type evocomp writes; "
                f"allowed: {choices(WRITABLE_TYPES)}"
            )
        if name not in linears:
            raise EvocompError(
                f"types names {name!r}, which is not a linear layer of the model "
                "(e.g. model.layers.0.mlp.down_proj)"
            )
        if name == "lm_head" and tied:
            raise EvocompError(
                "types names lm_head, which shares its weight with the token embeddings; "
                "the file holds only the embeddings (written as float_type)"
            )
    return dict(types)


def _tied(model: nn.Module) -> bool:
    head = model.lm_head.weight  # type: ignore[union-attr]
    return head is model.get_input_embeddings().weight  # type: ignore[operator]


def _parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Named parameters to write; named_parameters() lists a tied lm_head once, under
    the embeddings' name."""
    return list(model.named_parameters(remove_duplicate=True))


def _permute(weights: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """llama.cpp's rotary layout of Q / K rows (convert_hf_to_gguf.py, LlamaModel.permute):
    each head's two halves interleaved. Whole rows move, so row-wise block quantization
    is unaffected."""
    if kv_heads != heads:
        heads = kv_heads
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _encode(data: np.ndarray, kind: str, hf_name: str) -> tuple[np.ndarray, bool]:
    """``data`` in GGUF type ``kind`` (what the writer stores) and whether it
    dequantizes back to ``data`` exactly."""
    qtype = gguf.GGMLQuantizationType[kind]
    block = GGUF_TYPES[kind].block_size
    if data.shape[-1] % block:
        raise EvocompError(
            f"{hf_name}: GGUF type {kind} stores rows in blocks of {block} weights, but its "
            f"rows have {data.shape[-1]}"
        )
    packed = quantize(np.ascontiguousarray(data), qtype)
    exact = bool(np.array_equal(dequantize(packed, qtype).reshape(data.shape), data))
    return packed, exact


def _file_type(
    tensors: Mapping[str, Mapping[str, Any]], chosen: Mapping[str, str], float_type: str
) -> str:
    """The type of most chosen linear weights (llama.cpp's "mostly Q4_0"), else float_type."""
    counts: Counter[str] = Counter()
    for info in tensors.values():
        if info["hf_name"].rsplit(".", 1)[0] in chosen and info["type"] in QUANT_TYPES:
            counts[info["type"]] += int(np.prod(info["shape"]))
    return counts.most_common(1)[0][0] if counts else float_type


def _write_metadata(writer: gguf.GGUFWriter, cfg: Any, shape: _Shape) -> None:
    """The keys convert_hf_to_gguf.py writes for a llama model."""
    writer.add_type(gguf.GGUFType.MODEL)
    name = str(getattr(cfg, "name_or_path", "") or "").rstrip("/").rsplit("/", 1)[-1]
    writer.add_name(name or "evocomp export")
    writer.add_vocab_size(shape.vocab)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.blocks)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# -- the tokenizer -----------------------------------------------------------------


def _write_tokenizer(
    writer: gguf.GGUFWriter, tokenizer: Any, source: Path | None, vocab_size: int
) -> None:
    if source is not None and Path(source).suffix == ".gguf":
        _copy_tokenizer(writer, Path(source), vocab_size)
    else:
        _write_bpe_tokenizer(writer, tokenizer, vocab_size)


def _copy_tokenizer(writer: gguf.GGUFWriter, source: Path, vocab_size: int) -> None:
    """Every ``tokenizer.*`` key of ``source``, with its value types."""
    if not source.is_file():
        raise EvocompError(f"source {str(source)!r} is not a file")
    reader = gguf.GGUFReader(source)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise EvocompError(f"source {str(source)!r} holds no tokenizer (tokenizer.ggml.tokens)")
    if len(tokens.data) != vocab_size:
        raise EvocompError(
            f"source {str(source)!r} has {len(tokens.data)} tokens, the model {vocab_size}"
        )
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def _write_bpe_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """A byte-level BPE (GPT-2 style) tokenizer as llama.cpp's ``gpt2`` model: tokens by
    id (padded to the model's vocabulary with unused ``[PAD<id>]``), their types,
    merges and special token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    if spec.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(
        [spec.get("pre_tokenizer"), spec.get("decoder")]
    ):
        raise EvocompError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 style) only; give source= "
            "the model's .gguf file to copy its tokenizer instead"
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise EvocompError(
            f"the tokenizer has ids up to {max(vocab.values())}, the model {vocab_size} tokens"
        )
    added = {t.content: t for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    by_id = {i: t for t, i in vocab.items()}
    tokens, kinds = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            kinds.append(_UNUSED)
        else:
            tokens.append(token)
            extra = added.get(token)
            kinds.append(
                _NORMAL if extra is None else _CONTROL if extra.special else _USER_DEFINED
            )
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    if merges:
        writer.add_token_merges(merges)
    else:
        # A vocabulary without merges (one token per byte): GGUF has no empty arrays, and
        # transformers, finding no merges, derives them from token scores, so give it
        # some (later ids rank lower, as in llama.cpp's vocabularies). llama.cpp itself
        # wants merges for a gpt2 vocabulary; every real BPE tokenizer has them.
        writer.add_token_scores([-float(i) for i in range(vocab_size)])
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(int(token_id))
    add_bos = getattr(tokenizer, "add_bos_token", None)
    if isinstance(add_bos, bool):
        writer.add_add_bos_token(add_bos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)
