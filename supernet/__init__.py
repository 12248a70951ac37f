"""evocomp.supernet: the model, its units and their precomputed variants."""

from evocomp.supernet.composite import PruneQuantize
from evocomp.supernet.compressors import COMPRESSORS, LayerCompressor, Pruner
from evocomp.supernet.gguf import GGUFQuantizer
from evocomp.supernet.metric import Metric, OneShotPruner
from evocomp.supernet.quantizers import GPTQ, RTN, Quantizer
from evocomp.supernet.structured import StructuredOBS
from evocomp.supernet.sublayers import skip, span_importance, sublayer_importance, zeroed
from evocomp.supernet.units import find_blocks, find_linear_units, find_sublayer_units, find_units

__all__ = [
    "COMPRESSORS",
    "GGUFQuantizer",
    "GPTQ",
    "RTN",
    "LayerCompressor",
    "Metric",
    "OneShotPruner",
    "PruneQuantize",
    "Pruner",
    "Quantizer",
    "StructuredOBS",
    "find_blocks",
    "find_linear_units",
    "find_sublayer_units",
    "find_units",
    "skip",
    "span_importance",
    "sublayer_importance",
    "zeroed",
]
