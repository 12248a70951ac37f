"""Pruning metrics as expressions (Pruner-Zero's language), and the space of them.

A metric scores every weight of a linear layer from three terminals: ``W`` (the
weight's magnitude), ``G`` (the L2 norm of its LM-loss gradient over calibration
sequences) and ``X`` (its input channel's RMS activation, broadcast over rows),
combined by the unary and binary operators of :data:`UNARY` and :data:`BINARY`.
The lowest scores of each comparison group are pruned. An :class:`Expr` is
written and read as ``mul(W, X)`` (:func:`parse`, ``str``), simplified by
opposing-operation rules (:func:`simplify`, Pruner-Zero's OOS) and reduced to a
canonical form that ranks weights the same (:func:`ranking_form`), so that
equivalent metrics are one genome and are scored once. A genome is the prefix
code of an expression (:func:`encode` / :func:`decode`).

This module is pure Python: the tensor meaning of each symbol lives in
:mod:`evocomp.supernet.metric`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from random import Random
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from evocomp.errors import EvocompError
from evocomp.registry import StrictModel
from evocomp.spaces.base import SPACES, CostAxis, Genome, SearchSpace, Step
from evocomp.spaces.units import Unit, VariantKey

TERMINALS: dict[str, str] = {
    "W": "weight magnitude |W|",
    "G": "gradient norm over calibration sequences",
    "X": "input channel RMS activation, broadcast over rows",
}
UNARY: dict[str, str] = {
    "abs": "|x|",
    "neg": "-x",
    "sqr": "x²",
    "sqrt": "sqrt(|x|)",
    "log": "log(|x| + 1e-3)",
    "exp": "exp(x), x clamped to 50",
    "tanh": "tanh(x)",
    "mms": "min-max normalisation over the tensor",
    "zsn": "z-score normalisation over the tensor",
    "id": "x",
}
BINARY: dict[str, str] = {
    "add": "x + y",
    "sub": "x - y",
    "mul": "x · y",
    "div": "x / ‖y‖₂ (Pruner-Zero's division by the norm)",
}
SYMBOLS: tuple[str, ...] = (*TERMINALS, *UNARY, *BINARY)
"""Every symbol; a genome codes each node by its index here."""
ARITY: dict[str, int] = {s: 0 for s in TERMINALS} | {s: 1 for s in UNARY} | {s: 2 for s in BINARY}

PRESETS: dict[str, str] = {
    "magnitude": "W",
    "wanda": "mul(W, X)",
    "pruner-zero": "mul(abs(mul(W, W)), mms(G))",
}
"""Named metrics: magnitude, Wanda (Sun et al. 2023), and Pruner-Zero's published best."""

MAX_DEPTH = 8
"""The deepest expression a config may write (a root alone has depth 0)."""


class ExpressionError(EvocompError, ValueError):
    """An expression that does not parse, names an unknown symbol, or is too deep."""


def allowed_symbols() -> str:
    """The symbols an expression may use, for error messages."""
    return (
        f"terminals {' '.join(TERMINALS)}; unary {' '.join(UNARY)}; "
        f"binary {' '.join(BINARY)}; presets {' '.join(PRESETS)}"
    )


@dataclass(frozen=True)
class Expr:
    """A node of a metric expression: a symbol of :data:`SYMBOLS` and its arguments."""

    op: str
    args: tuple[Expr, ...] = ()

    def __post_init__(self) -> None:
        if self.op not in ARITY:
            raise ExpressionError(f"unknown symbol {self.op!r}; allowed: {allowed_symbols()}")
        if len(self.args) != ARITY[self.op]:
            raise ExpressionError(
                f"{self.op} takes {ARITY[self.op]} argument(s), got {len(self.args)}"
            )

    def __str__(self) -> str:
        if not self.args:
            return self.op
        return f"{self.op}({', '.join(map(str, self.args))})"

    @cached_property
    def depth(self) -> int:
        """Edges on the longest path to a terminal (a terminal alone: 0)."""
        return 1 + max(a.depth for a in self.args) if self.args else 0

    @cached_property
    def size(self) -> int:
        """Number of nodes."""
        return 1 + sum(a.size for a in self.args)

    @cached_property
    def terminals(self) -> frozenset[str]:
        """The terminals the expression reads (what must be measured to score it)."""
        if not self.args:
            return frozenset({self.op})
        return frozenset().union(*(a.terminals for a in self.args))


