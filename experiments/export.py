"""Checkpoint formats of ``evocomp export``: how the searched model's weights are
written once the genome is applied.

* ``hf``: a plain Hugging Face directory; every weight as the float the model
  sees (quantized weights dequantized).
* ``compressed-tensors``: quantized linears as packed integer codes with their
  own bitwidth, group size, scales and zero points (``pack-quantized``, one
  config group per grid); what transformers and vLLM load.
* ``gguf``: one llama.cpp file; each quantized linear as the llama.cpp tensor
  type its grid maps onto.

Codes are recovered from the applied weight and the grid its variant was stored
with (:meth:`~evocomp.supernet.quantizers.QuantizedWeight.recover`), so what is
written dequantizes to exactly the searched weight.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from evocomp.errors import EvocompError
from evocomp.supernet.compressors import COMPRESSORS, Grid
from evocomp.supernet.database import unit_weight
from evocomp.supernet.quantizers import QuantizedWeight

Format = Literal["hf", "compressed-tensors", "gguf"]
FORMATS: tuple[Format, ...] = ("hf", "compressed-tensors", "gguf")

PACKED_BITS = range(1, 9)
"""Bitwidths compressed-tensors' ``pack-quantized`` packs."""
GGUF_FILE = "model.gguf"
"""The file name of a GGUF export in its directory."""
VLLM_BITS = (4, 8)
"""Bitwidths vLLM's kernels serve for ``pack-quantized`` weights (Marlin / Machete)."""


@dataclass(frozen=True)
class QuantizedLayer:
    """A searched linear whose applied weight lies on a stored integer grid."""

    module: nn.Module
    transposed: bool
    """GPT-2's Conv1D (``[in, out]`` weight), which compressed-tensors does not pack."""
    grid: Grid
    weight: QuantizedWeight


def quantized_layers(exp: Any, genome: Any, model: nn.Module) -> tuple[list[QuantizedLayer],
                                                                      list[str]]:
    """The linears of ``model`` (with ``genome`` applied by ``exp``, an
    :class:`~evocomp.runner.Experiment`) that are quantized, with their codes; and
    the names of those whose weight has left its grid (e.g. fine-tuned since),
    which are written as floats."""
    spec = exp.cfg.compressor
    cls = COMPRESSORS.get(spec.name)
    layers, off_grid = [], []
    db = exp.database
    for unit, key in exp.space.placements(genome):
        grid = cls.grid(spec.params, key)
        if grid is None or db is None or not db.holds(unit.name):
            continue
        weight = unit_weight(model, unit)
        q = QuantizedWeight.recover(
            weight,
            db.get(unit.name, key, part="scale", device=weight.device),
            db.get(unit.name, key, part="zero", device=weight.device),
            grid.bits,
        )
        if q is None:
            off_grid.append(unit.name)
        else:
            layers.append(QuantizedLayer(model.get_submodule(unit.name), unit.transposed, grid, q))
    return layers, off_grid


@dataclass(frozen=True)
class GGUFPlan:
    """Which llama.cpp type each quantized linear is written as."""

    types: dict[nn.Module, str]
    requantized: list[str]
    """Layers on evocomp's integer grids, re-quantized onto llama.cpp's blocks of 32
    (their weights change slightly)."""


def gguf_plan(exp: Any, genome: Any, model: nn.Module, layers: list[QuantizedLayer]) -> GGUFPlan:
    """The GGUF types of ``model``'s quantized linears: a variant on a llama.cpp
    type's grid (the ``gguf`` compressor) keeps that type; an integer grid maps onto
    the nearest llama.cpp type (:func:`~evocomp.gguf_export.gguf_type_for_bits`),
    refused where there is none."""
    from evocomp.gguf_export import gguf_type_for_bits
    from evocomp.spaces.gguf_types import QUANT_TYPES

    spec = exp.cfg.compressor
    cls = COMPRESSORS.get(spec.name)
    types: dict[nn.Module, str] = {}
    for unit, key in exp.space.placements(genome):
        kind = cls.tensor_type(spec.params, key)
        if kind is not None:
            types[model.get_submodule(unit.name)] = kind
    names = {id(m): n for n, m in model.named_modules()}
    requantized, missing = [], Counter[int]()
    for q in layers:
        kind = gguf_type_for_bits(q.grid.bits, q.grid.symmetric)
        if kind is None:
            missing[q.grid.bits] += 1
        else:
            types[q.module] = kind
            requantized.append(names[id(q.module)])
    if missing:
        listed = ", ".join(f"{n} at {b} bits" for b, n in sorted(missing.items()))
        raise EvocompError(
            f"--format gguf: {listed} have no llama.cpp type gguf-py writes (it quantizes "
            f"{', '.join(QUANT_TYPES)}: 4, 5 and 8 bits); search with space.preset: gguf, "
            "or choose --format compressed-tensors or hf"
        )
    return GGUFPlan(types, requantized)


def check_format(fmt: str, layers: list[QuantizedLayer]) -> None:
    """Refuse, before anything is written, a format that cannot hold every layer
    (``fmt`` is one of :data:`FORMATS`: the command checks it before loading)."""
    if fmt == "compressed-tensors":
        if any(q.transposed for q in layers):
            raise EvocompError(
                "--format compressed-tensors packs nn.Linear weights; this model's quantized "
                "layers are GPT-2 Conv1D (choose --format hf)"
            )
        wide = sorted({q.grid.bits for q in layers if q.grid.bits not in PACKED_BITS})
        if wide:
            raise EvocompError(
                f"--format compressed-tensors packs 1..8-bit weights; this model has "
                f"{', '.join(map(str, wide))}-bit layers (choose --format hf)"
            )


