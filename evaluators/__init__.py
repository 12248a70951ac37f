"""evocomp.evaluators: HOW GOOD a candidate is (and on which tokens)."""

from evocomp.evaluators.base import EVALUATORS, Evaluator, RowSums, RowwiseEvaluator, forward_logits
from evocomp.evaluators.combined import CombinedEvaluator
from evocomp.evaluators.downstream import DownstreamParams, LMEvalEvaluator, downstream_scores
from evocomp.evaluators.dtm import DTMEvaluator
from evocomp.evaluators.metrics import KLEvaluator, PerplexityEvaluator, kl_divergence
from evocomp.evaluators.reference import DenseReference, compute_reference

__all__ = [
    "EVALUATORS",
    "CombinedEvaluator",
    "DTMEvaluator",
    "DenseReference",
    "DownstreamParams",
    "Evaluator",
    "KLEvaluator",
    "LMEvalEvaluator",
    "PerplexityEvaluator",
    "RowSums",
    "RowwiseEvaluator",
    "compute_reference",
    "downstream_scores",
    "forward_logits",
    "kl_divergence",
]
