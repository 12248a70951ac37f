"""evocomp.spaces: WHAT can be searched — genomes, levels, costs and budgets."""

from evocomp.spaces.base import SPACES, Genome, LevelSpace, SearchSpace
from evocomp.spaces.bits import BitsSpace
from evocomp.spaces.depth import DepthSpace
from evocomp.spaces.joint import JointSpace
from evocomp.spaces.metric import MetricSpace
from evocomp.spaces.sparsity import SparsitySpace
from evocomp.spaces.width import WidthSpace
from evocomp.spaces.window import Window

__all__ = [
    "SPACES",
    "BitsSpace",
    "DepthSpace",
    "Genome",
    "JointSpace",
    "LevelSpace",
    "MetricSpace",
    "SearchSpace",
    "SparsitySpace",
    "WidthSpace",
    "Window",
]
