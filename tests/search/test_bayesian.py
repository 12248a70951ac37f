from functools import partial

import optuna
import pytest
from landscapes import (
    bits_space,
    cli_search,
    depth_space,
    drive,
    drive_valid,
    exact_front,
    extremes,
    flat_space,
    hypervolume,
    joint_space,
    loss,
    moved,
    points,
    random_best,
    random_valid,
    reference,
    sparsity_space,
    weighted_loss,
)
from pydantic import ValidationError

from evocomp.search import OPTIMIZERS, OptunaSearch
from evocomp.search.base import pareto_front
from evocomp.spaces import BitsSpace, SparsitySpace
from evocomp.spaces.units import Unit


def _search(space, seed=0, **params):
    opt = OptunaSearch(space, OptunaSearch.Params(**params), seed=seed)
    return opt, drive(opt, space)


def test_tpe_beats_random_search_at_equal_evaluations():
    tpe, rnd = [], []
    for seed in range(2):
        space = sparsity_space()
        opt, asked = _search(space, seed, sampler="tpe", trials=128, startup=32, tokens=64)
        assert len(asked) == 128 and opt.progress == (128, 128)
        assert space.cost(opt.best_genome) <= space.budget
        tpe.append(opt.best_fitness)
        rnd.append(random_best(sparsity_space(), seed, len(asked)))
    assert sum(tpe) < 0.85 * sum(rnd), (tpe, rnd)


def _small(genes: int = 4, levels: int = 2) -> SparsitySpace:
    units = [Unit(f"l{i}", "linear", i, (16, 16)) for i in range(genes)]
    return SparsitySpace(units, SparsitySpace.Params(target=0.5, step=0.1, levels=levels))


def test_gp_is_feasible_and_deterministic():
    # The GP's acquisition search costs ~0.5 s per trial on 10 genes: keep it tiny.
    params = {"sampler": "gp", "trials": 6, "startup": 3, "batch": 3, "tokens": 64}
    a, asked_a = _search(_small(), 0, **params)
    b, asked_b = _search(_small(), 0, **params)
    assert asked_a == asked_b and len(asked_a) == 6
    assert a.best_genome == b.best_genome


@pytest.mark.parametrize("sampler", ["tpe", "random"])
@pytest.mark.parametrize(
    "make", [depth_space, joint_space], ids=["depth-block", "joint-sparsity-bits"]
)
def test_every_request_is_feasible_and_new(make, sampler):
    space = make()
    opt, asked = _search(space, 0, sampler=sampler, trials=24, startup=8, batch=4, tokens=64)
    genomes = [r.genome for r in asked]
    assert all(space.is_feasible(g) for g in genomes)  # also checked in _drive
    assert len(set(genomes)) == len(genomes)  # never the same genome twice
    assert genomes[0] == space.uniform()  # the enqueued baseline
    assert all(len(batch) <= 4 for batch in [genomes[i : i + 4] for i in range(0, 24, 4)])
    assert opt.best_fitness == min(loss(space, g) for g in genomes)


def _constraints(trial) -> list[float]:
    if hasattr(trial, "constraints"):  # optuna >= 5
        return list(trial.constraints.values())
    return list(trial.system_attrs["constraints"])


def test_sampler_learns_the_budget_as_a_constraint():
    space = sparsity_space()
    opt, asked = _search(space, 0, sampler="tpe", trials=32, startup=8, tokens=64)
    trials = opt.study.trials
    evaluated = {r.genome for r in asked}
    over = 0
    for t in trials:
        genome = tuple(t.params[n] for n in space.param_names())
        excess = (space.cost(genome) - space.budget) / space.budget
        assert _constraints(t) == pytest.approx([excess])
        over += excess > 0
        if excess > 0:
            assert genome not in evaluated  # over-budget proposals are never evaluated
    assert over > 0
    # Every evaluated genome is also a trial of the study (added when repair changed it).
    named = {tuple(t.params[n] for n in space.param_names()) for t in trials}
    assert evaluated <= named


