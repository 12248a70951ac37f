"""Pruning with a metric expression: what each symbol of
:mod:`evocomp.spaces.metric` computes on tensors, the ``metric`` compressor
(any expression as a variant-database pruner), and :class:`OneShotPruner`, which
applies metric genomes by pruning the model one-shot, block by block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from evocomp.errors import EvocompError
from evocomp.spaces.metric import Expr, MetricSpace, parse, pattern_nm, ranking_form
from evocomp.spaces.units import Unit
from evocomp.supernet.compressors import (
    COMPRESSORS,
    InputNormPruner,
    PrunerParams,
)
from evocomp.supernet.database import (
    MakeCompressor,
    _attach,
    _forward_block,
    capture_block_inputs,
    compressor_factory,
    unit_weight,
)
from evocomp.supernet.sublayers import first_output
from evocomp.supernet.units import find_blocks

__all__ = ["InvalidMetric", "Metric", "MetricCompressorParams", "OneShotPruner", "metric_scores"]

_LOG_EPS = 1e-3
_EXP_CLAMP = 50.0
_NORM_EPS = 1e-12


class InvalidMetric(EvocompError):
    """A metric whose scores cannot rank weights (NaN, infinite, or all equal)."""


def _unary(op: str, x: torch.Tensor) -> torch.Tensor:
    if op == "abs":
        return x.abs()
    if op == "neg":
        return -x
    if op == "sqr":
        return x * x
    if op == "sqrt":
        return x.abs().sqrt()
    if op == "log":
        return (x.abs() + _LOG_EPS).log()
    if op == "exp":
        return x.clamp(max=_EXP_CLAMP).exp()
    if op == "tanh":
        return x.tanh()
    if op == "mms":
        lo, hi = x.min(), x.max()
        return (x - lo) / (hi - lo)  # a constant tensor gives NaN: an invalid metric
    if op == "zsn":
        return (x - x.mean()) / x.std()
    if op == "id":
        return x
    raise AssertionError(op)


def _binary(op: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if op == "add":
        return x + y
    if op == "sub":
        return x - y
    if op == "mul":
        return x * y
    if op == "div":
        return x / (torch.linalg.vector_norm(y) + _NORM_EPS)
    raise AssertionError(op)


def metric_scores(
    expr: Expr,
    weight: torch.Tensor,
    gradient: torch.Tensor | None = None,
    activation: torch.Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The score of every weight under ``expr``, ``[out, in]`` in ``dtype``: ``W`` is
    ``|weight|``, ``G`` the gradient norms (``[out, in]``), ``X`` the per-input RMS
    activations (``[in]``, broadcast over rows, so tensor-wide operations see the
    full ``[out, in]`` tensor). A terminal the expression reads must be given."""
    w = weight.abs().to(dtype)
    terminals: dict[str, torch.Tensor | None] = {
        "W": w,
        "G": None if gradient is None else gradient.to(dtype),
        "X": None if activation is None else activation.to(dtype)[None, :].expand_as(w),
    }

    def value(e: Expr) -> torch.Tensor:
        if not e.args:
            t = terminals[e.op]
            if t is None:
                raise EvocompError(f"metric {expr} reads {e.op}, which was not given")
            return t
        if len(e.args) == 1:
            return _unary(e.op, value(e.args[0]))
        return _binary(e.op, value(e.args[0]), value(e.args[1]))

    return value(expr).expand_as(w)


class MetricCompressorParams(PrunerParams):
    """Options of :class:`Metric`."""

    expression: str = Field(
        "wanda",
        description="the metric: an expression over W, G, X (e.g. 'mul(W, X)') or a "
        "preset: magnitude, wanda, pruner-zero",
    )

    @field_validator("expression")
    @classmethod
    def _canonical(cls, text: str) -> str:
        # Metrics that rank alike build the same variants, so they share one database.
        return str(ranking_form(parse(text)))


