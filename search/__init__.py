"""evocomp.search: WHICH candidate to try next, and the record of every try."""

from evocomp.search.allocation import OWL, Sensitivity
from evocomp.search.base import OPTIMIZERS, GeneratorOptimizer, Optimizer, Request
from evocomp.search.baselines import SLEB, DropLast, Probing, ShortGPT
from evocomp.search.bayesian import OptunaSearch
from evocomp.search.chain import Chain
from evocomp.search.coarse_to_fine import CoarseToFine
from evocomp.search.evopress import EvoPress, Stage
from evocomp.search.genetic import NSGA2, GeneticAlgorithm
from evocomp.search.metric_gp import MetricGP
from evocomp.search.random_search import RandomSearch
from evocomp.search.store import Record, TrialStore

__all__ = [
    "NSGA2",
    "OPTIMIZERS",
    "OWL",
    "SLEB",
    "Chain",
    "CoarseToFine",
    "DropLast",
    "EvoPress",
    "GeneratorOptimizer",
    "GeneticAlgorithm",
    "MetricGP",
    "Optimizer",
    "OptunaSearch",
    "Probing",
    "RandomSearch",
    "Record",
    "Request",
    "Sensitivity",
    "ShortGPT",
    "Stage",
    "TrialStore",
]