def test_same_seed_same_requests_other_seed_other_path():
    runs = [_search(sparsity_space(), seed, trials=24, startup=8)[1] for seed in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_replay_from_recorded_fitness_gives_the_same_search():
    """What resume does: a fresh optimizer with the seed, fed the stored fitness."""
    space = sparsity_space()
    first, asked = _search(space, 5, trials=24, startup=8)
    stored = {r.genome: loss(space, r.genome) for r in asked}
    replay = OptunaSearch(space, OptunaSearch.Params(trials=24, startup=8), seed=5)
    again = []
    while requests := replay.ask():
        again += requests
        replay.tell([stored[r.genome] for r in requests])
    assert again == asked and replay.best_genome == first.best_genome


def test_a_search_that_finds_nothing_new_stops():
    space = _small(genes=2, levels=1)
    opt, asked = _search(space, 0, sampler="tpe", trials=50, startup=4, batch=2)
    # Two equal layers, three levels each, on budget: only 3 genomes exist.
    assert sorted(r.genome for r in asked) == [(0, 2), (1, 1), (2, 0)]
    assert opt.progress == (3, 50)


def test_proposals_that_repeat_a_pending_genome_count_as_stale():
    """Only one genome fits: every proposal of the first batch repairs onto the
    queued start, which is pending, not yet known. The search must still end."""
    space = bits_space()
    space = BitsSpace(space.units, BitsSpace.Params(target=2, bits=[2, 3]))
    opt, asked = _search(space, 0, trials=4, startup=2, batch=3)
    assert [r.genome for r in asked] == [space.uniform()]


def test_non_finite_fitness_fails_the_trial_without_stopping_the_search():
    space = sparsity_space()
    opt = OptunaSearch(space, OptunaSearch.Params(trials=8, startup=2, batch=4), seed=0)
    while requests := opt.ask():
        opt.tell(
            [float("nan") if i == 0 else loss(space, r.genome) for i, r in enumerate(requests)]
        )
    assert opt.progress == (8, 8) and opt.best_fitness < float("inf")
    assert any(t.state.name == "FAIL" for t in opt.study.trials)


@pytest.mark.parametrize(
    "params",
    [
        {"typo": 1},
        {"sampler": "cmaes", "objectives": "quality+cost"},
        {"sampler": "bogus"},
        {"sigma": 0},
        {"objectives": "cost"},
        {"population": 1},
        {"trials": 0},
        {"batch": 0},
        {"startup": -1},
        {"tokens": 0},
    ],
)
def test_bad_params_are_rejected(params):
    with pytest.raises(ValidationError):
        OptunaSearch.Params(**params)


def test_default_sampler_is_cmaes_for_quality_and_tpe_for_fronts():
    assert OptunaSearch.Params().sampler == "cmaes"
    assert OptunaSearch.Params(objectives="quality+cost").sampler == "tpe"
    assert OptunaSearch.Params(objectives="quality+cost", sampler="nsga2").sampler == "nsga2"


def test_registered_by_name():
    assert OPTIMIZERS.get("optuna") is OptunaSearch


# -- NSGA-II, and quality + cost ---------------------------------------------------------


def test_nsga2_sampler_keeps_the_budget_and_learns_it_as_a_constraint():
    space = sparsity_space()
    params = {"sampler": "nsga2", "trials": 32, "population": 8, "batch": 4, "tokens": 64}
    opt, asked = _search(space, 0, **params)  # drive() checks every request is feasible
    assert opt.budgeted and len(asked) == 32
    assert len({r.genome for r in asked}) == 32
    proposals = [t for t in opt.study.trials if t.state.name == "COMPLETE"]
    assert any(_constraints(t)[0] > 0 for t in proposals)
    assert _search(space, 0, **params)[1] == asked  # seeded


# -- CMA-ES: small moves from a strong uniform start -----------------------------------


def _best_over_uniform(space, weights, seed, **params) -> tuple[float, list]:
    opt = OptunaSearch(space, OptunaSearch.Params(tokens=64, **params), seed=seed)
    fitness = partial(weighted_loss, space, weights)
    asked = drive(opt, space, fitness)
    assert opt.best_fitness == min(fitness(r.genome) for r in asked)
    return opt.best_fitness / fitness(space.uniform()), asked


def test_cmaes_leaves_a_strong_uniform_start_where_tpe_cannot():
    """210 genes, 62 trials (the SmolLM2 optimizer benchmark's shape): TPE's per-gene
    draws change too many genes and never beat the start; CMA-ES around it does."""
    space, weights = flat_space()
    for seed in (0, 1):
        tpe, _ = _best_over_uniform(space, weights, seed, sampler="tpe", trials=62)
        cma, asked = _best_over_uniform(space, weights, seed, sampler="cmaes", trials=62)
        assert cma < tpe == 1.0, (seed, tpe, cma)
        genomes = [r.genome for r in asked]
        assert genomes[0] == space.uniform() and len(set(genomes)) == len(genomes) == 62
        # Small moves: a typical proposal keeps most genes at the uniform level.
        genes = sorted(moved(g, space.uniform()) for g in genomes[1:])
        assert 0 < genes[len(genes) // 2] < len(space) // 5, genes


def test_tpe_beats_cmaes_where_uniform_is_far_from_good():
    """Ten genes of very unequal weight: large moves pay, which TPE makes."""
    space, weights = flat_space(genes=10, spread=1.0)
    tpe = sum(_best_over_uniform(space, weights, s, sampler="tpe", trials=62)[0] for s in (0, 1))
    cma = sum(_best_over_uniform(space, weights, s, sampler="cmaes", trials=62)[0] for s in (0, 1))
    assert tpe < cma, (tpe, cma)


def test_cmaes_is_seeded_replays_and_sets_no_constraint():
    space, weights = flat_space(genes=40)
    params = {"sampler": "cmaes", "trials": 24, "population": 8, "batch": 8}
    _, asked = _best_over_uniform(space, weights, 3, **params)
    assert _best_over_uniform(space, weights, 3, **params)[1] == asked
    assert _best_over_uniform(space, weights, 4, **params)[1] != asked
    stored = {r.genome: weighted_loss(space, weights, r.genome) for r in asked}
    replay = OptunaSearch(space, OptunaSearch.Params(tokens=64, **params), seed=3)
    again = []
    while requests := replay.ask():
        again += requests
        replay.tell([stored[r.genome] for r in requests])
    assert again == asked
    assert all(not _constraints(t) for t in replay.study.trials)


def _front_search(space, seed=0, **params):
    params = {"objectives": "quality+cost", "tokens": 64} | params
    opt = OptunaSearch(space, OptunaSearch.Params(**params), seed=seed)
    return opt, drive_valid(opt, space)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random"])
@pytest.mark.parametrize(
    "make", [depth_space, joint_space], ids=["depth-block", "joint-sparsity-bits"]
)
def test_quality_cost_requests_are_valid_new_and_unbudgeted(make, sampler):
    space = make()
    opt, asked = _front_search(
        space, 0, sampler=sampler, trials=24, startup=6, batch=4, population=8
    )
    assert not opt.budgeted and OptunaSearch.budgeted  # per run, from the params
    genomes = [r.genome for r in asked]  # drive_valid checked each is valid and new
    assert genomes[0] == space.uniform()  # the enqueued baseline comes first
    assert any(not space.is_feasible(g) for g in genomes)
    assert space.is_feasible(opt.best_genome)
    assert opt.best_fitness == min(loss(space, g) for g in genomes if space.is_feasible(g))
    assert opt.study.directions == [optuna.study.StudyDirection.MINIMIZE] * 2
    for t in opt.study.trials:
        genome = space.make_valid(tuple(t.params[n] for n in space.param_names()))
        assert t.values == [loss(space, genome), space.cost(genome)]
        assert not _constraints(t)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_quality_cost_front_is_non_dominated_and_spans_the_cost_range(sampler):
    space = sparsity_space()
    opt, asked = _front_search(space, 1, sampler=sampler, trials=64, population=16)
    front = opt.front()
    assert len(front) >= 8 and front == pareto_front(points(space, [r.genome for r in asked]))
    cheapest, dearest = extremes(space)
    assert front[0][2] == space.cost(cheapest) and front[-1][2] == space.cost(dearest)


@pytest.mark.parametrize(
    "sampler, make, trials, seeds",
    [("nsga2", sparsity_space, 200, 3), ("tpe", bits_space, 96, 2)],
    ids=["nsga2-sparsity", "tpe-bits"],
)
def test_quality_cost_front_beats_random_genomes(sampler, make, trials, seeds):
    """More hypervolume than as many random valid genomes spread over the cost range.
    (Optuna's NSGA-II needs ~200 trials on 10 genes, and still trails random walks
    on the bits landscape; DEAP's nsga2 beats them on both.)"""
    space = make()
    ref = reference(space)
    best = hypervolume(exact_front(space), ref)
    ours, rnd = 0.0, 0.0
    for seed in range(seeds):
        opt, asked = _front_search(space, seed, sampler=sampler, trials=trials, population=16)
        ours += hypervolume(opt.front(), ref)
        rnd += hypervolume(points(space, random_valid(space, seed, len(asked))), ref)
    assert ours > rnd and ours <= seeds * best * (1 + 1e-9), (ours, rnd, best)


def test_gp_takes_two_objectives():
    params = {"sampler": "gp", "trials": 6, "startup": 3, "batch": 3}
    a, asked_a = _front_search(_small(), 0, **params)
    b, asked_b = _front_search(_small(), 0, **params)
    assert asked_a == asked_b and len(asked_a) == 6 and a.front() == b.front()


def test_quality_cost_replay_from_recorded_fitness_gives_the_same_search():
    space = bits_space()
    params = {"objectives": "quality+cost", "trials": 24, "startup": 8, "tokens": 64}
    first, asked = _front_search(space, 5, **params)
    stored = {r.genome: loss(space, r.genome) for r in asked}
    replay = OptunaSearch(space, OptunaSearch.Params(**params), seed=5)
    again = []
    while requests := replay.ask():
        again += requests
        replay.tell([stored[r.genome] for r in requests])
    assert again == asked and replay.front() == first.front()


def test_optuna_search_through_the_cli(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))
    best = cli_search(
        tmp_path,
        tiny_model_dir,
        {"name": "optuna", "trials": 12, "startup": 4, "batch": 4, "tokens": 64},
    )
    assert best["cost"] <= best["budget"]
    assert best["progress"] == [12, 12]
