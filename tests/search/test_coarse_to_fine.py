"""Coarse-to-fine search (Týr): windows on the finest grid, re-centred and halved
each iteration; every request a feasible fine genome; deterministic replay."""

from __future__ import annotations

import random

import pytest
from conftest import tiny_llama
from landscapes import WEIGHTS, drive, loss

from evocomp.errors import EvocompError
from evocomp.search.coarse_to_fine import CoarseToFine, CoarseToFineParams
from evocomp.search.evopress import EvoPress
from evocomp.spaces import BitsSpace, SparsitySpace, Window
from evocomp.spaces.units import Unit
from evocomp.spaces.width import WidthParams, WidthSpace
from evocomp.supernet.units import find_sublayer_units

UNITS = [Unit(f"l{i}", "linear", i, (16, 16)) for i in range(len(WEIGHTS))]
INNER = {
    "name": "evopress", "generations": 10, "offspring": 4, "stages": [{"tokens": 8, "keep": 1}]
}


def _fine(params: CoarseToFineParams) -> SparsitySpace:
    coarse = SparsitySpace.Params(target=0.5, step=0.1, levels=4)
    return SparsitySpace(UNITS, CoarseToFine.space_params(params, SparsitySpace, coarse))


def test_the_space_is_the_finest_grid_over_the_same_range():
    params = CoarseToFineParams(iterations=3, inner=INNER)
    fine = _fine(params)
    assert fine.n_levels(0) == 2 * 4 * 4 + 1
    sparsities = [fine.describe_level(0, lv)["sparsity"] for lv in range(fine.n_levels(0))]
    assert sparsities == sorted(sparsities)
    assert min(sparsities) == pytest.approx(0.125) and max(sparsities) == pytest.approx(0.875)
    assert fine.budget == 10 * 128  # the uniform 50% start, as on the coarse grid


def test_a_window_holds_the_levels_nearest_centre_plus_k_steps():
    fine = _fine(CoarseToFineParams(iterations=3, inner=INNER))
    centre = fine.uniform()
    window = Window(fine, centre, step=0.1, radius=2)
    assert window.uniform() == window.lower(centre) and window.lift(window.uniform()) == centre
    kept = [window.position(0, lv) for lv in range(window.n_levels(0))]
    # 16x16 = 256 weights, fine levels 6 zeros apart: nearest to 0.7, 0.6, ..., 0.3 kept
    # (sparsity levels are listed sparser, so cheaper, as they rise).
    assert kept == pytest.approx([182 / 256, 152 / 256, 0.5, 104 / 256, 74 / 256])
    for lv in range(window.n_levels(0)):
        fine_lv = window.fine_levels(0)[lv]
        assert window.level_cost(0, lv) == fine.level_cost(0, fine_lv)
        assert window.variant(0, lv) == fine.variant(0, fine_lv)
    assert window.budget == fine.budget
    # A grid finer than the fine space merges into the levels it has.
    tiny = Window(fine, centre, step=0.001, radius=4)
    assert [tiny.n_levels(i) for i in range(len(tiny))] == [1] * len(UNITS)


def test_each_iteration_searches_a_window_half_as_wide_around_the_genome_found():
    params = CoarseToFineParams(iterations=3, levels=2, inner=INNER)
    fine = _fine(params)
    opt = CoarseToFine(fine, params, seed=0)
    centres, spans, asked = [fine.uniform()], [], []
    seen_iteration = 0
    while requests := opt.ask():
        if opt.iteration != seen_iteration:  # a new window: centred on the best so far
            seen_iteration = opt.iteration
            centres.append(opt.best_genome)
        for r in requests:
            assert fine.is_feasible(r.genome)
            c = centres[-1]
            spans.append((opt.iteration, max(
                abs(fine.position(i, g) - fine.position(i, c[i])) for i, g in enumerate(r.genome)
            )))
        asked += requests
        opt.tell([loss(fine, r.genome) for r in requests])
        done, total = opt.progress
        assert done <= total and total == 3 * 10
    assert opt.iteration == 3 and len(centres) == 3 and opt.progress == (30, 30)
    for it in range(3):
        widest = max(s for i, s in spans if i == it)
        # radius 2 × step (0.1, 0.05, 0.025), plus half a fine level of rounding
        assert widest <= 2 * 0.1 / 2**it + 0.0125, (it, widest)
    assert opt.best_fitness <= min(loss(fine, c) for c in centres)


