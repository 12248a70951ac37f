"""Unit discovery: the named compressible pieces of a model, found from its module tree
(the :class:`~evocomp.spaces.units.Unit` records themselves are torch-free)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from evocomp.errors import EvocompError
from evocomp.spaces.units import SUBLAYER_KINDS, Unit, UnitQuery, select_units

# Where decoder blocks live in the architectures we know: Llama, Mistral, Qwen2,
# Phi-3, Gemma (model.layers), GPT-2 (transformer.h), OPT (model.decoder.layers).
_BLOCK_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return the dotted path and the ModuleList of the model's decoder blocks."""
    for path in _BLOCK_PATHS:
        module: nn.Module | None = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path, module
    raise EvocompError(
        f"cannot find the decoder blocks of {type(model).__name__}; supported layouts: "
        + ", ".join(_BLOCK_PATHS)
    )


def _weight_shape(module: nn.Module) -> tuple[tuple[int, int], bool] | None:
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features), False
    # transformers' Conv1D (GPT-2) is a linear layer with its weight stored transposed.
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        rows, cols = module.weight.shape
        return (cols, rows), True
    return None


def find_linear_units(
    model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None
) -> list[Unit]:
    """All linear layers inside decoder blocks, filtered by ``targets`` / ``ignore``.

    Embeddings and the LM head are outside the blocks and never units here.
    """
    path, blocks = find_blocks(model)
    found: list[Unit] = []
    for b, block in enumerate(blocks):
        for sub, module in block.named_modules():
            info = _weight_shape(module)
            if info is None:
                continue
            shape, transposed = info
            found.append(Unit(f"{path}.{b}.{sub}", "linear", b, shape, transposed))
    return select_units(found, targets, ignore, what="linear layer")


# Attribute names of the two sublayers inside a decoder block, per kind, tried in
# order: self_attn (Llama, Mistral, Qwen2, Phi-3, Gemma, OPT), attn (GPT-2),
# attention (GPT-NeoX); mlp everywhere except OPT, whose MLP is fc1/fc2 directly
# on the block and so cannot be skipped as one module.
_ATTRS: dict[str, tuple[str, ...]] = {"attn": ("self_attn", "attn", "attention"), "mlp": ("mlp",)}
_SUPPORTED = (
    "Llama, Mistral, Qwen2, Phi-3, Gemma (self_attn + mlp), GPT-2 (attn + mlp), "
    "GPT-NeoX (attention + mlp)"
)


def sublayer_module(block: nn.Module, kind: str) -> tuple[str, nn.Module] | None:
    """The ``(attribute, module)`` of ``block``'s sublayer of ``kind``, or None."""
    for attr in _ATTRS[kind]:
        module = getattr(block, attr, None)
        if isinstance(module, nn.Module):
            return attr, module
    return None


def find_sublayer_units(
    model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None
) -> list[Unit]:
    """The attention and MLP sublayer of every decoder block, in execution order
    (``attn`` of block 0, ``mlp`` of block 0, ``attn`` of block 1, ...).

    ``Unit.name`` is the sublayer's dotted path (``model.layers.3.self_attn``),
    ``Unit.kind`` is ``"attn"`` or ``"mlp"``, and ``Unit.shape`` is
    ``(parameters of the sublayer, 1)`` so that ``Unit.numel`` is its parameter
    count (biases included). ``targets`` / ``ignore`` filter by name exactly as for
    linear units (``self_attn``, ``re:model\\.layers\\.0\\..*``).
    """
    path, blocks = find_blocks(model)
    units: list[Unit] = []
    for b, block in enumerate(blocks):
        for kind in SUBLAYER_KINDS:
            found = sublayer_module(block, kind)
            if found is None:
                raise EvocompError(
                    f"block {path}.{b} ({type(block).__name__}) has no {kind} sublayer module "
                    f"(looked for {', '.join(_ATTRS[kind])}); depth search supports {_SUPPORTED}"
                )
            attr, module = found
            params = sum(p.numel() for p in module.parameters())
            width = _width(module, kind)
            units.append(Unit(f"{path}.{b}.{attr}", kind, b, (params, 1), False, *width))
    return select_units(units, targets, ignore, what="sublayer")


def _width(module: nn.Module, kind: str) -> tuple[int, int, int]:
    """``(groups, group_numel, kv_groups)`` of a Llama-style sublayer (q/k/v/o_proj
    attention, gate/up/down_proj MLP) or a GPT-2 MLP (c_fc/c_proj; see
    :mod:`evocomp.supernet.shrink`), else zeros."""
    linears = {n: m for n, m in module.named_children() if isinstance(m, nn.Linear)}
    if kind == "attn" and {"q_proj", "k_proj", "o_proj"} <= linears.keys():
        head_dim = getattr(module, "head_dim", None)
        if isinstance(head_dim, int) and head_dim > 0:
            q, k = linears["q_proj"], linears["k_proj"]
            heads, kv = q.out_features // head_dim, k.out_features // head_dim
            per_head = head_dim * (q.in_features + linears["o_proj"].out_features)
            per_head += head_dim * (q.bias is not None)
            return heads, per_head, kv
    if kind == "mlp" and {"gate_proj", "up_proj", "down_proj"} <= linears.keys():
        gate, up = linears["gate_proj"], linears["up_proj"]
        per_neuron = gate.in_features + up.in_features + linears["down_proj"].out_features
        per_neuron += (gate.bias is not None) + (up.bias is not None)
        return gate.out_features, per_neuron, 0
    children = dict(module.named_children())
    fc, proj = children.get("c_fc"), children.get("c_proj")
    if kind == "mlp" and fc is not None and proj is not None:
        fc_shape, proj_shape = _weight_shape(fc), _weight_shape(proj)
        if fc_shape and proj_shape and fc_shape[1] and proj_shape[1]:  # GPT-2's Conv1D
            (neurons, hidden), _ = fc_shape
            per_neuron = hidden + (fc.bias is not None) + proj_shape[0][0]
            return neurons, per_neuron, 0
    return 0, 0, 0


def find_units(
    model: nn.Module,
    queries: Sequence[UnitQuery],
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
) -> list[Unit]:
    """The units a space asks for (:meth:`~evocomp.spaces.base.SearchSpace.unit_queries`),
    query by query; ``targets`` / ``ignore`` filter the queries marked ``filtered``."""
    found: list[Unit] = []
    for query in queries:
        find = find_linear_units if query.family == "linear" else find_sublayer_units
        found += find(model, targets, ignore) if query.filtered else find(model)
    return found


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The module at a dotted path (``model.layers.3.mlp.down_proj``)."""
    return model.get_submodule(name)
