"""Units: the named compressible pieces of a model, found from its module tree."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from evocomp.errors import EvocompError

# Where decoder blocks live in the architectures we know: Llama, Mistral, Qwen2,
# Phi-3, Gemma (model.layers), GPT-2 (transformer.h), OPT (model.decoder.layers).
_BLOCK_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers")


@dataclass(frozen=True)
class Unit:
    """A compressible piece of the model.

    ``kind`` is ``"linear"`` for a weight matrix (the unit of sparsity and
    bitwidth search); sublayer kinds (``"attn"``, ``"mlp"``) are for depth search.
    ``shape`` is always ``(out_features, in_features)``; ``transposed`` marks
    modules that store the weight as ``(in, out)`` (GPT-2's Conv1D).
    """

    name: str
    kind: str
    block: int
    shape: tuple[int, int]
    transposed: bool = False

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


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


def matches(name: str, pattern: str) -> bool:
    """``re:<regex>`` is matched against the whole name; a plain pattern matches the
    name itself or any dotted suffix of it (``down_proj``, ``mlp.down_proj``)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


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


def select_units(
    units: list[Unit], targets: list[str] | None, ignore: list[str] | None, *, what: str
) -> list[Unit]:
    """The units matching any of ``targets`` (all when empty) and none of ``ignore``;
    selecting nothing is an error that shows what names look like."""
    selected = [
        u
        for u in units
        if (not targets or any(matches(u.name, p) for p in targets))
        and not any(matches(u.name, p) for p in ignore or [])
    ]
    if not selected:
        examples = ", ".join(u.name for u in units[:4])
        raise EvocompError(
            f"units.targets={targets} / units.ignore={ignore} select no {what}; "
            f"names look like: {examples}"
        )
    return selected


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The module at a dotted path (``model.layers.3.mlp.down_proj``)."""
    return model.get_submodule(name)