_TOKEN = re.compile(r"\s*(?:([A-Za-z_][A-Za-z0-9_-]*)|(.))")


def parse(text: str, *, max_depth: int = MAX_DEPTH) -> Expr:
    """The expression ``text`` writes (``mul(abs(W), X)``, any spacing) or a preset's
    name (:data:`PRESETS`). Raises :class:`ExpressionError` naming the position of
    the problem and the allowed symbols."""
    source = text.strip()
    if source in PRESETS:
        return parse(PRESETS[source], max_depth=max_depth)
    tokens: list[tuple[str, int]] = []  # (token, position)
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        assert m is not None  # `.` matches any character
        if m.group(0).strip():
            tokens.append((m.group(1) or m.group(2), m.start(m.lastindex or 0)))
        pos = m.end()

    def fail(why: str, at: int) -> ExpressionError:
        return ExpressionError(
            f"expression {text!r}: {why} at position {at}; allowed: {allowed_symbols()}"
        )

    index = 0

    def node() -> Expr:
        nonlocal index
        if index >= len(tokens):
            raise fail("it ends too early", len(text))
        name, at = tokens[index]
        index += 1
        if name not in ARITY:
            raise fail(f"unknown symbol {name!r}", at)
        arity = ARITY[name]
        if arity == 0:
            return Expr(name)
        args = []
        expect(("(",), f"'(' after {name}")
        for k in range(arity):
            args.append(node())
            expect((")",) if k == arity - 1 else (",",),
                   f"')' closing {name}" if k == arity - 1 else f"',' between {name}'s arguments")
        return Expr(name, tuple(args))

    def expect(wanted: tuple[str, ...], what: str) -> None:
        nonlocal index
        if index >= len(tokens):
            raise fail(f"expected {what} but it ends", len(text))
        token, at = tokens[index]
        if token not in wanted:
            raise fail(f"expected {what}, found {token!r}", at)
        index += 1

    if not tokens:
        raise fail("it is empty", 0)
    expr = node()
    if index < len(tokens):
        token, at = tokens[index]
        raise fail(f"unexpected {token!r} after a complete expression", at)
    if expr.depth > max_depth:
        raise ExpressionError(
            f"expression {text!r} is {expr.depth} levels deep; at most {max_depth} are allowed"
        )
    return expr


def nonnegative(e: Expr) -> bool:
    """Whether ``e`` can never be negative (used to drop needless ``abs``)."""
    if e.op in ("W", "G", "X", "abs", "sqr", "sqrt", "exp", "mms"):
        return True
    if e.op in ("mul", "add"):
        return all(nonnegative(a) for a in e.args)
    if e.op in ("div", "tanh", "id"):
        return nonnegative(e.args[0])
    return False


_NORMALISERS = ("mms", "zsn")


def _rewrite(e: Expr) -> Expr:
    """One opposing-operation rule at the root of ``e`` (its arguments are simplified)."""
    a = e.args[0] if e.args else None
    if e.op == "id":
        return e.args[0]
    if a is not None and len(e.args) == 1:
        if e.op == "neg" and a.op == "neg":
            return a.args[0]
        if e.op == "abs":
            if nonnegative(a):
                return a
            if a.op == "neg":
                return Expr("abs", a.args)
        if e.op in ("sqr", "sqrt", "log") and a.op in ("neg", "abs"):
            return Expr(e.op, a.args)  # each reads |x| (sqr: x² = |x|²)
        if (e.op, a.op) in (("sqrt", "sqr"), ("sqr", "sqrt")):
            return Expr("abs", a.args)
        # exp(log(x)) = |x| + 1e-3 and log(exp(x)) = x below the clamp: equal up to
        # the guard terms, which Pruner-Zero's simplification also ignores.
        if (e.op, a.op) == ("exp", "log"):
            return Expr("abs", a.args)
        if (e.op, a.op) == ("log", "exp"):
            return a.args[0]
        if e.op in _NORMALISERS and a.op in _NORMALISERS:
            return Expr(e.op, a.args)  # both are invariant to the other's affine map
    if e.op in ("add", "mul", "sub"):
        x, y = e.args
        if e.op == "mul" and x == y:
            return Expr("sqr", (x,))
        if e.op == "mul" and x.op == "neg" and y.op == "neg":
            return Expr("mul", (x.args[0], y.args[0]))
        if e.op == "add" and y.op == "neg":
            return Expr("sub", (x, y.args[0]))
        if e.op == "sub" and y.op == "neg":
            return Expr("add", (x, y.args[0]))
        if e.op in ("add", "mul") and str(y) < str(x):
            return Expr(e.op, (y, x))  # commutative: one order
    return e


