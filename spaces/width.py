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
* **Levels.** Kept fractions ``target + k·step`` for ``k = -levels..levels``
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
from fractions import Fraction
from typing import Any, Literal

from pydantic import Field

from evocomp.errors import EvocompError
from evocomp.registry import StrictModel
from evocomp.spaces.base import SPACES, Genome, LevelSpace
from evocomp.spaces.units import Unit, VariantKey

GQALayout = Literal["per_group", "whole_groups"]


class WidthParams(StrictModel):
    """Options of the ``width`` space."""

    target: float = Field(0.5, gt=0.0, le=1.0, description="share of heads and neurons kept")
    step: float = Field(0.125, gt=0.0, le=1.0, description="kept share between levels")
    levels: int = Field(4, ge=1, le=64, description="levels on each side of target")
    gqa: GQALayout = Field(
        "per_group",
        description="attention keeps the same number of query heads per KV group "
        "(K/V kept), or whole KV groups",
    )
    neuron_multiple: int = Field(32, ge=1, description="MLP neurons kept in multiples of this")


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
        self._kept = [self._counts(u) for u in self.units]
        self._costs = [[self._cost(u, k) for k in kept] for u, kept in zip(
            self.units, self._kept, strict=True
        )]
        self._start = tuple(
            min(range(len(kept)), key=lambda i, u=u, kept=kept: (abs(kept[i] / u.groups
                - params.target), -kept[i]))
            for u, kept in zip(self.units, self._kept, strict=True)
        )
        self._budget = self.cost(self._start)
        share = self.kept_share(self._start)
        if abs(share - params.target) > params.step / 2 + 1e-9:
            raise EvocompError(
                f"space.target={params.target:g} cannot be reached: the nearest widths these "
                f"sublayers can compute keep {share:.3g} of their parameters; use a target "
                f"within step/2 of a reachable share, or gqa: "
                f"{'whole_groups' if params.gqa == 'per_group' else 'per_group'}"
            )

    # -- levels --------------------------------------------------------------------------
    def valid_counts(self, unit: Unit) -> list[int]:
        """Every number of groups ``unit`` can keep and still compute."""
        if unit.kind == "attn":
            per = unit.groups // max(unit.kv_groups, 1)
            if self.params.gqa == "per_group":
                return [r * unit.kv_groups for r in range(per + 1)]
            return [g * per for g in range(unit.kv_groups + 1)]
        m = self.params.neuron_multiple
        return sorted({*range(0, unit.groups + 1, m), unit.groups})

    def _counts(self, unit: Unit) -> list[int]:
        p = self.params
        valid = self.valid_counts(unit)
        wanted = [
            min(1.0, max(0.0, p.target + k * p.step)) * unit.groups
            for k in range(-p.levels, p.levels + 1)
        ]
        return sorted({min(valid, key=lambda c, w=w: (abs(c - w), -c)) for w in wanted})

    def _cost(self, unit: Unit, kept: int) -> int:
        removed = (unit.groups - kept) * unit.group_numel
        if unit.kind == "attn" and self.params.gqa == "whole_groups":
            # Each KV group removed takes its k_proj and v_proj rows along.
            per = unit.groups // unit.kv_groups
            kv_numel = (unit.numel - unit.groups * unit.group_numel) // unit.kv_groups
            removed += (unit.groups - kept) // per * kv_numel
        return unit.numel - removed

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
        return {what: kept, "kept": round(kept / unit.groups, 6)}

    @property
    def budget(self) -> int:
        return self._budget

    def uniform(self) -> Genome:
        """Every sublayer at the level nearest ``target``."""
        return self._start

    def size_factor(self, gene: int, level: int) -> Fraction:
        """The kept share of the sublayer's parameters."""
        return Fraction(self.level_cost(gene, level), self.units[gene].numel)

    def kept_share(self, genome: Genome) -> float:
        """Kept parameters of the searched sublayers, as a share of dense."""
        return self.cost(genome) / sum(u.numel for u in self.units)
