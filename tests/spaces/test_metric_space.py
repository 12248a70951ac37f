"""The metric language (parse, print, simplify, ranking form, genome code) and the
metric space."""

import random

import pytest
from conftest import random_expr
from pydantic import ValidationError

from evocomp.errors import EvocompError
from evocomp.spaces import SPACES, MetricSpace
from evocomp.spaces.metric import (
    PRESETS,
    Expr,
    ExpressionError,
    decode,
    encode,
    nonnegative,
    parse,
    ranking_form,
    simplify,
)
from evocomp.spaces.units import Unit


def test_printing_parsing_and_the_genome_code_round_trip():
    rng = random.Random(0)
    for _ in range(500):
        e = random_expr(rng, 5)
        assert parse(str(e)) == e
        assert decode(encode(e)) == e
        assert len(encode(e)) == e.size
    # spacing is free; the printer has one form
    assert str(parse(" mul( abs(mul(W,W)) ,mms( G ) ) ")) == "mul(abs(mul(W, W)), mms(G))"


def test_presets_are_names_for_their_expressions():
    assert parse("wanda") == parse("mul(W, X)")
    assert parse("magnitude") == Expr("W")
    assert parse("pruner-zero") == parse(PRESETS["pruner-zero"])
    assert parse("pruner-zero").terminals == {"W", "G"}


@pytest.mark.parametrize(
    ("text", "position", "why"),
    [
        ("mul(W, Y)", 7, "unknown symbol 'Y'"),
        ("mul(W X)", 6, "expected ','"),
        ("mul(W, X", 8, "expected ')' closing mul"),
        ("W)", 1, "unexpected ')'"),
        ("sqrt W", 5, "expected '(' after sqrt"),
        ("", 0, "empty"),
        ("wandaa", 0, "unknown symbol 'wandaa'"),
    ],
)
def test_a_bad_expression_names_the_position_and_the_allowed_symbols(text, position, why):
    with pytest.raises(ExpressionError) as err:
        parse(text)
    msg = str(err.value)
    assert why in msg and f"position {position}" in msg
    assert "terminals W G X" in msg and "binary add sub mul div" in msg


def test_too_deep_is_refused_with_the_limit():
    deep = "W"
    for _ in range(5):
        deep = f"neg({deep})"
    assert parse(deep, max_depth=5).depth == 5
    with pytest.raises(ExpressionError, match="5 levels deep; at most 4"):
        parse(deep, max_depth=4)


@pytest.mark.parametrize(
    ("text", "simple"),
    [
        ("neg(neg(G))", "G"),
        ("sqrt(sqr(neg(W)))", "W"),  # sqrt(sqr(x)) = |x|, and |W| needs no abs
        ("sqr(sqrt(sub(W, G)))", "abs(sub(W, G))"),
        ("exp(log(sub(W, G)))", "abs(sub(W, G))"),
        ("log(exp(sub(W, G)))", "sub(W, G)"),
        ("abs(mul(W, X))", "mul(W, X)"),
        ("mul(X, W)", "mul(W, X)"),
        ("mul(W, W)", "sqr(W)"),
        ("mul(neg(W), neg(G))", "mul(G, W)"),
        ("add(W, neg(G))", "sub(W, G)"),
        ("mms(zsn(mul(W, G)))", "mms(mul(G, W))"),
        ("id(id(X))", "X"),
        ("abs(mul(W, W))", "sqr(W)"),
    ],
)
def test_opposing_operations_cancel(text, simple):
    assert str(simplify(parse(text))) == simple


def test_simplifying_twice_changes_nothing_and_never_deepens():
    rng = random.Random(1)
    for _ in range(500):
        e = random_expr(rng, 5)
        s = simplify(e)
        assert simplify(s) == s
        assert s.depth <= e.depth and s.size <= e.size
        r = ranking_form(e)
        assert ranking_form(r) == r and r.size <= s.size


@pytest.mark.parametrize(
    ("text", "form"),
    [
        ("zsn(mms(mul(X, W)))", "mul(W, X)"),
        ("div(mul(W, X), G)", "mul(W, X)"),
        ("sqrt(mul(W, G))", "mul(G, W)"),
        ("log(sqr(W))", "W"),
        ("exp(W)", "W"),
        ("pruner-zero", "mul(mms(G), sqr(W))"),
        ("mul(W, div(X, W))", "mul(W, X)"),  # a factor over a norm scales the product
        ("mul(W, div(add(X, X), tanh(W)))", "mul(W, X)"),
        ("mul(W, add(X, div(W, X)))", "mul(W, add(X, div(W, X)))"),  # a summand is no factor
        ("neg(W)", "neg(W)"),  # reverses the order: not dropped
        ("sqr(sub(W, G))", "sqr(sub(W, G))"),  # sqr of a signed value is no monotone map
    ],
)
def test_the_ranking_form_drops_only_order_keeping_outer_maps(text, form):
    assert str(ranking_form(parse(text))) == form


