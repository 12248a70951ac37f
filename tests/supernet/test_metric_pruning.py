"""Metric expressions on tensors: the ``metric`` compressor (Wanda and magnitude as
expressions, N:M, gradients, invalid metrics) and one-shot pruning of a model with
a metric genome (exact per-row sparsity, Wanda's pruned-input propagation, bit-exact
restore, cached masks)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import correlated_inputs, random_expr, random_weight

from evocomp.errors import EvocompError
from evocomp.spaces.metric import MetricSpace, parse, ranking_form, simplify
from evocomp.supernet.compressors import COMPRESSORS, Wanda
from evocomp.supernet.metric import InvalidMetric, Metric, OneShotPruner, metric_scores
from evocomp.supernet.units import find_linear_units

ROWS, COLS = 16, 32


def metric(expression: str, w: torch.Tensor, x: torch.Tensor | None = None,
           g: torch.Tensor | None = None, **params: object) -> Metric:
    comp = Metric(w, Metric.Params(expression=expression, **params))
    if x is not None:
        comp.add_batch(x)
    if g is not None:
        comp.add_gradient(g)
    return comp


def test_wanda_as_an_expression_is_wanda_exactly():
    w, x = random_weight(0, ROWS, COLS), correlated_inputs(512, COLS, 4, 1)
    wanda = Wanda(w)
    wanda.add_batch(x)
    ours = metric("wanda", w, x)
    for level in (0, 37, ROWS * COLS // 2, ROWS * COLS - 3):
        assert torch.equal(ours.compress(level), wanda.compress(level))
    assert COMPRESSORS.get("metric") is Metric


@pytest.mark.parametrize("nm_group", [None, 4])
def test_one_level_by_partial_sort_prunes_what_ranking_prunes(nm_group):
    w, x = random_weight(8, ROWS, COLS), correlated_inputs(256, COLS, 4, 1)
    ranked = metric("wanda", w, x, nm_group=nm_group)
    once = metric("wanda", w, x, nm_group=nm_group)
    once.single_level = True
    for level in (0, ROWS * COLS // 4, ROWS * COLS // 2):
        assert torch.equal(once.compress(level), ranked.compress(level))
    assert once._ranks is None  # never ranked every weight
    if nm_group is None:
        uneven = ROWS * 3 + 1  # rows differ in count: the ranked path, still exact
        assert (once.compress(uneven) == 0).sum() == uneven


def test_magnitude_as_an_expression_prunes_the_smallest_of_each_row():
    w = random_weight(1, ROWS, COLS)
    out = metric("magnitude", w).compress(ROWS * 8)  # needs no calibration
    for row, pruned in zip(w.abs(), out == 0, strict=True):
        assert pruned.sum() == 8
        assert row[pruned].max() <= row[~pruned].min()


def test_n_m_groups_hold_exactly_n_zeros():
    w, x = random_weight(2, ROWS, COLS), correlated_inputs(256, COLS, 4, 1)
    out = metric("mul(sqr(W), X)", w, x, nm_group=4).compress(ROWS * COLS // 2)
    assert ((out == 0).reshape(-1, 4).sum(1) == 2).all()


def test_gradients_are_read_only_by_metrics_that_name_g():
    w = random_weight(3, ROWS, COLS)
    g = random_weight(4, ROWS, COLS).abs()
    assert Metric.needs_gradients(Metric.Params(expression="pruner-zero"))
    assert not Metric.needs_gradients(Metric.Params(expression="wanda"))
    with pytest.raises(EvocompError, match="reads G"):
        metric("mul(W, G)", w).compress(10)
    out = metric("G", w, g=g).compress(ROWS * 4)
    for row, pruned in zip(g, out == 0, strict=True):
        assert row[pruned].max() <= row[~pruned].min()


@pytest.mark.parametrize("text", ["sub(W, W)", "zsn(sub(G, G))", "log(sub(X, X))"])
def test_a_metric_that_cannot_rank_is_invalid(text):
    w, x = random_weight(5, ROWS, COLS), correlated_inputs(64, COLS, 4, 1)
    comp = metric(text, w, x, g=w.abs())
    with pytest.raises(InvalidMetric):
        comp.compress(ROWS * COLS // 2)


def test_the_expression_is_stored_in_its_ranking_form_so_equal_metrics_share_a_database():
    assert Metric.Params(expression="zsn(mul(X, W))").expression == "mul(W, X)"
    with pytest.raises(ValueError, match="unknown symbol 'Y' at position 7"):
        Metric.Params(expression="mul(W, Y)")


def _kept_half(scores: torch.Tensor) -> torch.Tensor:
    """The mask of each row's higher-scoring half (stable ties, as the pruners)."""
    order = scores.argsort(dim=1, stable=True)[:, COLS // 2:]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


def test_simplified_and_ranking_forms_prune_the_same_weights():
    """The simplification rules are sound on real tensors: random metrics and their
    ranking forms keep the same weights (up to rounding; in float64, because in
    float32 a normalisation of a tensor with a huge outlier collapses the small
    scores into ties, which its ranking form, without the normalisation, keeps apart)."""
    rng = random.Random(0)
    w = random_weight(6, ROWS, COLS)
    g = random_weight(7, ROWS, COLS).abs()
    x = correlated_inputs(256, COLS, 4, 1).square().mean(0).sqrt()
    compared = 0
    for _ in range(300):
        e = random_expr(rng, 4)
        full = metric_scores(e, w, g, x, dtype=torch.float64)
        if not torch.isfinite(full).all() or (full == full.flatten()[0]).all():
            continue
        for form in (simplify(e), ranking_form(e)):
            other = metric_scores(form, w, g, x, dtype=torch.float64)
            agree = (_kept_half(full) == _kept_half(other)).float().mean().item()
            assert agree > 0.99, (str(e), str(form), agree)
        compared += 1
    assert compared > 150


# -- one-shot pruning of a model --------------------------------------------------


def _pruner(model, calibration, **space) -> OneShotPruner:
    units = find_linear_units(model)
    space = MetricSpace(units, MetricSpace.Params(**space))
    grads = {u.name: torch.rand(u.shape, generator=torch.Generator().manual_seed(0))
             for u in units}
    return OneShotPruner(model, space, calibration, gradients=lambda: grads, batch_size=2)


def test_one_shot_pruning_is_exact_per_row_and_restores_the_model(tiny_model):
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    pruner = _pruner(tiny_model, calibration, target=0.25)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    genome = pruner.space.genome("pruner-zero")
    with pruner.apply(genome) as model:
        for u in pruner.space.units:
            w = model.get_submodule(u.name).weight
            assert ((w == 0).sum(1) == u.shape[1] // 4).all()
    for n, p in tiny_model.named_parameters():
        assert torch.equal(p, before[n]), n


def _wanda_masks(model, calibration, pruner, block: int) -> dict[str, torch.Tensor]:
    """Plain Wanda masks of ``block``'s units, from a whole-model forward."""
    comps, handles = {}, []
    for u in pruner.space.units:
        if u.block == block:
            module = model.get_submodule(u.name)
            comps[u.name] = comp = Wanda(module.weight)
            handles.append(module.register_forward_hook(
                lambda _m, a, _o, c=comp: c.add_batch(a[0])))
    with torch.no_grad():
        model(calibration, use_cache=False)
    for h in handles:
        h.remove()
    zeros = {u.name: pruner.space.zeros(u) for u in pruner.space.units}
    return {n: c.compress(zeros[n]) != 0 for n, c in comps.items()}


def test_later_blocks_see_the_pruned_outputs_of_earlier_ones(tiny_model):
    """Wanda's order: block 0 is pruned on the dense inputs, block 1 on inputs that
    went through the pruned block 0."""
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    pruner = _pruner(tiny_model, calibration)
    kept = pruner.kept(pruner.space.genome("wanda"))
    for name, mask in _wanda_masks(tiny_model, calibration, pruner, 0).items():
        assert torch.equal(mask, kept[name]), name
    dense_block1 = _wanda_masks(tiny_model, calibration, pruner, 1)
    with torch.no_grad():
        for u in pruner.space.units:
            if u.block == 0:
                tiny_model.get_submodule(u.name).weight.mul_(kept[u.name])
    pruned_block1 = _wanda_masks(tiny_model, calibration, pruner, 1)
    for name, mask in pruned_block1.items():
        assert torch.equal(mask, kept[name]), name
    assert any(not torch.equal(dense_block1[n], pruned_block1[n]) for n in pruned_block1)


def test_dense_propagation_measures_x_once_on_the_dense_model(tiny_model, monkeypatch):
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    pruner = _pruner(tiny_model, calibration, propagate="dense")
    kept = pruner.kept(pruner.space.genome("wanda"))
    for block in (0, 1):
        for name, mask in _wanda_masks(tiny_model, calibration, pruner, block).items():
            assert torch.equal(mask, kept[name]), name
    # Later metrics reuse the statistics: no calibration forward at all.
    monkeypatch.setattr(tiny_model, "forward", lambda *a, **k: pytest.fail("forward ran"))
    assert pruner.kept(pruner.space.genome("mul(sqr(W), X)"))


def test_masks_are_cached_per_genome_and_pattern(tiny_model, monkeypatch):
    calibration = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    pruner = _pruner(tiny_model, calibration, pattern="2:4", also_at=["unstructured"])
    calls = []
    real = OneShotPruner._prune
    monkeypatch.setattr(OneShotPruner, "_prune",
                        lambda self, e, p: calls.append((e, p)) or real(self, e, p))
    genome = pruner.space.genome("mul(W, X)")
    first = pruner.kept(genome)
    again = pruner.kept(genome, "2:4")
    assert len(calls) == 1
    assert all(torch.equal(first[n], again[n]) for n in first)
    for u in pruner.space.units:
        assert (first[u.name].reshape(-1, 4).sum(1) == 2).all()
    # The search scores it at both patterns; the unstructured masks are pruned once.
    assert [label for label, _ in pruner.scored_as(genome)] == ["2:4", "unstructured"]
    rows = pruner.kept(genome, "unstructured")
    assert pruner.kept(genome, "unstructured") is not rows and len(calls) == 2
    for u in pruner.space.units:
        kept = rows[u.name].sum(1)
        assert (kept == kept[0]).all() and int(kept[0]) == u.shape[1] // 2
        assert not (rows[u.name].reshape(-1, 4).sum(1) == 2).all()


def test_an_invalid_metric_raises_before_the_model_changes(tiny_model):
    calibration = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    pruner = _pruner(tiny_model, calibration)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    with pytest.raises(InvalidMetric), pruner.apply(pruner.space.genome("sub(W, W)")):
        pass
    for n, p in tiny_model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert parse("sub(W, W)").terminals == {"W"}