@COMPRESSORS.register("metric")
class Metric(InputNormPruner):
    """Prune the lowest scores of a metric expression (Pruner-Zero), compared per
    output row as Wanda does (per N:M group with ``nm_group``). ``X`` is the RMS of
    each input channel over the calibration tokens (so Wanda is ``mul(W, X)``
    exactly); ``G`` comes from :meth:`add_gradient` (see
    :mod:`evocomp.supernet.gradients`). Scores that are NaN, infinite or all equal
    raise :class:`InvalidMetric`."""

    Params = MetricCompressorParams

    params: MetricCompressorParams

    def __init__(self, weight: torch.Tensor, params: MetricCompressorParams | None = None) -> None:
        super().__init__(weight, params)
        self.expr = parse(self.params.expression)
        # Only X is measured on calibration inputs; W and G metrics need none.
        self.needs_calibration = "X" in self.expr.terminals  # type: ignore[misc]
        self._gradient: torch.Tensor | None = None

    @classmethod
    def needs_gradients(cls, params: MetricCompressorParams) -> bool:
        return "G" in parse(params.expression).terminals

    def add_gradient(self, gradient: torch.Tensor) -> None:
        if gradient.shape != self.weight.shape:
            raise ValueError(
                f"gradient has shape {tuple(gradient.shape)}, the weight {tuple(self.weight.shape)}"
            )
        self._gradient = gradient.to(device=self.device, dtype=torch.float32)
        self._ranks = None

    @property
    def statistics(self) -> tuple[torch.Tensor, int]:
        """The activation statistics gathered so far: mean ``x²`` per input and the
        tokens seen (for :meth:`load_statistics` of another metric's compressor)."""
        return self._mean_sq.clone(), self.nsamples

    def load_statistics(self, mean_sq: torch.Tensor, nsamples: int) -> None:
        """Take another compressor's :attr:`statistics` instead of calibration inputs."""
        self._mean_sq = mean_sq.to(device=self.device, dtype=torch.float32).clone()
        self.nsamples = nsamples
        self._ranks = None

    def _require_calibration(self) -> None:
        super()._require_calibration()
        if "G" in self.expr.terminals and self._gradient is None:
            raise EvocompError(f"metric {self.expr} reads G: call add_gradient() first")

    def _scores(self) -> torch.Tensor:
        scores = metric_scores(self.expr, self.weight, self._gradient, self.input_rms)
        if not torch.isfinite(scores).all():
            raise InvalidMetric(f"metric {self.expr} gives non-finite scores")
        if scores.numel() > 1 and bool((scores == scores.reshape(-1)[0]).all()):
            raise InvalidMetric(f"metric {self.expr} gives every weight the same score")
        return scores


