"""Dense reference outputs: computed once per (model, tokens) and cached on disk."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from evocomp.evaluators.base import forward_logits
from evocomp.paths import locked

if TYPE_CHECKING:
    from evocomp.evaluators.data import TokenBlock


@dataclass
class DenseReference:
    """The dense model's next-token distribution at every position of ``tokens``,
    stored in the form KL evaluation needs.

    Full: ``probs`` [n, seq, vocab] and ``neg_entropy`` = Σ p log p [n, seq], so
    KL(p‖q) = neg_entropy − Σ p·logits + logsumexp(logits) costs one reduction
    and one dot product per position. ``neg_entropy`` is computed from the dense
    logits with those same kernels (:func:`logit_terms`): the two large terms
    (~24 nats each for SmolLM2) then carry the same float32 rounding and it
    cancels, instead of biasing every KL by ~1e-3 (measured).
    With ``topk``: the k most likely tokens' log-probs and ``indices``
    [n, seq, k], which large vocabularies need.
    All float32: float16 rounding is as large as a mildly compressed model's KL.
    """

    probs: torch.Tensor  # full: [n, seq, vocab] probabilities; topk: [n, seq, k] log-probs
    neg_entropy: torch.Tensor | None  # [n, seq], full only
    indices: torch.Tensor | None  # [n, seq, k], topk only

    @property
    def topk(self) -> int | None:
        return None if self.indices is None else self.probs.shape[-1]

    def to(self, device: torch.device | str) -> DenseReference:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return DenseReference(self.probs.to(device), move(self.neg_entropy), move(self.indices))


def logit_terms(
    probs: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ p·logits − logsumexp(logits) per position (``[seq, vocab]`` -> ``[seq]``),
    i.e. Σ p log q; the one kernel both the reference and every evaluation use.
    ``lse`` may be passed when the caller already has it."""
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)
    return torch.einsum("sv,sv->s", probs, logits) - lse


def reference_key(model_fingerprint: str, tokens_fingerprint: str, topk: int | None) -> str:
    blob = f"v3|{model_fingerprint}|{tokens_fingerprint}|{topk}".encode()
    return hashlib.sha256(blob).hexdigest()[:32]


@dataclass(frozen=True)
class ReferenceCache:
    """Where dense outputs of one model on one token set are kept: a file per
    variant (full distribution, or top-k) in ``root``, named by the fingerprints,
    so any change of model or tokens computes them afresh.

    With ``blocks`` (the rows each corpus of a mixture supplied,
    :meth:`~evocomp.evaluators.data.TokenSplits.blocks`), :meth:`reference` keeps a
    file per block, named by that block's own tokens: a mixture's part shares its
    file with a run on that corpus alone whose sequences are the same."""

    root: Path
    model_fingerprint: str
    tokens_fingerprint: str
    blocks: tuple[TokenBlock, ...] = ()

    def path(self, topk: int | None, tokens_fingerprint: str | None = None) -> Path:
        """The file of the whole token set (or of the block ``tokens_fingerprint``)."""
        key = reference_key(
            self.model_fingerprint, tokens_fingerprint or self.tokens_fingerprint, topk
        )
        return self.root / f"{key}.safetensors"

    def reference(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        *,
        topk: int | None = None,
        batch_size: int = 4,
        progress: bool = True,
    ) -> DenseReference:
        """:func:`compute_reference` of ``tokens`` through this cache: one file, or
        with several ``blocks`` one per block, assembled in row order."""
        if len(self.blocks) <= 1:  # one corpus: its block is the whole token set
            return compute_reference(model, tokens, topk=topk, batch_size=batch_size,
                                     cache_path=self.path(topk), progress=progress)
        rows = sorted(r for block in self.blocks for r in block.rows)
        if rows != list(range(tokens.shape[0])):
            raise ValueError("the reference blocks do not cover each row of the tokens once")
        parts = [
            (block.rows, compute_reference(
                model, tokens[list(block.rows)], topk=topk, batch_size=batch_size,
                cache_path=self.path(topk, block.fingerprint), progress=progress,
            ))
            for block in self.blocks
        ]
        return _assembled(parts, tokens.shape[0])


def _assembled(
    parts: list[tuple[tuple[int, ...], DenseReference]], n: int
) -> DenseReference:
    """One reference from per-block ones: each block's rows back at their places."""

    def gather(name: str) -> torch.Tensor | None:
        first = getattr(parts[0][1], name)
        if first is None:
            return None
        out = first.new_empty((n, *first.shape[1:]))
        for rows, ref in parts:
            out[list(rows)] = getattr(ref, name)
        return out

    probs = gather("probs")
    assert probs is not None
    return DenseReference(probs, gather("neg_entropy"), gather("indices"))


def compute_reference(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    topk: int | None = None,
    batch_size: int = 4,
    cache_path: Path | None = None,
    progress: bool = True,
) -> DenseReference:
    """Dense outputs of ``model`` on ``tokens``, read from ``cache_path`` if there
    (concurrent callers with one ``cache_path`` take turns: one computes, the others
    read what it wrote)."""
    if cache_path is None:
        return _compute(model, tokens, topk=topk, batch_size=batch_size, progress=progress)
    with locked(cache_path.with_suffix(".lock")):
        if cache_path.exists():
            data = load_file(str(cache_path))
            return DenseReference(data["probs"], data.get("neg_entropy"), data.get("indices"))
        ref = _compute(model, tokens, topk=topk, batch_size=batch_size, progress=progress)
        tensors = {"probs": ref.probs.contiguous()}
        for name in ("neg_entropy", "indices"):
            value = getattr(ref, name)
            if value is not None:
                tensors[name] = value.contiguous()
        tmp = cache_path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, cache_path)
        return ref


def _compute(
    model: nn.Module, tokens: torch.Tensor, *, topk: int | None, batch_size: int, progress: bool
) -> DenseReference:
    probs, neg_entropy, indices = [], [], []
    with torch.inference_mode():
        for batch in tqdm(tokens.split(batch_size), desc="dense reference", disable=not progress):
            logits = forward_logits(model, batch).cpu()
            logp = torch.log_softmax(logits, dim=-1)
            if topk:
                v, ix = logp.topk(topk, dim=-1)
                probs.append(v)
                indices.append(ix)
            else:
                p = logp.exp()
                probs.append(p)
                neg_entropy.append(
                    torch.stack([logit_terms(pr, lr) for pr, lr in zip(p, logits, strict=True)])
                )
    return DenseReference(
        torch.cat(probs),
        None if topk else torch.cat(neg_entropy),
        torch.cat(indices) if topk else None,
    )