def test_nonnegative_is_never_claimed_for_a_signed_expression():
    assert nonnegative(parse("mul(sqr(G), add(W, X))"))
    for text in ("sub(W, X)", "neg(W)", "log(W)", "zsn(W)", "tanh(sub(W, G))"):
        assert not nonnegative(parse(text))


def test_a_genome_that_codes_no_expression_is_refused():
    for bad in [(), (99,), (encode(parse("mul(W, X)"))[0],), (0, 0)]:
        with pytest.raises(ValueError):
            decode(bad)


# -- the space ---------------------------------------------------------------------

UNITS = [Unit(f"l{i}", "linear", i // 2, shape) for i, shape in
         enumerate([(8, 16), (8, 16), (12, 8), (4, 32)])]


def _space(**kw) -> MetricSpace:
    return MetricSpace(UNITS, MetricSpace.Params(**kw))


def test_every_metric_prunes_each_row_by_the_same_share_so_the_budget_always_holds():
    space = _space(target=0.25)
    assert [space.zeros(u) for u in UNITS] == [8 * 4, 8 * 4, 12 * 2, 4 * 8]
    g = space.genome("pruner-zero")
    assert space.is_feasible(g) and space.cost(g) == space.budget
    assert space.uniform() == space.genome("wanda") == encode(parse("mul(W, X)"))
    assert space.baseline_name == "wanda"
    assert space.summary(g) == {
        "expression": "mul(mms(G), sqr(W))", "pattern": "unstructured", "sparsity": 0.25,
    }
    assert {row["metric"] for row in space.describe(g)} == {"mul(mms(G), sqr(W))"}
    assert SPACES.get("metric") is MetricSpace


def test_n_m_patterns_prune_n_of_every_m():
    space = _space(pattern="2:4")
    assert space.params.sparsity == 0.5
    assert [space.zeros(u) for u in UNITS] == [u.numel // 2 for u in UNITS]
    with pytest.raises(EvocompError, match="not a multiple of 16"):
        _space(pattern="1:16")


def test_further_patterns_prune_the_same_share_each_their_own_way():
    space = _space(also_at=["2:4", "4:8"])
    assert space.params.patterns == ("unstructured", "2:4", "4:8")
    assert [space.zeros(u, "2:4") for u in UNITS] == [u.numel // 2 for u in UNITS]
    assert [space.zeros(u) for u in UNITS] == [u.numel // 2 for u in UNITS]
    assert space.summary(space.uniform())["also_scored_at"] == ["2:4", "4:8"]
    assert "also_scored_at" not in _space().summary(space.uniform())
    assert _space(also_at="2:4").params.also_at == ["2:4"]  # one pattern needs no list
    assert _space(pattern="2:4", also_at=["unstructured"]).params.sparsity == 0.5
    with pytest.raises(EvocompError, match="space.also_at='1:16'"):
        _space(target=1 / 16, also_at=["1:16"])


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"also_at": ["2:4", "2:4"]}, "repeats the pattern '2:4'"),
        ({"also_at": ["unstructured"]}, "repeats the pattern 'unstructured'"),
        ({"also_at": ["1:4"]}, "prunes 1/4 of the weights, pattern 'unstructured' prunes 0.5"),
        ({"also_at": [124]}, "write an N:M pattern in quotes"),
        ({"also_at": ["2-4"]}, "neither 'unstructured' nor 'N:M'"),
        ({"pattern": "4:2"}, "pattern"),
        ({"pattern": "half"}, "pattern"),
        ({"pattern": "2:4", "target": 0.6}, "contradicts"),
        ({"baseline": "mul(W, Q)"}, "unknown symbol 'Q'"),
        ({"max_depth": 0}, "max_depth"),
    ],
)
def test_bad_space_options_are_refused(params, field):
    with pytest.raises(ValidationError, match=field):
        MetricSpace.Params(**params)


def test_validity_is_a_decodable_genome_within_the_depth_limit():
    space = _space(max_depth=2)
    assert space.is_valid(encode(parse("mul(W, abs(X))")))
    assert not space.is_valid(encode(parse("mul(W, abs(neg(X)))")))
    assert not space.is_valid((0, 0))
    with pytest.raises(EvocompError, match="metric-gp"):
        space.mutate(space.uniform(), random.Random(0))
