"""evocomp.evaluators: HOW GOOD a candidate is (and on which tokens)."""

from evocomp.evaluators.base import EVALUATORS, Evaluator, forward_logits
from evocomp.evaluators.metrics import KLEvaluator, PerplexityEvaluator, kl_divergence
from evocomp.evaluators.reference import DenseReference, compute_reference

__all__ = [
    "EVALUATORS",
    "DenseReference",
    "Evaluator",
    "KLEvaluator",
    "PerplexityEvaluator",
    "compute_reference",
    "forward_logits",
    "kl_divergence",
]