def simplify(e: Expr) -> Expr:
    """``e`` with opposing operations cancelled (``neg(neg(x))``, ``sqrt(sqr(x))``,
    ``exp(log(x))``...), needless ``abs``/``id`` dropped, ``mul(x, x)`` written
    ``sqr(x)`` and commutative arguments in one order, until nothing changes."""
    e = Expr(e.op, tuple(simplify(a) for a in e.args))
    while True:
        r = _rewrite(e)
        if r == e:
            return e
        e = Expr(r.op, tuple(simplify(a) for a in r.args))


def ranking_form(e: Expr) -> Expr:
    """The simplest expression that ranks every comparison group's weights as ``e``
    does: :func:`simplify`, then outer maps that keep the order dropped (the
    tensor-wide normalisations, ``exp``, ``tanh``, ``abs``/``sqr``/``sqrt``/``log``
    of a nonnegative argument, ``div`` by a norm) and positive constant factors of a
    top-level product (``div(x, y)``, ``add(x, x)``). Two metrics with one ranking form
    prune alike, up to float rounding (``exp`` and ``tanh`` can tie scores that
    differ by less than a rounding step, or beyond the clamp / saturation)."""
    e = simplify(e)
    while True:
        monotone = e.op in ("exp", "tanh") or (
            e.op in ("abs", "sqr", "sqrt", "log") and nonnegative(e.args[0])
        )
        if monotone or e.op in _NORMALISERS or e.op == "div":
            e = e.args[0]
            continue
        unscaled = _unscaled(e)
        if unscaled == e:
            return e
        e = unscaled


def _unscaled(e: Expr) -> Expr:
    """``e`` without positive constant factors: ``div(x, y)`` is ``x`` over a norm and
    ``add(x, x)`` is ``2x``, so as a factor of the whole score (or of a top-level
    product) each scales every weight alike and ranks as ``x``."""
    if e.op == "div":
        return _unscaled(e.args[0])
    if e.op == "add" and e.args[0] == e.args[1]:
        return _unscaled(e.args[0])
    if e.op == "mul":
        return simplify(Expr("mul", tuple(_unscaled(a) for a in e.args)))
    return e


def encode(e: Expr) -> Genome:
    """The prefix code of ``e``: each node's index in :data:`SYMBOLS`."""
    out: list[int] = []

    def visit(n: Expr) -> None:
        out.append(SYMBOLS.index(n.op))
        for a in n.args:
            visit(a)

    visit(e)
    return tuple(out)


def decode(genome: Sequence[int]) -> Expr:
    """The expression whose prefix code is ``genome``; ValueError when it is none."""
    index = 0

    def node() -> Expr:
        nonlocal index
        if index >= len(genome):
            raise ValueError(f"genome {tuple(genome)} ends inside an expression")
        code = genome[index]
        if not 0 <= code < len(SYMBOLS):
            raise ValueError(f"genome {tuple(genome)} has no symbol {code}")
        index += 1
        op = SYMBOLS[code]
        return Expr(op, tuple(node() for _ in range(ARITY[op])))

    expr = node()
    if index != len(genome):
        raise ValueError(f"genome {tuple(genome)} holds more than one expression")
    return expr


# -- the space of metrics ------------------------------------------------------------

_PATTERN = re.compile(r"^(\d+):(\d+)$")


def pattern_nm(pattern: str) -> tuple[int, int] | None:
    """(N, M) of an N:M pattern, None when ``pattern`` is 'unstructured'."""
    m = _PATTERN.match(pattern)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _check_pattern(pattern: Any) -> Any:
    if isinstance(pattern, int):
        # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124.
        raise ValueError(
            f"pattern {pattern} is a number; write an N:M pattern in quotes, e.g. "
            "pattern: '2:4' (unquoted, YAML reads 2:4 as 124)"
        )
    if pattern == "unstructured" or not isinstance(pattern, str):
        return pattern  # a non-string is refused by the type check
    m = _PATTERN.match(pattern)
    if m is None or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ValueError(
            f"pattern {pattern!r} is neither 'unstructured' nor 'N:M' with 0 < N < M "
            "(e.g. '2:4')"
        )
    return pattern


