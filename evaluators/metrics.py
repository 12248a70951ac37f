"""KL divergence to the dense model, and perplexity."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from evocomp.evaluators.base import (
    EVALUATORS,
    EvaluatorParams,
    Forward,
    RowSums,
    RowwiseEvaluator,
    forward_logits,
)
from evocomp.evaluators.reference import (
    DenseReference,
    ReferenceCache,
    compute_reference,
    logit_terms,
)


def kl_divergence(
    ref_logprobs: torch.Tensor, ref_indices: torch.Tensor | None, logq: torch.Tensor
) -> torch.Tensor:
    """Per-position KL(dense ‖ candidate) in nats, from log-probabilities.

    With top-k references (``ref_indices`` given) the distributions are compared
    on the k kept tokens plus one bucket for the rest: an exact KL between those
    coarsened distributions, never negative and never above the full KL.
    """
    if ref_indices is None:
        return (ref_logprobs.exp() * (ref_logprobs - logq)).sum(-1)
    logq_k = logq.gather(-1, ref_indices)
    p_k = ref_logprobs.exp()
    kl = (p_k * (ref_logprobs - logq_k)).sum(-1)
    tail_p = (1 - p_k.sum(-1)).clamp_min(1e-12)
    tail_q = (1 - logq_k.exp().sum(-1)).clamp_min(1e-12)
    return kl + tail_p * (tail_p.log() - tail_q.log())


def _kl_and_nll(
    ref: DenseReference, row: int, logits: torch.Tensor, targets: torch.Tensor
) -> tuple[float, float]:
    """Summed KL over positions and summed next-token NLL for one sequence.

    Works on raw logits: log q = logits − logsumexp(logits), so the full-vocabulary
    case needs one reduction and one dot product per position (this is the hot
    path of every candidate evaluation).
    """
    lse = torch.logsumexp(logits, dim=-1)
    nll = (lse[:-1] - logits[:-1].gather(-1, targets[:, None]).squeeze(-1)).sum()
    if ref.indices is None:
        assert ref.neg_entropy is not None
        kl = (ref.neg_entropy[row] - logit_terms(ref.probs[row], logits, lse)).sum()
    else:
        kl = kl_divergence(ref.probs[row], ref.indices[row], logits - lse[:, None]).sum()
    return kl.item(), nll.item()


def _logits(
    model: nn.Module, batch: torch.Tensor, rows: Sequence[int], forward: Forward | None
) -> torch.Tensor:
    return forward_logits(model, batch) if forward is None else forward(batch, rows)


def perplexity(mean_nll: float) -> float:
    """``exp(mean_nll)``; ``inf`` where that overflows a float (a diverged model
    whose loss passes ~709 nats), so the candidate ranks last instead of the search
    dying on it."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


class KLEvaluatorParams(EvaluatorParams):
    """Options of :class:`KLEvaluator`."""

    topk: int | None = Field(
        None, ge=1, description="keep only the dense top-k tokens (large vocabularies)"
    )


@EVALUATORS.register("kl")
class KLEvaluator(RowwiseEvaluator[KLEvaluatorParams]):
    """Mean per-token KL divergence from the dense model's next-token
    distribution (the EvoPress fitness); also reports the candidate's perplexity
    on the same tokens, which comes for free."""

    name = "kl"
    metric = "kl"
    takes_forward = True

    Params = KLEvaluatorParams

    @classmethod
    def resamples(cls, params: Any) -> bool:
        return True

    def __init__(
        self, tokens: torch.Tensor, reference: DenseReference, *, batch_size: int = 4
    ) -> None:
        super().__init__(tokens, batch_size=batch_size)
        if reference.probs.shape[:2] != tokens.shape:
            raise ValueError("reference does not match the evaluation tokens")
        self.reference = reference

    @classmethod
    def create(
        cls, model: nn.Module, tokens: torch.Tensor, params: KLEvaluatorParams, *,
        cache: ReferenceCache | None = None, progress: bool = True,
    ) -> KLEvaluator:
        if cache is None:
            reference = compute_reference(
                model, tokens, topk=params.topk, batch_size=params.batch_size, progress=progress
            )
        else:
            reference = cache.reference(
                model, tokens, topk=params.topk, batch_size=params.batch_size, progress=progress
            )
        device = next(model.parameters()).device
        return cls(tokens, reference.to(device), batch_size=params.batch_size)

    def row_sums(
        self, model: nn.Module, rows: Sequence[int], *, forward: Forward | None = None
    ) -> list[RowSums]:
        out: list[RowSums] = []
        with torch.inference_mode():
            for batch, chunk in self.batches(rows):
                logits = _logits(model, batch, chunk, forward)
                batch = batch.to(logits.device)
                for i, row in enumerate(chunk):
                    kl, nll = _kl_and_nll(self.reference, row, logits[i], batch[i, 1:])
                    out.append({"kl": kl, "nll": nll, "count": float(batch.shape[1])})
        return out

    def combine(self, sums: Sequence[RowSums]) -> dict[str, float]:
        count = sum(s["count"] for s in sums)
        n_pred = count - len(sums)  # the last position of each sequence predicts nothing we hold
        return {
            "kl": sum(s["kl"] for s in sums) / count,
            "ppl": perplexity(sum(s["nll"] for s in sums) / n_pred),
            "tokens": count,
        }


@EVALUATORS.register("ppl")
class PerplexityEvaluator(RowwiseEvaluator[EvaluatorParams]):
    """Perplexity: exp of the mean next-token negative log-likelihood."""

    name = "ppl"
    metric = "ppl"
    takes_forward = True

    @classmethod
    def resamples(cls, params: Any) -> bool:
        return True

    def row_sums(
        self, model: nn.Module, rows: Sequence[int], *, forward: Forward | None = None
    ) -> list[RowSums]:
        out: list[RowSums] = []
        with torch.inference_mode():
            for batch, chunk in self.batches(rows):
                logits = _logits(model, batch, chunk, forward)[:, :-1]
                target = batch[:, 1:].to(logits.device)
                for i in range(len(chunk)):
                    nll = torch.nn.functional.cross_entropy(logits[i], target[i], reduction="sum")
                    out.append({"nll": nll.item(), "count": float(target.shape[1])})
        return out

    def combine(self, sums: Sequence[RowSums]) -> dict[str, float]:
        count = sum(s["count"] for s in sums)
        # Every row has seq_len tokens, one of which predicts nothing.
        return {
            "ppl": perplexity(sum(s["nll"] for s in sums) / count),
            "tokens": count + len(sums),
        }
