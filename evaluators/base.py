"""The evaluator contract: how good a candidate is, at a token budget."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch
from pydantic import Field
from torch import nn

from evocomp.registry import Registry, StrictModel

if TYPE_CHECKING:
    from evocomp.evaluators.reference import ReferenceCache


class EvaluatorParams(StrictModel):
    """Options of :class:`Evaluator`."""

    batch_size: int = Field(4, ge=1, description="sequences per forward pass")


P = TypeVar("P", bound=EvaluatorParams)


class Evaluator(ABC, Generic[P]):
    """Scores the model as it is now (a genome already applied) on a fixed token set.

    ``evaluate(model, budget_tokens)`` uses the first ``ceil(budget / seq_len)``
    sequences, so every evaluator is multi-fidelity and results at one budget are
    comparable across candidates. Evaluators that :meth:`resamples` take an
    ``order`` of their rows instead (one draw of a resampling search) and use its
    first sequences. Lower ``metric`` is better.

    When each hook is called: :meth:`create` once per process that evaluates (the
    runner, each Ray worker), with the dense model; :meth:`evaluate` for every
    candidate, with the candidate applied to that same model in place.
    """

    name: ClassVar[str]
    metric: ClassVar[str]
    takes_forward: ClassVar[bool] = False
    """Whether :meth:`evaluate` computes its logits through the ``forward`` it is given
    (so the runner can hand it a faster equivalent, e.g. prefix reuse), rather than by
    its own calls of the model."""

    needs_baseline: ClassVar[bool] = False
    """Whether scores are relative to the search's baseline genome (the space's
    ``uniform()``): the runner then applies it once per search, records what
    :meth:`measure_baseline` returns (in the trial store) and hands that to
    :meth:`set_baseline` in every process that evaluates, before any
    :meth:`evaluate`, so a resume and every worker score alike."""

    Params: ClassVar[type[EvaluatorParams]] = EvaluatorParams

    @classmethod
    def resamples(cls, params: Any) -> bool:
        """Whether, with options ``params``, :meth:`evaluate` scores the token rows an
        ``order`` names, first ones first (a fresh draw of the search sequences per
        generation, ``search.resample``). Those that do not always score their first
        sequences (or their own prompts), and a resampling search refuses them."""
        return False

    @classmethod
    def create(
        cls, model: nn.Module, tokens: torch.Tensor, params: Any, *,
        cache: ReferenceCache | None = None, progress: bool = True,
    ) -> Evaluator[Any]:
        """Build the evaluator for ``tokens`` from its options (a ``cls.Params``);
        evaluators that compare against the dense model compute its outputs here,
        or load them from ``cache``."""
        return cls(tokens, batch_size=params.batch_size)

    def __init__(self, tokens: torch.Tensor, *, batch_size: int = 4) -> None:
        if tokens.ndim != 2 or tokens.shape[0] == 0:
            raise ValueError("tokens must be a non-empty [sequences, seq_len] tensor")
        self.tokens = tokens
        self.batch_size = batch_size

    @property
    def max_tokens(self) -> int:
        return self.tokens.numel()

    def sequences_for(self, budget_tokens: int | None) -> int:
        n, seq_len = self.tokens.shape
        if budget_tokens is None:
            return n
        return max(1, min(n, math.ceil(budget_tokens / seq_len)))

    def rows_for(self, budget_tokens: int | None, order: Sequence[int] | None = None) -> list[int]:
        """The token rows a budget scores: the first :meth:`sequences_for` of
        ``order`` (default: in their stored order)."""
        n = self.sequences_for(budget_tokens)
        if order is None:
            return list(range(n))
        if sorted(order) != list(range(self.tokens.shape[0])):
            raise ValueError(f"order must be a permutation of the {self.tokens.shape[0]} rows")
        return list(order[:n])

    def batches(self, rows: Sequence[int]) -> Iterator[tuple[torch.Tensor, list[int]]]:
        """``rows`` in forwards of ``batch_size`` sequences: (tokens, their row numbers)."""
        for start in range(0, len(rows), self.batch_size):
            chunk = list(rows[start : start + self.batch_size])
            yield self.tokens[chunk], chunk

    def measure_baseline(self, model: nn.Module) -> dict[str, float]:
        """What :meth:`set_baseline` needs, measured on ``model`` with the baseline
        genome applied (evaluators that :attr:`needs_baseline`)."""
        raise NotImplementedError(f"evaluator {self.name!r} needs no baseline")

    def set_baseline(self, values: dict[str, float]) -> None:
        """Take what :meth:`measure_baseline` measured (here or in another process)."""
        raise NotImplementedError(f"evaluator {self.name!r} needs no baseline")

    @abstractmethod
    def evaluate(
        self, model: nn.Module, budget_tokens: int | None = None, *,
        forward: Forward | None = None, order: Sequence[int] | None = None,
    ) -> dict[str, float]:
        """Metrics of ``model`` on the first sequences covering ``budget_tokens``
        (of ``order``, a permutation of the rows, for evaluators that
        :meth:`resamples`; the others are never given one). Evaluators that
        :attr:`takes_forward` get their logits from ``forward(batch, rows)`` when
        given (default: :func:`forward_logits` of ``model``); the others ignore it."""


RowSums = dict[str, float]
"""What one token row adds to a :class:`RowwiseEvaluator`'s metrics (e.g. its summed
KL, summed NLL and token count): sums, so rows scored apart combine exactly."""


class RowwiseEvaluator(Evaluator[P]):
    """An evaluator whose metrics over rows follow from sums per row.

    :meth:`evaluate` is :meth:`combine` of :meth:`row_sums`, so a caller that kept a
    candidate's sums of some rows needs only the others: the runner scores each
    (candidate, row) once per process, and a candidate that a search's second stage
    scores on 4 rows after its first stage scored it on the first one runs 3.
    ``combine`` adds the sums in row order, so the metrics are the same whichever
    evaluation computed each row.
    """

    @abstractmethod
    def row_sums(
        self, model: nn.Module, rows: Sequence[int], *, forward: Forward | None = None
    ) -> list[RowSums]:
        """The sums of each of ``rows``, in their order (logits through ``forward``
        when given, as :meth:`Evaluator.evaluate` takes them)."""

    @abstractmethod
    def combine(self, sums: Sequence[RowSums]) -> dict[str, float]:
        """The metrics of the rows whose :meth:`row_sums` are ``sums``, in row order."""

    def evaluate(
        self, model: nn.Module, budget_tokens: int | None = None, *,
        forward: Forward | None = None, order: Sequence[int] | None = None,
    ) -> dict[str, float]:
        rows = self.rows_for(budget_tokens, order)
        return self.combine(self.row_sums(model, rows, forward=forward))


Forward = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]
"""``forward(batch, rows)``: float32 logits ``[batch, seq, vocab]`` of the token rows
``batch``, which are rows ``rows`` of the evaluator's tokens."""


def forward_logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``[batch, seq, vocab]`` of a causal LM, without a KV cache."""
    device = next(model.parameters()).device
    return model(batch.to(device), use_cache=False).logits.float()


EVALUATORS: Registry[type[Evaluator[Any]]] = Registry("evaluator", Evaluator)
