"""evocomp.supernet: the model, its units and their precomputed variants."""

from evocomp.supernet.compressors import COMPRESSORS, LayerCompressor, Pruner
from evocomp.supernet.units import Unit, find_blocks, find_linear_units

__all__ = ["COMPRESSORS", "LayerCompressor", "Pruner", "Unit", "find_blocks", "find_linear_units"]
