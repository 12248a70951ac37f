"""Composite compressors: prune a layer, then quantize what is left, so that one
database holds every (sparsity, bitwidth) pair of a joint search.

``prune-quantize`` combines any registered pruner (kind ``"sparsity"``) with any
registered quantizer (kind ``"bits"``); its levels are ``(zeros, bits)`` pairs
and its database keys tuples (``unit@1024x3``).
"""

from __future__ import annotations

import difflib
import operator
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from pydantic import Field, PrivateAttr, ValidationError, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from evocomp.errors import EvocompError, choices
from evocomp.spaces.units import VariantKey
from evocomp.supernet.compressors import (
    COMPRESSORS,
    CholeskyFactor,
    Grid,
    HessianCompressor,
    LayerCompressor,
    LayerCompressorParams,
    Pruner,
    SparseGPT,
)
from evocomp.supernet.quantizers import (
    GPTQ,
    GRID_PARTS,
    GPTQFactor,
    QuantizedWeight,
    Quantizer,
    _check_bits,
)

__all__ = ["PruneQuantize"]


def _spec_error(loc: tuple[str | int, ...], message: str, value: object) -> ValidationError:
    # Raised inside a field validator, its locations are prefixed with the field's
    # name, so config errors read "prune.name: ...".
    error = InitErrorDetails(type=PydanticCustomError("component", message), loc=loc, input=value)
    return ValidationError.from_exception_data("PruneQuantizeParams", [error])