def test_coarse_to_fine_beats_one_pass_on_the_finest_grid_at_equal_evaluations():
    params = CoarseToFineParams(iterations=3, inner=INNER)
    fine = _fine(params)
    c2f, one = [], []
    for seed in range(3):
        opt = CoarseToFine(fine, params, seed=seed)
        n = len(drive(opt, fine))
        options = {k: v for k, v in INNER.items() if k != "name"} | {"generations": 30}
        single = EvoPress(fine, EvoPress.Params(**options), seed=seed)
        assert abs(len(drive(single, fine)) - n) <= 3
        c2f.append(opt.best_fitness)
        one.append(single.best_fitness)
    assert sum(c2f) < sum(one), (c2f, one)


def test_a_replay_with_the_same_fitness_asks_the_same_genomes():
    params = CoarseToFineParams(iterations=2, inner=INNER)
    fine = _fine(params)
    runs = []
    for _ in range(2):
        opt = CoarseToFine(fine, params, seed=7)
        runs.append([r.genome for r in drive(opt, fine)])
    assert runs[0] == runs[1]


def test_a_width_grid_finer_than_a_head_merges_instead_of_being_refused():
    units = find_sublayer_units(tiny_llama())
    coarse = WidthParams(target=0.5, step=0.25, levels=2, neuron_multiple=8)
    with pytest.raises(EvocompError, match="finer than one"):
        WidthSpace(units, coarse.model_copy(update={"step": 0.25 / 8}))
    params = CoarseToFineParams(iterations=4, inner=INNER)
    fine = WidthSpace(units, CoarseToFine.space_params(params, WidthSpace, coarse))
    assert fine.params.refine == 8
    for gene, unit in enumerate(fine.units):
        kept = [fine.kept(gene, lv) for lv in range(fine.n_levels(gene))]
        assert set(kept) <= set(fine.valid_counts(unit))
    assert fine.uniform() == WidthSpace(units, coarse).uniform() or fine.budget == (
        WidthSpace(units, coarse).budget
    )
    opt = CoarseToFine(fine, params, seed=0)
    drive(opt, fine)
    assert fine.is_feasible(opt.best_genome)


def test_spaces_without_a_grid_and_optimizers_that_cannot_nest_are_refused():
    params = CoarseToFineParams(inner=INNER)
    bits = BitsSpace.Params(target=4, bits=[2, 3, 4, 5, 6, 8])
    with pytest.raises(EvocompError, match="no level grid to refine.*sparsity.*width"):
        CoarseToFine.space_params(params, BitsSpace, bits)
    fine = _fine(params)
    with pytest.raises(EvocompError, match="search.inner.name='nsga2' trades cost"):
        CoarseToFine(fine, CoarseToFineParams(inner={"name": "nsga2"}))
    with pytest.raises(EvocompError, match="shortgpt"):
        CoarseToFine(
            fine, CoarseToFineParams(inner={"name": "evopress", "start_from": ["shortgpt"]})
        )
    with pytest.raises(ValueError, match="unknown inner optimizer 'coarse-to-fine'"):
        CoarseToFineParams(inner={"name": "coarse-to-fine"})
    with pytest.raises(ValueError, match="bad options for inner optimizer 'evopress': offsprng"):
        CoarseToFineParams(inner={"name": "evopress", "offsprng": 3})


def test_mutations_of_a_window_keep_the_budget():
    fine = _fine(CoarseToFineParams(inner=INNER))
    window = Window(fine, fine.uniform(), step=0.05, radius=4)
    rng = random.Random(0)
    g = window.uniform()
    for _ in range(500):
        g = window.mutate(g, rng, switches=rng.randint(1, 3))
        assert window.is_feasible(g) and fine.is_feasible(window.lift(g))


def test_an_inner_optimizers_training_and_its_budgets_reach_the_runner():
    from evocomp.search.base import Training

    inner = {**INNER, "stages": [{"tokens": 8, "keep": 2}, {"tokens": 16, "keep": 1}],
             "train": {"tokens": [32, 64]}}
    params = CoarseToFineParams(iterations=2, inner=inner)
    fine = _fine(params)
    opt = CoarseToFine(fine, params, seed=0)
    asked = drive(opt, fine)
    assert {(r.tokens, r.train) for r in asked} == {(8, Training(32)), (16, Training(64))}
    assert opt.train_budgets() == {"inner.train.tokens[0]": 32, "inner.train.tokens[1]": 64}
