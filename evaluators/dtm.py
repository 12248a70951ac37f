"""First divergent token: how long a candidate's greedy continuation of a prompt
stays identical to the dense model's.

Perplexity and KL judge every next-token distribution on human text; generation
compounds errors, so a candidate can keep a fine KL and still leave the dense
model's path after a few tokens. This evaluator scores that directly, and cheaply:

* **Prompts** are windows of ``prompt_len`` tokens of the evaluator's tokens (the
  search split, like every evaluator): prompt ``k`` is window ``k // n`` of
  sequence ``k % n`` (``n`` sequences), so the first prompts come from different
  sequences. At most ``prompts`` of them.
* **Dense continuations** (``new_tokens`` greedy tokens per prompt) are decoded once
  with a KV cache, settled so that scoring the dense model reproduces them exactly
  (below), and cached on disk beside the dense logits.
* **A candidate** is scored by one forward over ``prompt + dense continuation``
  (teacher forcing), not by decoding: up to its first divergence the candidate's own
  greedy continuation *is* the dense one, so the first position whose argmax differs
  from the dense token is exactly where free-running greedy decoding would diverge.
  One batched forward over ``prompt_len + new_tokens - 1`` tokens per prompt, no
  decoding loop, and no KV cache (which skipped sublayers would not fill).

Fitness ``dtm = 1 - mean(agreed) / new_tokens`` (lower is better, 0 = the dense
model), where ``agreed`` is a prompt's number of tokens before the first divergence;
also reported: ``agreed`` (mean tokens) and ``agree_all`` (the fraction of prompts
that agree on all ``new_tokens``).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from evocomp.errors import EvocompError
from evocomp.evaluators.base import EVALUATORS, Evaluator, EvaluatorParams, Forward
from evocomp.evaluators.reference import ReferenceCache, reference_key
from evocomp.paths import locked


class DTMParams(EvaluatorParams):
    """Options of :class:`DTMEvaluator`."""

    batch_size: int = Field(8, ge=1, description="prompts per forward pass")
    prompts: int = Field(
        32, ge=1, description="prompts at most (fewer when the search split holds fewer "
        "windows of prompt_len tokens)"
    )
    prompt_len: int = Field(64, ge=1, description="tokens of each prompt (at most data.seq_len)")
    new_tokens: int = Field(32, ge=1, description="greedy tokens compared after each prompt")


def prompt_windows(tokens: torch.Tensor, prompts: int, prompt_len: int) -> torch.Tensor:
    """``[min(prompts, available), prompt_len]`` prompts cut from ``tokens``
    ``[n, seq_len]``: prompt ``k`` is window ``k // n`` of sequence ``k % n``."""
    n, seq_len = tokens.shape
    per_row = seq_len // prompt_len
    count = min(prompts, n * per_row)
    rows = [
        tokens[k % n, (k // n) * prompt_len : (k // n + 1) * prompt_len] for k in range(count)
    ]
    return torch.stack(rows)


def greedy_continuations(
    model: nn.Module, prompts: torch.Tensor, new_tokens: int, *, batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """``[len(prompts), new_tokens]`` greedy tokens of ``model`` after each prompt,
    decoded with a KV cache (the loader turns ``config.use_cache`` off for scoring,
    so it is asked for here), then :func:`settled`."""
    device = next(model.parameters()).device
    # transformers 5 renamed the cache argument and output to `cache`; 4.56 has only
    # `past_key_values`.
    renamed = "cache" in inspect.signature(model.forward).parameters
    out = []
    with torch.inference_mode():
        for batch in tqdm(prompts.split(batch_size), desc="dense continuations",
                          disable=not progress):
            result = model(batch.to(device), use_cache=True)
            step = result.logits[:, -1].argmax(-1)
            steps = [step]
            for _ in range(new_tokens - 1):
                cache = result.cache if renamed else result.past_key_values
                kwargs = {"cache" if renamed else "past_key_values": cache}
                result = model(step[:, None], use_cache=True, **kwargs)
                step = result.logits[:, -1].argmax(-1)
                steps.append(step)
            out.append(torch.stack(steps, 1).cpu())
    return settled(model, prompts, torch.cat(out), batch_size=batch_size)


def predictions(
    model: nn.Module, prompts: torch.Tensor, continuations: torch.Tensor
) -> torch.Tensor:
    """The greedy token ``model`` predicts at each continuation position, given the
    prompt and the continuation before it (teacher forcing): ``[batch, new_tokens]``."""
    device = next(model.parameters()).device
    new_tokens = continuations.shape[1]
    seq = torch.cat([prompts, continuations[:, :-1]], dim=1).to(device)
    # Only the last new_tokens positions predict a continuation token: the vocabulary
    # projection of the prompt positions would be wasted (~20% of SmolLM2's compute).
    logits = model(seq, use_cache=False, logits_to_keep=new_tokens).logits
    return logits.argmax(-1).cpu()


def settled(
    model: nn.Module, prompts: torch.Tensor, continuations: torch.Tensor, *, batch_size: int
) -> torch.Tensor:
    """``continuations`` made a fixed point of :func:`predictions`, so that the dense
    model scores exactly full agreement. Decoding with a KV cache and one forward over
    the whole sequence round differently; where a near-tie flips (common in bfloat16),
    the continuation follows the forward's choice from there on. Each pass fixes at
    least one more position (a causal model's prediction at a position does not depend
    on later tokens); usually one pass finds nothing to fix."""
    fixed = continuations.clone()
    new_tokens = fixed.shape[1]
    with torch.inference_mode():
        for start in range(0, fixed.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            for _ in range(new_tokens):
                pred = predictions(model, prompts[rows], fixed[rows])
                if torch.equal(pred, fixed[rows]):
                    break
                fixed[rows] = pred
    return fixed


def agreed_tokens(pred: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per row, the number of leading positions where ``pred`` equals ``reference``."""
    same = (pred == reference).long()
    return same.cumprod(dim=1).sum(dim=1)


def continuations_path(cache: ReferenceCache, params: DTMParams) -> Path:
    """Where ``cache`` keeps the dense continuations for ``params``: beside the dense
    logits, keyed by the same fingerprints of model and tokens and by the settings
    that fix the prompts and their length (the batch size changes nothing)."""
    settings = f"dtm-v1|{params.prompts}|{params.prompt_len}|{params.new_tokens}"
    key = reference_key(cache.model_fingerprint, cache.tokens_fingerprint, None)
    digest = hashlib.sha256(f"{settings}|{key}".encode()).hexdigest()[:32]
    return cache.root / f"dtm-{digest}.safetensors"


def cached(
    cache: ReferenceCache, params: DTMParams, compute: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """``compute()`` once, then read from :func:`continuations_path`; concurrent
    callers take turns, as for the dense logits."""
    path = continuations_path(cache, params)
    with locked(path.with_suffix(".lock")):
        if path.exists():
            return load_file(str(path))
        tensors = {k: v.contiguous() for k, v in compute().items()}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        return tensors


@EVALUATORS.register("dtm")
class DTMEvaluator(Evaluator[DTMParams]):
    """First divergent token: ``dtm = 1 - mean(agreed) / new_tokens``, where ``agreed``
    is how many greedy tokens the candidate produces after a prompt before it first
    differs from the dense model (0: identical on every prompt, 1: every first token
    differs). Also ``agreed`` (mean tokens) and ``agree_all`` (fraction of prompts
    agreeing on all ``new_tokens``)."""

    name = "dtm"
    metric = "dtm"

    Params = DTMParams

    def __init__(
        self, tokens: torch.Tensor, continuations: torch.Tensor, params: DTMParams
    ) -> None:
        super().__init__(tokens, batch_size=params.batch_size)
        self.prompts = prompt_windows(tokens, params.prompts, params.prompt_len)
        if continuations.shape != (self.prompts.shape[0], params.new_tokens):
            raise ValueError("continuations do not match the prompts")
        self.continuations = continuations
        self.params = params

    @classmethod
    def create(
        cls, model: nn.Module, tokens: torch.Tensor, params: DTMParams, *,
        cache: ReferenceCache | None = None, progress: bool = True,
    ) -> DTMEvaluator:
        """The dense continuations are decoded here, or read from ``cache``."""
        seq_len = tokens.shape[1]
        if params.prompt_len > seq_len:
            raise EvocompError(
                f"evaluator dtm: prompt_len={params.prompt_len} is longer than the search "
                f"sequences (data.seq_len={seq_len}); lower prompt_len or raise data.seq_len"
            )
        longest = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if longest is not None and params.prompt_len + params.new_tokens > longest:
            raise EvocompError(
                f"evaluator dtm: prompt_len + new_tokens = "
                f"{params.prompt_len + params.new_tokens} exceeds the model's "
                f"{longest} positions; lower prompt_len or new_tokens"
            )
        prompts = prompt_windows(tokens, params.prompts, params.prompt_len)

        def compute() -> dict[str, torch.Tensor]:
            cont = greedy_continuations(
                model, prompts, params.new_tokens, batch_size=params.batch_size,
                progress=progress,
            )
            return {"continuations": cont}

        data = compute() if cache is None else cached(cache, params, compute)
        return cls(tokens, data["continuations"], params)

    def prompts_for(self, budget_tokens: int | None) -> int:
        """Prompts scored at ``budget_tokens``: the budget's share of the evaluator's
        tokens, of the prompts (rounded up), so a stage that scores a quarter of the
        search split scores a quarter of the prompts."""
        n = self.prompts.shape[0]
        if budget_tokens is None or budget_tokens >= self.max_tokens:
            return n
        return max(1, min(n, math.ceil(n * budget_tokens / self.max_tokens)))

    def evaluate(
        self, model: nn.Module, budget_tokens: int | None = None, *,
        forward: Forward | None = None, order: Sequence[int] | None = None,
    ) -> dict[str, float]:
        n = self.prompts_for(budget_tokens)
        agreed = []
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                rows = slice(start, min(n, start + self.batch_size))
                pred = predictions(model, self.prompts[rows], self.continuations[rows])
                agreed.append(agreed_tokens(pred, self.continuations[rows]))
        counts = torch.cat(agreed).double()
        new_tokens = self.params.new_tokens
        mean = counts.mean().item()
        return {
            "dtm": 1.0 - mean / new_tokens,
            "agreed": mean,
            "agree_all": (counts == new_tokens).double().mean().item(),
            "tokens": float(n * (self.params.prompt_len + new_tokens - 1)),
        }