def warnings_for(
    fmt: str, layers: list[QuantizedLayer], plan: GGUFPlan | None = None
) -> list[str]:
    """What the user should know about serving the export (one line each)."""
    out = []
    if plan is not None and plan.requantized:
        out.append(
            f"--format gguf re-quantizes {len(plan.requantized)} layers from evocomp's grids "
            "onto llama.cpp's blocks of 32 weights, so their weights change slightly; "
            "search with space.preset: gguf for an exact export"
        )
    if fmt == "compressed-tensors":
        bits = Counter(q.grid.bits for q in layers if q.grid.bits not in VLLM_BITS)
        if bits:
            listed = ", ".join(f"{n} at {b} bits" for b, n in sorted(bits.items()))
            out.append(
                f"vLLM's pack-quantized kernels serve 4 and 8 bits; {listed} will load in "
                "transformers (dequantized) but not run in vLLM"
            )
        if any(not q.grid.symmetric for q in layers):
            out.append(
                "asymmetric grids (compressor symmetric: false) are written with packed "
                "zero points, as vLLM reads them; transformers <= 5.24 with "
                "compressed-tensors 0.20 cannot load those (see docs/export.md)"
            )
    return out


def compressed_state_dict(
    model: nn.Module, layers: list[QuantizedLayer]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``model``'s state dict with each quantized layer's weight replaced by its
    ``pack-quantized`` tensors (packed by compressed-tensors), and the
    ``quantization_config`` that describes them (one config group per grid)."""
    from compressed_tensors.compressors.pack_quantized.base import (
        PackedQuantizationCompressor,
    )
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    names = {id(m): n for n, m in model.named_modules()}
    state = model.state_dict()
    by_grid: dict[tuple[int, int, bool], list[str]] = {}
    schemes: dict[tuple[int, int, bool], QuantizationScheme] = {}
    for layer in layers:
        name, q = names[id(layer.module)], layer.weight
        per_row = q.group_size == q.codes.shape[1]
        key = (q.bits, 0 if per_row else q.group_size, layer.grid.symmetric)
        if key not in schemes:
            schemes[key] = QuantizationScheme(
                targets=[],
                weights=QuantizationArgs(
                    num_bits=q.bits,
                    type="int",
                    symmetric=layer.grid.symmetric,
                    strategy="channel" if per_row else "group",
                    group_size=None if per_row else q.group_size,
                ),
            )
        by_grid.setdefault(key, []).append(name)
        # compressed-tensors' codes are signed: code − 2^(bits−1), zero likewise.
        half = 2 ** (q.bits - 1)
        # The searched weight, which QuantizedWeight.recover found on this grid.
        weight = state.pop(f"{name}.weight")
        tensors = {
            "weight": q.dequantize(torch.float32),  # exact grid values, whatever the dtype
            "weight_scale": q.scale.to(torch.float32),
            "weight_zero_point": (q.zero - half).to(torch.int8),
        }
        packed = PackedQuantizationCompressor.compress(tensors, schemes[key])
        unpacked = PackedQuantizationCompressor.decompress(packed, schemes[key])["weight"]
        if not torch.equal(unpacked.to(weight.dtype), weight):
            raise EvocompError(f"packing {name} did not reproduce its weight; not exported")
        for part, tensor in packed.items():
            state[f"{name}.{part}"] = tensor
    groups = {}
    for i, (key, targets) in enumerate(sorted(by_grid.items())):
        scheme = schemes[key].model_copy(update={"targets": sorted(targets)})
        groups[f"group_{i}"] = scheme
    config = QuantizationConfig(
        config_groups=groups,
        format="pack-quantized",
        quantization_status=QuantizationStatus.COMPRESSED,
    )
    return state, config.model_dump(exclude=["quant_method"])


def write_quantization_config(folder: Path, quantization: dict[str, Any]) -> None:
    """Add compressed-tensors' ``quantization_config`` to ``folder``'s config.json
    (what transformers and vLLM read to load the packed weights)."""
    import json

    import compressed_tensors
    from compressed_tensors.base import (
        COMPRESSION_VERSION_NAME,
        QUANTIZATION_CONFIG_NAME,
        QUANTIZATION_METHOD,
        QUANTIZATION_METHOD_NAME,
        SPARSITY_CONFIG_NAME,
        TRANSFORM_CONFIG_NAME,
    )

    path = folder / "config.json"
    config = json.loads(path.read_text())
    config[QUANTIZATION_CONFIG_NAME] = {
        COMPRESSION_VERSION_NAME: compressed_tensors.__version__,
        QUANTIZATION_METHOD_NAME: QUANTIZATION_METHOD,
        SPARSITY_CONFIG_NAME: {},
        TRANSFORM_CONFIG_NAME: {},
        **quantization,
    }
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def layer_formats(
    fmt: str, layers: list[QuantizedLayer], off_grid: list[str], plan: GGUFPlan | None = None
) -> dict[str, Any]:
    """What evocomp.json says of the layers' storage: how many of each kind."""
    packed = Counter(f"{q.grid.bits}-bit" for q in layers)
    summary: dict[str, Any] = {"format": fmt}
    if plan is not None:
        summary["types"] = dict(sorted(Counter(plan.types.values()).items()))
        summary["requantized"] = plan.requantized
    if fmt == "compressed-tensors":
        summary["packed"] = dict(sorted(packed.items()))
        import compressed_tensors

        summary["sparsity"] = (
            "stored dense with its zeros: compressed-tensors "
            f"{compressed_tensors.__version__} has no sparse compressor"
        )
    if off_grid:
        summary["off_grid"] = off_grid
    return summary


def folder_bytes(folder: Path) -> int:
    """Bytes of the weight files in ``folder`` (safetensors and gguf)."""
    return sum(
        p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".gguf")
    )
