"""Width search (DarwinLM, Týr-the-Pruner): how many query heads each attention and
how many neurons each MLP keeps, under an exact budget of kept parameters.

Variants come from a ``width`` compressor (``structured-obs``: greedy structured OBS
with a least-squares refit, see :mod:`evocomp.supernet.widths`); a candidate runs
with physically narrower projections.

Design
------
* **Genes are sublayers** (``attn`` and ``mlp`` units, whose ``groups``,
  ``group_numel`` and ``kv_groups`` unit discovery fills in). A level is a number
  of groups kept; level costs are kept parameters (``numel - removed groups ×
  group_numel``, K/V too when whole KV groups go), so the budget is exact.
* **Levels.** Kept shares of the sublayer's PARAMETERS ``target + k·step`` for
  ``k = -levels..levels``
  (Týr's grid; ``levels`` large and ``step`` 0.1 gives DarwinLM's full range),
  clipped to [0, 1] and rounded to counts the sublayer can compute: for attention
  the same number of query heads in every KV group (``per_group``, K/V kept) or
  whole KV groups (``whole_groups``); for MLPs multiples of ``neuron_multiple``.
  Rounding can merge fractions, so a gene has at most ``2·levels + 1`` levels.
  Keeping 0 is a level (DarwinLM's "module removed"): applying it skips the
  sublayer, as depth search does, rather than run a zero-width projection.
* **Variant keys** are what a level keeps: an MLP's neuron count, an attention's
  ``(query heads, KV heads)``, which also says the GQA layout.
* **Start and budget.** Each gene starts at the level nearest ``target``; the
  budget is that start's cost, which identical sublayers (identical cost tables)
  trade exactly in the EvoPress level switch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from evocomp.errors import EvocompError
from evocomp.registry import StrictModel
from evocomp.spaces.base import SPACES, CostAxis, Genome, LevelSpace
from evocomp.spaces.units import TimingRequest, Unit, VariantKey

GQALayout = Literal["per_group", "whole_groups"]


class WidthParams(StrictModel):
    """Options of the ``width`` space."""

    target: float = Field(
        0.5, gt=0.0, le=1.0, description="share of each sublayer's parameters kept"
    )
    step: float = Field(0.125, gt=0.0, le=1.0, description="kept parameter share between levels")
    levels: int = Field(4, ge=1, le=64, description="levels on each side of target")
    gqa: GQALayout = Field(
        "per_group",
        description="attention keeps the same number of query heads per KV group "
        "(K/V kept), or whole KV groups",
    )
    refine: int = Field(
        1, ge=1, le=64,
        description="levels lie step/refine apart (levels·refine on each side), those "
        "finer than one head or neuron_multiple merging; coarse-to-fine search sets it "
        "for its finest grid",
    )
    neuron_multiple: int = Field(32, ge=1, description="MLP neurons kept in multiples of this")
    cost: Literal["params", "latency"] = Field(
        "params",
        description="what target, levels and the budget count: parameters kept, or the "
        "sublayers' measured forward time (target 0.667 asks for ~1.5x faster blocks)",
    )
    trade: float = Field(
        0.25, ge=0.0, le=1.0,
        description="share of mutations that are trades (a random level step, then steps "
        "until under the budget and up while it allows) instead of exact level switches; "
        "removing a whole sublayer has no exact partner. 1 with cost: latency",
    )
    latency: dict[str, dict[int, int]] | None = Field(
        None,
        description="with cost: latency, the measured forward nanoseconds per sublayer "
        "shape and width, filled in by evocomp (timed once per machine, cached)",
    )


@SPACES.register("width")
class WidthSpace(LevelSpace[WidthParams]):
    """Query heads and MLP neurons kept per block (see the module docstring)."""

    name = "width"
    Params = WidthParams
    unit_family = "sublayer"
    compressor_kind = "width"

    def __init__(self, units: Sequence[Unit], params: WidthParams) -> None:
        super().__init__(units, params)
        narrow = [u.name for u in units if u.groups <= 0 or u.family != "sublayer"]
        if not units or narrow:
            raise EvocompError(
                "space.name=width needs Llama-style attention (q/k/v/o_proj, whole KV "
                "groups) and MLP (gate/up/down_proj) sublayers; these have no width: "
                f"{', '.join(narrow[:3])}"
            )
        for u in units:
            what = "query head" if u.kind == "attn" else "neuron"
            if params.step * u.groups < 1:
                raise EvocompError(
                    f"space.step={params.step:g} is finer than one {what} of {u.name} "
                    f"({u.groups} {what}s); use step >= {1 / u.groups:.4g}"
                )
            if u.kind == "mlp" and params.neuron_multiple > u.groups:
                raise EvocompError(
                    f"space.neuron_multiple={params.neuron_multiple} exceeds the {u.groups} "
                    f"neurons of {u.name}; use 1..{u.groups}"
                )
        self._timings: dict[str, dict[int, int]] = {}
        if params.cost == "latency":
            self._timings = self._checked_timings(params)
        self._kept = [self._counts(u) for u in self.units]
        self._costs = [
            [self._cost(u, k) for k in kept] for u, kept in zip(self.units, self._kept, strict=True)
        ]
        self._start = tuple(
            self._nearest(u, range(len(kept)), kept, params.target)
            for u, kept in zip(self.units, self._kept, strict=True)
        )
        self._budget = self.cost(self._start)
        share = self.kept_share(self._start)
        if abs(share - params.target) > params.step / 2 + 1e-9:
            raise EvocompError(
                f"space.target={params.target:g} cannot be reached: the nearest widths these "
                f"sublayers can compute keep {share:.3g} of their "
                f"{'latency' if params.cost == 'latency' else 'parameters'}; use a target "
                f"within step/2 of a reachable share, or gqa: "
                f"{'whole_groups' if params.gqa == 'per_group' else 'per_group'}"
            )

    # -- levels --------------------------------------------------------------------------
    def valid_counts(self, unit: Unit) -> list[int]:
        """Every number of groups ``unit`` can keep and still compute."""
        return _valid_counts(unit, self.params)

    def _counts(self, unit: Unit) -> list[int]:
        p = self.params
        valid = self.valid_counts(unit)
        n, step = p.levels * p.refine, p.step / p.refine
        wanted = [min(1.0, max(0.0, p.target + k * step)) for k in range(-n, n + 1)]
        return sorted({valid[self._nearest(unit, range(len(valid)), valid, w)] for w in wanted})

    def _nearest(self, unit: Unit, options: range, counts: list[int], share: float) -> int:
        """The option whose count keeps the share of ``unit``'s cost nearest ``share``
        (ties: the wider)."""
        full = self._cost(unit, unit.groups)
        return min(options, key=lambda i: (abs(self._cost(unit, counts[i]) / full - share), -i))

    def _cost(self, unit: Unit, kept: int) -> int:
        if self.params.cost == "latency":
            return self._timings[timing_key(unit, self.params)][kept]
        return self._params(unit, kept)

    def _params(self, unit: Unit, kept: int) -> int:
        """Parameters ``unit`` keeps with ``kept`` heads or neurons (none when it keeps
        no group: the sublayer is skipped, K/V and biases with it)."""
        if kept == 0:
            return 0
        removed = (unit.groups - kept) * unit.group_numel
        if unit.kind == "attn" and self.params.gqa == "whole_groups":
            # Each KV group removed takes its k_proj and v_proj rows along.
            per = unit.groups // unit.kv_groups
            kv_numel = (unit.numel - unit.groups * unit.group_numel) // unit.kv_groups
            removed += (unit.groups - kept) // per * kv_numel
        return unit.numel - removed

    # -- measured latency ----------------------------------------------------------------
    @classmethod
    def timings_needed(cls, units: Sequence[Unit], params: WidthParams) -> dict[str, TimingRequest]:
        """With ``cost: latency`` and no table yet: one unit per sublayer shape, with
        every width it can compute."""
        if params.cost != "latency" or params.latency is not None:
            return {}
        out: dict[str, TimingRequest] = {}
        whole = params.gqa == "whole_groups"
        for u in units:
            if u.groups > 0 and timing_key(u, params) not in out:
                counts = tuple(_valid_counts(u, params))
                out[timing_key(u, params)] = TimingRequest(u, counts, whole and u.kind == "attn")
        return out

    @classmethod
    def with_timings(cls, params: WidthParams, timings: dict[str, dict[int, int]]) -> WidthParams:
        return params.model_copy(update={"latency": timings})

    def _checked_timings(self, params: WidthParams) -> dict[str, dict[int, int]]:
        given = params.latency or {}
        table = {k: {int(c): int(t) for c, t in v.items()} for k, v in given.items()}
        for u in self.units:
            have = table.get(timing_key(u, params), {})
            missing = [c for c in _valid_counts(u, params) if c not in have]
            if missing:
                raise EvocompError(
                    f"space.latency has no time for {u.name} keeping {missing[0]} "
                    "(leave space.latency unset: evocomp measures it)"
                )
        return table

    def kept(self, gene: int, level: int) -> int:
        """The number of heads (attention) or neurons (MLP) gene ``gene`` keeps."""
        return self._kept[gene][level]

    # -- the LevelSpace contract -------------------------------------------------------
    def n_levels(self, gene: int) -> int:
        return len(self._kept[gene])

    def level_cost(self, gene: int, level: int) -> int:
        return self._costs[gene][level]

    def variant(self, gene: int, level: int) -> VariantKey | None:
        unit, kept = self.units[gene], self.kept(gene, level)
        if kept == unit.groups:
            return None
        if unit.kind != "attn":
            return kept
        per = unit.groups // unit.kv_groups
        return (kept, unit.kv_groups if self.params.gqa == "per_group" else kept // per)

    def describe_level(self, gene: int, level: int) -> dict[str, Any]:
        unit, kept = self.units[gene], self.kept(gene, level)
        what = "heads" if unit.kind == "attn" else "neurons"
        row: dict[str, Any] = {what: kept, "kept": round(kept / unit.groups, 6)}
        if self.params.cost == "latency":
            row["latency_ms"] = round(self.level_cost(gene, level) / 1e6, 4)
        return row

    @property
    def budget(self) -> int:
        return self._budget

    @property
    def trade_share(self) -> float:
        """``trade``, or 1 with ``cost: latency`` (measured times rarely trade
        exactly). Removing a sublayer (keeping nothing frees its K/V and biases
        too) has no exact partner and only happens through trades."""
        return 1.0 if self.params.cost == "latency" else self.params.trade

    def position(self, gene: int, level: int) -> float:
        """The kept share of the sublayer's cost (parameters or time)."""
        unit = self.units[gene]
        return self.level_cost(gene, level) / self._cost(unit, unit.groups)

    @property
    def grid_step(self) -> float:
        return self.params.step

    @classmethod
    def refined(cls, params: WidthParams, factor: int) -> WidthParams:
        return params.model_copy(update={"refine": params.refine * factor})

    def uniform(self) -> Genome:
        """Every sublayer at the level nearest ``target``."""
        return self._start

    def kept_share(self, genome: Genome) -> float:
        """The searched sublayers' cost (parameters or time) as a share of dense."""
        return self.cost(genome) / self._dense_cost

    def params_kept(self, genome: Genome) -> float:
        """Kept parameters of the searched sublayers as a share of dense (whatever
        the cost counts)."""
        kept = sum(self._params(u, self.kept(i, g)) for i, (u, g) in enumerate(
            zip(self.units, genome, strict=True)))
        return kept / sum(u.numel for u in self.units)

    @property
    def _dense_cost(self) -> int:
        return sum(self._cost(u, u.groups) for u in self.units)

    def cost_axis(self) -> CostAxis:
        if self.params.cost == "latency":
            return CostAxis(float(self._dense_cost), "share of the sublayers' dense latency")
        return CostAxis(float(self._dense_cost), "share of block parameters kept")


def timing_key(unit: Unit, params: WidthParams) -> str:
    """Sublayers with equal keys run equally fast at equal widths (same shape and,
    for attention, GQA layout)."""
    key = f"{unit.kind}/{unit.groups}/{unit.kv_groups}/{unit.numel}"
    return f"{key}/{params.gqa}" if unit.kind == "attn" else key


def _valid_counts(unit: Unit, params: WidthParams) -> list[int]:
    if unit.kind == "attn":
        per = unit.groups // max(unit.kv_groups, 1)
        if params.gqa == "per_group":
            return [r * unit.kv_groups for r in range(per + 1)]
        return [g * per for g in range(unit.kv_groups + 1)]
    m = params.neuron_multiple
    return sorted({*range(0, unit.groups + 1, m), unit.groups})
