"""A weighted sum of named evaluators, each normalised by its value on the
search's baseline genome, so that weights say how much each part counts.

``evaluator: {name: combined, parts: {kl: 1.0, dtm: 0.2}}`` scores

    combined = Σ weight_i · metric_i(candidate) / metric_i(baseline)

where the baseline is the space's uniform genome, measured once per search (the
runner records the values in the trial store: see
:attr:`~evocomp.evaluators.base.Evaluator.needs_baseline`). The baseline itself
scores exactly the sum of the weights at the full token budget; lower is better,
like every part. A part may also carry its evaluator's options:
``{kl: {weight: 1.0, topk: 64}, dtm: {weight: 0.2, prompts: 16}}``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from evocomp.errors import EvocompError, choices
from evocomp.evaluators.base import EVALUATORS, Evaluator, EvaluatorParams, Forward
from evocomp.evaluators.reference import ReferenceCache
from evocomp.registry import StrictModel


class CombinedPart(StrictModel):
    """One term of the sum: its weight, and the named evaluator's options."""

    model_config = ConfigDict(extra="allow")
    weight: float = Field(1.0, gt=0, description="how much the normalised part counts")

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _part_names() -> list[str]:
    # A part that is itself relative to a baseline would need its own normalisers.
    return [n for n in EVALUATORS.names() if not EVALUATORS.get(n).needs_baseline]


def part_params(name: str, part: CombinedPart) -> EvaluatorParams:
    """The validated options of the part ``name``."""
    if name not in _part_names():
        raise ValueError(f"parts.{name}: unknown evaluator; allowed: {choices(_part_names())}")
    cls = EVALUATORS.get(name).Params
    try:
        return cls(**part.options())
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = ".".join(map(str, e["loc"]))
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = f"unknown field; allowed: {choices(['weight', *cls.model_fields])}"
            elif "input" in e and not isinstance(e["input"], dict):
                msg = f"{msg} (got {e['input']!r})"
            problems.append(f"parts.{name}.{where}: {msg}" if where else f"parts.{name}: {msg}")
        raise ValueError("; ".join(problems)) from None


class CombinedParams(EvaluatorParams):
    """Options of :class:`CombinedEvaluator`."""

    batch_size: int = Field(
        4, ge=1, description="sequences per training batch when candidates are fine-tuned "
        "(training-aware search); each part has its own batch_size"
    )
    parts: dict[str, CombinedPart] = Field(
        min_length=1,
        description="evaluator name -> weight, or {weight, <that evaluator's options>...}",
    )

    @field_validator("parts", mode="before")
    @classmethod
    def _bare_weights(cls, parts: Any) -> Any:
        if not isinstance(parts, dict):
            return parts
        out = {}
        for name, value in parts.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = {"weight": value}
            elif not isinstance(value, dict):
                raise ValueError(
                    f"part {name!r} takes a weight or {{weight: .., <options>..}}, "
                    f"got {value!r}"
                )
            out[name] = value
        return out

    @model_validator(mode="after")
    def _known_parts(self) -> CombinedParams:
        # Options are written out with their defaults, so the run directory's config
        # (and the search signature) says exactly what each part scored.
        self.parts = {
            name: CombinedPart(
                weight=part.weight, **part_params(name, part).model_dump(mode="json")
            )
            for name, part in self.parts.items()
        }
        return self


@EVALUATORS.register("combined")
class CombinedEvaluator(Evaluator[CombinedParams]):
    """A weighted sum of evaluators (``parts``), each divided by its value on the
    baseline (uniform) genome: ``combined = Σ weight · metric / baseline metric``,
    so the baseline scores the sum of the weights. Reports each part's metric under
    the part's name and its other metrics as ``<part>.<metric>``."""

    name = "combined"
    metric = "combined"
    # The parts that take a forward get it (they score the same token rows).
    takes_forward = True
    needs_baseline = True

    Params = CombinedParams

    @classmethod
    def resamples(cls, params: Any) -> bool:
        """Only when every part scores token rows: a draw must mean the same to all."""
        return all(
            EVALUATORS.get(name).resamples(part_params(name, part))
            for name, part in params.parts.items()
        )

    def __init__(
        self, tokens: torch.Tensor, parts: dict[str, tuple[float, Evaluator[Any]]], *,
        batch_size: int = 4,
    ) -> None:
        super().__init__(tokens, batch_size=batch_size)
        self.parts = parts
        self.baseline: dict[str, float] | None = None

    @classmethod
    def create(
        cls, model: nn.Module, tokens: torch.Tensor, params: CombinedParams, *,
        cache: ReferenceCache | None = None, progress: bool = True,
    ) -> CombinedEvaluator:
        parts = {}
        for name, part in params.parts.items():
            part_cls = EVALUATORS.get(name)
            evaluator = part_cls.create(
                model, tokens, part_params(name, part), cache=cache, progress=progress
            )
            parts[name] = (part.weight, evaluator)
        return cls(tokens, parts, batch_size=params.batch_size)

    def measure_baseline(self, model: nn.Module) -> dict[str, float]:
        """Each part's metric on ``model`` (the baseline applied), at the full budget."""
        return {name: ev.evaluate(model)[ev.metric] for name, (_, ev) in self.parts.items()}

    def set_baseline(self, values: dict[str, float]) -> None:
        if set(values) != set(self.parts):
            raise EvocompError(
                f"evaluator combined: the recorded baseline has parts {choices(values)}, "
                f"this search {choices(self.parts)}"
            )
        for name, value in values.items():
            if not (math.isfinite(value) and value > 0):
                raise EvocompError(
                    f"evaluator combined: part {name!r} scores {value} on the uniform "
                    "baseline, which cannot normalise it (it must be finite and above 0: "
                    "a baseline that already scores perfectly leaves nothing to rank "
                    "against); drop the part"
                )
        self.baseline = dict(values)

    def evaluate(
        self, model: nn.Module, budget_tokens: int | None = None, *,
        forward: Forward | None = None, order: Sequence[int] | None = None,
    ) -> dict[str, float]:
        if self.baseline is None:
            raise RuntimeError("CombinedEvaluator.set_baseline must be called before evaluate")
        total = 0.0
        out: dict[str, float] = {}
        for name, (weight, ev) in self.parts.items():
            given = forward if ev.takes_forward else None
            metrics = ev.evaluate(model, budget_tokens, forward=given, order=order)
            value = metrics[ev.metric]
            total += weight * value / self.baseline[name]
            out[name] = value
            out.update({f"{name}.{k}": v for k, v in metrics.items() if k != ev.metric})
        return {"combined": total, **out}