def _resolve(
    spec: dict[str, Any], kind: str, what: str, default: str
) -> tuple[str, LayerCompressorParams]:
    """Validate ``{name, **options}`` naming a compressor of ``kind`` (``default`` if unnamed)."""
    allowed = [n for n in COMPRESSORS.names() if COMPRESSORS.get(n).kind == kind]
    name = spec.get("name", default)
    if name not in allowed:
        message = f"unknown {what} {name!r}; allowed: {choices(allowed)}"
        raise _spec_error(("name",), message, spec)
    params_cls = COMPRESSORS.get(name).Params
    try:
        params = params_cls(**{k: v for k, v in spec.items() if k != "name"})
    except ValidationError as err:
        errors: list[InitErrorDetails] = []
        for e in err.errors():
            if e["type"] == "extra_forbidden":
                fields = list(params_cls.model_fields)
                close = difflib.get_close_matches(str(e["loc"][-1]), fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                message = f"unknown option of {what} {name!r}{hint}; allowed: {choices(fields)}"
                errors.append(
                    InitErrorDetails(
                        type=PydanticCustomError("extra_forbidden", message),
                        loc=e["loc"],
                        input=e["input"],
                    )
                )
            else:
                errors.append(
                    InitErrorDetails(
                        type=e["type"], loc=e["loc"], input=e["input"], ctx=e.get("ctx", {})
                    )
                )
        raise ValidationError.from_exception_data("PruneQuantizeParams", errors) from None
    return name, params


class PrunedWeight(NamedTuple):
    """A pruning PruneQuantize caches, to quantize at every bitwidth."""

    weight: torch.Tensor
    """Float32 ``[out, in]``, the pruned entries exactly 0."""
    keep: torch.Tensor
    """Bool ``[out, in]``: the entries not pruned."""


class PruneQuantizeParams(LayerCompressorParams):
    """Options of :class:`PruneQuantize`."""

    prune: dict[str, Any] = Field(
        default_factory=dict,
        validate_default=True,
        description="the pruner: {name: magnitude | wanda | sparsegpt (default), options...}",
    )
    quantize: dict[str, Any] = Field(
        default_factory=dict,
        validate_default=True,
        description="the quantizer: {name: rtn | gptq (default), options...}",
    )
    _prune: LayerCompressorParams = PrivateAttr()
    _quantize: LayerCompressorParams = PrivateAttr()

    @field_validator("prune")
    @classmethod
    def _check_prune(cls, spec: dict[str, Any]) -> dict[str, Any]:
        name, params = _resolve(spec, Pruner.kind, "pruner", "sparsegpt")
        # Every option written out, so the database key does not depend on
        # which defaults the config spelled.
        return {"name": name, **params.model_dump(mode="json")}

    @field_validator("quantize")
    @classmethod
    def _check_quantize(cls, spec: dict[str, Any]) -> dict[str, Any]:
        name, params = _resolve(spec, Quantizer.kind, "quantizer", "gptq")
        return {"name": name, **params.model_dump(mode="json")}

    def model_post_init(self, context: Any, /) -> None:
        # The specs are already valid and complete, so this cannot fail.
        self._prune = _resolve(self.prune, Pruner.kind, "pruner", "sparsegpt")[1]
        self._quantize = _resolve(self.quantize, Quantizer.kind, "quantizer", "gptq")[1]

    @property
    def prune_params(self) -> LayerCompressorParams:
        """The validated options of the pruner named by ``prune``."""
        return self._prune

    @property
    def quantize_params(self) -> LayerCompressorParams:
        """The validated options of the quantizer named by ``quantize``."""
        return self._quantize


@COMPRESSORS.register("prune-quantize")
class PruneQuantize(LayerCompressor):
    """Prune to an exact zero count, then quantize the pruned weight; level ``(zeros, bits)``.

    The pruner (``Params.prune``) runs first, as on its own; its pruned weight is
    then quantized by the quantizer (``Params.quantize``) with the pruned entries
    held at exactly 0 (``Quantizer.quantize_weight`` with a keep mask), so GPTQ
    compensates the rounding error with the kept weights only. The result has at
    least ``zeros`` zeros: a kept weight may also round to the grid's 0, which
    happens more often at low bitwidths. ``zeros == 0`` is the quantizer alone,
    bit for bit.

    Calibration inputs are fed once; SparseGPT and GPTQ share one Hessian (both
    accumulate ``2/n Σ xᵀx``) and, without ``act_order`` and with equal
    dampening, one factorisation. The pruned weights of the last few zero counts
    are cached, since a database asks for every bitwidth of each zero count.
    """

    kind = "sparsity+bits"
    parts = GRID_PARTS
    needs_calibration = True  # the default pair's; each instance answers for its own parts
    cached_prunings: ClassVar[int] = 2

    Params = PruneQuantizeParams

    params: PruneQuantizeParams

    def __init__(self, weight: torch.Tensor, params: PruneQuantizeParams | None = None) -> None:
        super().__init__(weight, params)
        pruner = COMPRESSORS.get(self.params.prune["name"])(weight, self.params.prune_params)
        quantizer = COMPRESSORS.get(self.params.quantize["name"])(
            weight, self.params.quantize_params
        )
        assert isinstance(pruner, Pruner) and isinstance(quantizer, Quantizer)
        self.pruner, self.quantizer = pruner, quantizer
        self.needs_calibration = pruner.needs_calibration or quantizer.needs_calibration  # type: ignore[misc]
        self._shared_hessian = False
        if isinstance(pruner, HessianCompressor) and isinstance(quantizer, HessianCompressor):
            # One tensor, accumulated by the pruner only (see _accumulate).
            quantizer._hessian = pruner._hessian
            self._shared_hessian = True
        self._shared_factor = (
            isinstance(pruner, SparseGPT)
            and isinstance(quantizer, GPTQ)
            and not quantizer.params.act_order
            and pruner.params.dampening == quantizer.params.dampening
        )
        # zeros -> its pruning, most recent last
        self._pruned: OrderedDict[int, PrunedWeight] = OrderedDict()

    def _accumulate(self, x: torch.Tensor) -> None:
        self.pruner.add_batch(x)
        if self._shared_hessian:
            # The pruner's update already landed in the shared Hessian; the quantizer
            # only has to count the tokens and forget its factorisation.
            assert isinstance(self.quantizer, HessianCompressor)
            self.quantizer.nsamples = self.pruner.nsamples
            self.quantizer._factor = None
        else:
            self.quantizer.add_batch(x)
        self._pruned.clear()

    @classmethod
    def needs_gradients(cls, params: PruneQuantizeParams) -> bool:
        """Whether its pruner reads gradient norms (a ``metric`` reading ``G``)."""
        return COMPRESSORS.get(params.prune["name"]).needs_gradients(params.prune_params)

    def add_gradient(self, gradient: torch.Tensor) -> None:
        self.pruner.add_gradient(gradient)
        self._pruned.clear()

    @classmethod
    def check_variants(
        cls, params: PruneQuantizeParams, needs: Sequence[tuple[int, Sequence[VariantKey]]]
    ) -> None:
        """The pruner's check, on the zero count of each ``(zeros, bits)`` key."""
        pruner = COMPRESSORS.get(params.prune["name"])
        zeros = [(n, [k[0] if isinstance(k, tuple) else k for k in keys]) for n, keys in needs]
        pruner.check_variants(params.prune_params, zeros)

    def compress(self, level: tuple[int, int]) -> torch.Tensor:  # type: ignore[override]
        """Return a new weight pruned to ``zeros`` and quantized to ``bits`` (original dtype)."""
        return self.quantize(level).dequantize(self.dtype)

    def compress_parts(  # type: ignore[override]
        self, level: tuple[int, int]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The dequantized weight and its grid (parts ``scale`` and ``zero``)."""
        return self.quantize(level).stored(self.dtype)

    @classmethod
    def grid(cls, params: PruneQuantizeParams, level: tuple[int, int]) -> Grid:
        """The quantizer's grid at the level's bitwidth."""
        quantizer = COMPRESSORS.get(params.quantize["name"])
        return quantizer.grid(params.quantize_params, level[1])

    def quantize(self, level: tuple[int, int]) -> QuantizedWeight:
        """Prune to ``zeros`` exact zeros, then quantize to ``bits``; ``level = (zeros, bits)``.

        Pruned entries hold their group's code of 0, so they dequantize to exactly 0.
        """
        zeros, bits = self._check_level(level)
        self._require_calibration()
        self._share_factor()
        if zeros == 0:
            return self.quantizer.quantize(bits)
        pruned = self._prune(zeros)
        self._share_factor()
        return self.quantizer.quantize_weight(pruned.weight, bits, pruned.keep)

    def _check_level(self, level: object) -> tuple[int, int]:
        try:
            zeros, bits = level  # type: ignore[misc]
            zeros = operator.index(zeros)
        except (TypeError, ValueError):
            raise EvocompError(
                f"prune-quantize levels are (zeros, bits) pairs of integers, got {level!r}"
            ) from None
        return self.pruner._check_level(zeros), _check_bits(bits)

    def _prune(self, zeros: int) -> PrunedWeight:
        hit = self._pruned.get(zeros)
        if hit is not None:
            self._pruned.move_to_end(zeros)
            return hit
        weight, pruned = self.pruner._prune(zeros)
        # A new tensor: ranked pruners hand back their own weight.
        entry = PrunedWeight(weight.masked_fill(pruned, 0.0), ~pruned)
        self._pruned[zeros] = entry
        while len(self._pruned) > self.cached_prunings:
            self._pruned.popitem(last=False)
        return entry

    def _share_factor(self) -> None:
        # SparseGPT and GPTQ in column order factorise the same dampened H⁻¹ with
        # the same function, so the one computed first serves both, unchanged.
        if not self._shared_factor:
            return
        pruner, quantizer = self.pruner, self.quantizer
        assert isinstance(pruner, SparseGPT) and isinstance(quantizer, GPTQ)
        if pruner._factor is None and quantizer._factor is not None:
            # inverse_hessian_cholesky's dead inputs: an all-zero diagonal entry.
            pruner._factor = CholeskyFactor(quantizer._factor.hinv, pruner.hessian.diagonal() == 0)
        elif quantizer._factor is None and pruner._factor is not None:
            quantizer._factor = GPTQFactor(perm=None, hinv=pruner._factor.hinv)
