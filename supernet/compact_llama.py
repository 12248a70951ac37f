"""A Llama whose blocks differ in width: per-layer query heads, KV heads and MLP
neurons (0 = that sublayer removed). ``evocomp export --compact`` saves the narrowed
model with this file beside it (transformers' ``auto_map``), so
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads it.

This file is copied into every compact export and imported there by transformers: it
imports nothing but torch and transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


class CompactLlamaConfig(LlamaConfig):
    """:class:`LlamaConfig` plus the width of every layer."""

    model_type = "evocomp_compact_llama"

    def __init__(
        self,
        layer_heads: list[int] | None = None,
        layer_kv_heads: list[int] | None = None,
        layer_intermediate: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        n = self.num_hidden_layers
        self.layer_heads = list(layer_heads or [self.num_attention_heads] * n)
        self.layer_kv_heads = list(layer_kv_heads or [self.num_key_value_heads] * n)
        self.layer_intermediate = list(layer_intermediate or [self.intermediate_size] * n)
        for name in ("layer_heads", "layer_kv_heads", "layer_intermediate"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} needs one entry per layer ({n})")


class RemovedSublayer(nn.Module):
    """A sublayer that adds nothing to the residual stream (it keeps no head or neuron)."""

    def __init__(self, returns_tuple: bool) -> None:
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        zeros = torch.zeros_like(hidden_states)
        return (zeros, None) if self.returns_tuple else zeros


class CompactLlamaForCausalLM(LlamaForCausalLM):
    """:class:`LlamaForCausalLM` with each layer's projections sized from the config."""

    config_class = CompactLlamaConfig

    def __init__(self, config: CompactLlamaConfig) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        for i, layer in enumerate(self.model.layers):
            heads, kv = config.layer_heads[i], config.layer_kv_heads[i]
            attn = layer.self_attn
            if heads == 0:
                layer.self_attn = RemovedSublayer(returns_tuple=True)
            else:
                dim, bias = attn.head_dim, config.attention_bias
                attn.q_proj = nn.Linear(hidden, heads * dim, bias=bias)
                attn.k_proj = nn.Linear(hidden, kv * dim, bias=bias)
                attn.v_proj = nn.Linear(hidden, kv * dim, bias=bias)
                attn.o_proj = nn.Linear(heads * dim, hidden, bias=bias)
                attn.num_key_value_groups = heads // kv
            width = config.layer_intermediate[i]
            if width == 0:
                layer.mlp = RemovedSublayer(returns_tuple=False)
            else:
                bias = config.mlp_bias
                layer.mlp.gate_proj = nn.Linear(hidden, width, bias=bias)
                layer.mlp.up_proj = nn.Linear(hidden, width, bias=bias)
                layer.mlp.down_proj = nn.Linear(width, hidden, bias=bias)
        self.post_init()
