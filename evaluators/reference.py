"""Dense reference outputs: computed once per (model, tokens) and cached on disk."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from evocomp.evaluators.base import forward_logits

log = logging.getLogger("evocomp")


@dataclass
class DenseReference:
    """Dense next-token log-probabilities for every position of ``tokens``.

    With ``topk`` set only the k most likely tokens are kept (values and
    indices) — what large vocabularies need; otherwise the full distribution is
    kept in float32.
    """

    logprobs: torch.Tensor  # [n, seq, vocab], or [n, seq, k] with topk; float32
    indices: torch.Tensor | None  # [n, seq, k] int64 with topk

    @property
    def topk(self) -> int | None:
        return None if self.indices is None else self.logprobs.shape[-1]

    def sequence(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = None if self.indices is None else self.indices[i]
        return self.logprobs[i].float(), idx


def reference_key(model_fingerprint: str, tokens_fingerprint: str, topk: int | None) -> str:
    blob = f"{model_fingerprint}|{tokens_fingerprint}|{topk}".encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def compute_reference(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    topk: int | None = None,
    batch_size: int = 4,
    cache_path: Path | None = None,
    progress: bool = True,
) -> DenseReference:
    """Dense log-probs of ``model`` on ``tokens``, read from ``cache_path`` if there."""
    if cache_path is not None and cache_path.exists():
        data = load_file(str(cache_path))
        return DenseReference(data["logprobs"], data.get("indices"))
    values, indices = [], []
    with torch.inference_mode():
        for batch in tqdm(tokens.split(batch_size), desc="dense reference", disable=not progress):
            logp = torch.log_softmax(forward_logits(model, batch), dim=-1).cpu()
            if topk:
                v, ix = logp.topk(topk, dim=-1)
                values.append(v)
                indices.append(ix)
            else:
                values.append(logp)
    ref = DenseReference(torch.cat(values), torch.cat(indices) if topk else None)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"logprobs": ref.logprobs.contiguous()}
        if ref.indices is not None:
            tensors["indices"] = ref.indices.contiguous()
        tmp = cache_path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, cache_path)
    return ref