class OneShotPruner:
    """Applies metric genomes (:class:`~evocomp.spaces.metric.MetricSpace`): every
    searched layer is pruned one-shot with the genome's metric, block by block, the
    calibration inputs propagated through the blocks already pruned (as Wanda and
    Pruner-Zero do), and the dense weights are restored on exit, bit for bit.

    A metric's masks are kept bit-packed (one bit per weight) in a bounded LRU, so
    scoring it again on more tokens costs no pruning. ``gradients`` is called (once)
    only when a metric reads ``G``; metrics without ``X`` need no forward pass.
    Plays the Swapper's part for the runner: :meth:`apply`, :meth:`removed`,
    :meth:`narrowed`.
    """

    def __init__(
        self,
        model: nn.Module,
        space: MetricSpace,
        calibration: torch.Tensor,
        *,
        gradients: Callable[[], dict[str, torch.Tensor]],
        batch_size: int = 4,
        cache_bytes: int = 2**30,
    ) -> None:
        self.model = model
        self.space = space
        self.calibration = calibration
        self._gradients_fn = gradients
        self._gradients: dict[str, torch.Tensor] | None = None
        self.batch_size = batch_size
        self._modules = {u.name: model.get_submodule(u.name) for u in space.units}
        self._stats: dict[str, tuple[torch.Tensor, int]] | None = None  # propagate: dense
        self._masks: OrderedDict[tuple[tuple[int, ...], str], dict[str, np.ndarray]] = (
            OrderedDict()
        )
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._active = False

    def removed(self, genome: tuple[int, ...]) -> list[Unit]:
        return []  # pruning removes no sublayer

    def narrowed(self, genome: tuple[int, ...]) -> list[tuple[Unit, torch.Tensor]]:
        return []

    def scored_as(
        self, genome: tuple[int, ...]
    ) -> list[tuple[str, AbstractContextManager[nn.Module]]]:
        """The models a search scores ``genome`` as, each labelled by its pattern:
        ``space.pattern``, then every pattern of ``space.also_at``."""
        return [(p, self.apply(genome, pattern=p)) for p in self.space.params.patterns]

    @contextmanager
    def apply(
        self, genome: tuple[int, ...], *, export: bool = False, pattern: str | None = None
    ) -> Iterator[nn.Module]:
        """The model pruned with ``genome``'s metric at ``pattern`` (default
        ``space.pattern``; ``export`` changes nothing: the zeros are real)."""
        if self._active:
            raise RuntimeError("OneShotPruner.apply is not re-entrant")
        kept = self.kept(genome, pattern)
        swapped: list[tuple[nn.Module, torch.Tensor]] = []
        self._active = True
        try:
            for u in self.space.units:
                module = self._modules[u.name]
                original = module.weight.data
                keep = kept[u.name].to(original.device)
                module.weight.data = original * (keep.T if u.transposed else keep)
                swapped.append((module, original))
            yield self.model
        finally:
            for module, original in reversed(swapped):
                module.weight.data = original
            self._active = False

    def kept(
        self, genome: tuple[int, ...], pattern: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Which weights ``genome``'s metric keeps at ``pattern`` (default
        ``space.pattern``), per unit (bool ``[out, in]``)."""
        key = (genome, self.space.params.pattern if pattern is None else pattern)
        packed = self._masks.get(key)
        if packed is None:
            masks = self._prune(self.space.expression(genome), key[1])
            self._remember(
                key, {n: np.packbits(m.cpu().numpy().ravel()) for n, m in masks.items()}
            )
            return masks
        self._masks.move_to_end(key)
        return {
            u.name: torch.from_numpy(
                np.unpackbits(packed[u.name], count=u.numel).astype(bool)
            ).reshape(u.shape)
            for u in self.space.units
        }

    def _remember(
        self, key: tuple[tuple[int, ...], str], packed: dict[str, np.ndarray]
    ) -> None:
        self._masks[key] = packed
        self._cached += sum(a.nbytes for a in packed.values())
        while self._cached > self._cache_bytes and len(self._masks) > 1:
            _, old = self._masks.popitem(last=False)
            self._cached -= sum(a.nbytes for a in old.values())

    def _prune(self, expr: Expr, pattern: str) -> dict[str, torch.Tensor]:
        """Masks of kept weights at ``pattern`` for every searched unit."""
        nm = pattern_nm(pattern)
        params = MetricCompressorParams(
            expression=str(expr), nm_group=None if nm is None else nm[1]
        )
        gradients = None
        if "G" in expr.terminals:
            if self._gradients is None:
                self._gradients = self._gradients_fn()
            gradients = self._gradients
        reads_x = "X" in expr.terminals
        dense = self.space.params.propagate == "dense"
        statistics = self._statistics() if reads_x and dense else {}

        build = compressor_factory(Metric, params, gradients)

        def make(u: Unit, weight: torch.Tensor) -> Metric:
            comp = build(u, weight)
            assert isinstance(comp, Metric)
            comp.single_level = True
            if u.name in statistics:
                comp.load_statistics(*statistics[u.name])
            return comp

        units = self.space.units
        pruned = one_shot(
            self.model, units, self.calibration, make,
            {u.name: self.space.zeros(u, pattern) for u in units},
            feed=reads_x and not dense, batch_size=self.batch_size,
        )
        return {name: w != 0 for name, w in pruned.items()}

    def _statistics(self) -> dict[str, tuple[torch.Tensor, int]]:
        """Every unit's activation statistics on the dense model's calibration
        forward (``propagate: dense``), gathered once."""
        if self._stats is None:
            params = MetricCompressorParams(expression="X")
            comps: dict[str, Metric] = {}

            def keep(u: Unit, weight: torch.Tensor) -> Metric:
                comps[u.name] = comp = Metric(weight, params)
                return comp

            one_shot(self.model, self.space.units, self.calibration, keep, {}, feed=True,
                     propagate="dense", batch_size=self.batch_size)
            self._stats = {name: comp.statistics for name, comp in comps.items()}
        return self._stats

def one_shot(
    model: nn.Module,
    units: Sequence[Unit],
    calibration: torch.Tensor,
    make: MakeCompressor,
    levels: dict[str, Any],
    *,
    feed: bool = True,
    propagate: str = "pruned",
    batch_size: int = 4,
) -> dict[str, torch.Tensor]:
    """Compress ``units`` one-shot, block by block: ``make(unit, weight)`` builds each
    unit's compressor (weight ``[out, in]``), which is fed the unit's calibration
    inputs (unless ``feed`` is False: compressors that read none) and compressed at
    ``levels[unit.name]`` (units without a level are only fed). With ``propagate``
    ``"pruned"`` a block's inputs come through the blocks before it already
    compressed (Wanda's and SparseGPT's one-shot order); ``"dense"``: through the
    dense model (the variant database's order). Returns the compressed weights by
    unit name (``[out, in]``); the model is as it was afterwards."""
    by_block: dict[int, list[Unit]] = {}
    for u in units:
        by_block.setdefault(u.block, []).append(u)
    _, blocks = find_blocks(model)
    modules = {u.name: model.get_submodule(u.name) for u in units}
    out: dict[str, torch.Tensor] = {}
    swapped: list[tuple[nn.Module, torch.Tensor]] = []
    try:
        with torch.inference_mode():
            inputs = capture_block_inputs(model, calibration, batch_size) if feed else []
            last = max(by_block, default=-1)
            for b in range(last + 1):
                todo = by_block.get(b, [])
                if feed:
                    attached = _attach(model, todo, make)
                    outputs = _forward_block(blocks[b], inputs, attached)
                    comps = {n: c for n, (c, _) in attached.items()}
                else:
                    comps = {u.name: make(u, unit_weight(model, u)) for u in todo}
                for u in todo:
                    if u.name not in levels:
                        continue
                    w = comps[u.name].compress(levels[u.name])
                    out[u.name] = w
                    if propagate == "pruned":
                        module = modules[u.name]
                        swapped.append((module, module.weight.data))
                        module.weight.data = (w.T if u.transposed else w).to(module.weight.dtype)
                del comps
                if feed and b < last:
                    changed = propagate == "pruned" and any(u.name in levels for u in todo)
                    # The next block sees this one's compressed outputs (pruned order).
                    inputs = (
                        [(first_output(blocks[b](h, **kw)), kw) for h, kw in inputs]
                        if changed else outputs
                    )
    finally:
        for module, original in reversed(swapped):
            module.weight.data = original
    return out