class MetricParams(StrictModel):
    """Options of the ``metric`` space."""

    target: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="sparsity of every searched layer (default 0.5; with an N:M "
        "pattern it is N/M)",
    )
    pattern: str = Field(
        "unstructured",
        description="'unstructured' (each output row loses the same share, as Wanda) "
        "or 'N:M' (N zeros in every M consecutive inputs of a row, e.g. '2:4')",
    )
    max_depth: int = Field(
        6, ge=1, le=MAX_DEPTH, description="deepest expression searched (root: depth 0)"
    )
    propagate: Literal["pruned", "dense"] = Field(
        "pruned",
        description="where X's calibration inputs come from: through the blocks already "
        "pruned (Wanda and Pruner-Zero; a forward per metric), or the dense model "
        "(measured once, so a metric costs no forward; the variant database's order)",
    )
    baseline: str = Field(
        "wanda",
        description="the metric searches are compared with (a preset or an expression); "
        "also the search's reported baseline",
    )

    also_at: list[str] = Field(
        default_factory=list,
        description="further patterns every metric is scored at during the search "
        "(each 'unstructured' or 'N:M', pruning the share `pattern` prunes): the "
        "fitness is then the geometric mean of the evaluator's metric over `pattern` "
        "and these, so each pattern counts alike whatever its scale; the run's model "
        "(eval, export) uses `pattern`",
    )

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern(cls, pattern: Any) -> Any:
        return _check_pattern(pattern)

    @field_validator("also_at", mode="before")
    @classmethod
    def _also_at(cls, patterns: Any) -> Any:
        if isinstance(patterns, (str, int)):
            patterns = [patterns]
        if isinstance(patterns, list):
            return [_check_pattern(p) for p in patterns]
        return patterns  # refused by the type check

    @field_validator("baseline")
    @classmethod
    def _baseline(cls, text: str) -> str:
        parse(text)  # ExpressionError is a ValueError's message to pydantic
        return text

    @model_validator(mode="after")
    def _target_matches(self) -> MetricParams:
        nm = self.nm
        if nm is not None and self.target is not None and abs(self.target - nm[0] / nm[1]) > 1e-9:
            raise ValueError(
                f"target={self.target} contradicts pattern={self.pattern!r} (sparsity "
                f"{nm[0]}/{nm[1]}); leave target out"
            )
        return self

    @model_validator(mode="after")
    def _also_at_alike(self) -> MetricParams:
        seen = {self.pattern}
        for p in self.also_at:
            if p in seen:
                raise ValueError(f"also_at repeats the pattern {p!r}")
            seen.add(p)
            nm = pattern_nm(p)
            if nm is not None and abs(nm[0] / nm[1] - self.sparsity) > 1e-9:
                raise ValueError(
                    f"also_at pattern {p!r} prunes {nm[0]}/{nm[1]} of the weights, pattern "
                    f"{self.pattern!r} prunes {self.sparsity:g}: every pattern a metric is "
                    "scored at must prune the same share"
                )
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) of an N:M pattern, None when unstructured."""
        return pattern_nm(self.pattern)

    @property
    def patterns(self) -> tuple[str, ...]:
        """Every pattern a metric is scored at in the search: ``pattern`` first."""
        return (self.pattern, *self.also_at)

    @property
    def sparsity(self) -> float:
        """The sparsity every layer is pruned to."""
        nm = self.nm
        if nm is not None:
            return nm[0] / nm[1]
        return 0.5 if self.target is None else self.target


@SPACES.register("metric")
class MetricSpace(SearchSpace[MetricParams]):
    """The space of pruning metrics (Pruner-Zero): a genome is the prefix code of an
    expression (:func:`encode`), and every searched linear layer is pruned one-shot
    to the same sparsity with it. The cost is the weights kept, the same for every
    metric, so the budget always holds; which genomes are searched and how they
    change is up to an expression optimizer (``metric-gp``), whose genetic
    operators work on expression trees, not on levels.
    """

    name = "metric"
    Params = MetricParams
    genome_kind = "expression"

    def __init__(self, units: Sequence[Unit], params: MetricParams) -> None:
        super().__init__(units, params)
        if any(u.family != "linear" for u in units):
            raise EvocompError("the metric space applies to linear units only")
        for field, pattern in (("pattern", params.pattern),
                               *(("also_at", p) for p in params.also_at)):
            nm = pattern_nm(pattern)
            bad = [u for u in units if nm is not None and u.shape[1] % nm[1]]
            if bad:
                raise EvocompError(
                    f"space.{field}={pattern!r}: {bad[0].name} has {bad[0].shape[1]} "
                    f"inputs, not a multiple of {nm[1]}; choose another pattern or narrow "
                    "units.targets"
                )
        self._zeros = [self.zeros(u) for u in self.units]

    def zeros(self, unit: Unit, pattern: str | None = None) -> int:
        """How many of ``unit``'s weights every metric prunes at ``pattern`` (default
        ``space.pattern``): the same share of each output row (N:M: exactly N of
        every M)."""
        rows, columns = unit.shape
        nm = pattern_nm(self.params.pattern if pattern is None else pattern)
        if nm is not None:
            return rows * columns // nm[1] * nm[0]
        return rows * round(self.params.sparsity * columns)

    def expression(self, genome: Genome) -> Expr:
        """The metric ``genome`` codes (EvocompError when it codes none)."""
        try:
            return decode(genome)
        except (ValueError, ExpressionError) as err:
            raise EvocompError(f"not a metric genome: {err}") from None

    def genome(self, text: str) -> Genome:
        """The genome of an expression or preset (its ranking form)."""
        return encode(ranking_form(parse(text, max_depth=self.params.max_depth)))

    # -- the SearchSpace contract -------------------------------------------------
    def __len__(self) -> int:
        return len(self.units)

    def n_levels(self, gene: int) -> int:
        raise EvocompError("metric genomes have no levels; search them with search.name=metric-gp")

    def cost(self, genome: Genome) -> int:
        return self.budget

    @property
    def budget(self) -> int:
        return sum(u.numel - z for u, z in zip(self.units, self._zeros, strict=True))

    def is_valid(self, genome: Genome) -> bool:
        try:
            return decode(genome).depth <= self.params.max_depth
        except (ValueError, ExpressionError):
            return False

    def uniform(self) -> Genome:
        """The baseline metric (``space.baseline``)."""
        return self.genome(self.params.baseline)

    @property
    def baseline_name(self) -> str:
        return self.params.baseline if self.params.baseline in PRESETS else "baseline"

    def steps(self, genome: Genome) -> list[Step]:
        raise EvocompError("metric genomes have no level steps; use search.name=metric-gp")

    def mutate(self, genome: Genome, rng: Random, *, switches: int = 1) -> Genome:
        raise EvocompError("metric genomes mutate as trees; use search.name=metric-gp")

    def repair(self, genome: Genome, rng: Random) -> Genome:
        return genome  # every valid metric prunes exactly on budget

    def make_valid(self, genome: Genome) -> Genome:
        return genome

    def check_movable(self) -> None:
        return None  # expression optimizers always have somewhere to go

    def placements(self, genome: Genome) -> list[tuple[Unit, VariantKey]]:
        """Every searched layer, with the zeros the metric leaves in it."""
        return list(zip(self.units, self._zeros, strict=True))

    def variants(self) -> dict[str, list[VariantKey]]:
        return {}  # pruned on the fly; no variant database

    def describe(self, genome: Genome) -> list[dict[str, Any]]:
        text = str(self.expression(genome))
        return [
            {"unit": u.name, "block": u.block, "metric": text,
             "sparsity": round(z / u.numel, 6), "nonzeros": u.numel - z}
            for u, z in zip(self.units, self._zeros, strict=True)
        ]

    def summary(self, genome: Genome) -> dict[str, Any]:
        out = {"expression": str(self.expression(genome)), "pattern": self.params.pattern,
               "sparsity": self.params.sparsity}
        if self.params.also_at:
            out["also_scored_at"] = list(self.params.also_at)
        return out

    def cost_axis(self) -> CostAxis:
        return CostAxis(float(sum(u.numel for u in self.units)), "kept weights (fraction)")
