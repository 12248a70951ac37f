import math
import random

import deap.creator
import pytest
from landscapes import (
    bits_space,
    cli_search,
    depth_space,
    drive_valid,
    exact_front,
    extremes,
    hypervolume,
    joint_space,
    loss,
    points,
    random_valid,
    reference,
    sparsity_space,
)
from pydantic import ValidationError

from evocomp.search import NSGA2, OPTIMIZERS
from evocomp.search.base import pareto_front

SMALL = {"population": 12, "offspring": 12, "generations": 8, "tokens": 64}


def _nsga(space, seed=0, **params):
    opt = NSGA2(space, NSGA2.Params(**(SMALL | params)), seed=seed)
    return opt, drive_valid(opt, space)


def _non_dominated(front) -> bool:
    return not any(
        a[1] <= b[1] and a[2] <= b[2] and (a[1], a[2]) != (b[1], b[2]) for a in front for b in front
    )


@pytest.mark.parametrize(
    "make",
    [sparsity_space, bits_space, depth_space, joint_space],
    ids=["sparsity", "bits", "depth-block", "joint-sparsity-bits"],
)
def test_every_request_is_valid_and_new_and_the_first_spans_the_cost_range(make):
    space = make()
    opt, asked = _nsga(space, 0, population=8, offspring=8, generations=4)
    genomes = [r.genome for r in asked]  # drive_valid checked each is valid and new
    assert genomes[0] == space.uniform()
    first = [space.cost(g) for g in genomes[:8]]
    cheapest, dearest = extremes(space)
    assert min(first) == space.cost(cheapest) and max(first) == space.cost(dearest)
    assert any(not space.is_feasible(g) for g in genomes)  # the budget does not bind
    assert opt.progress == (4, 4) and len(genomes) > 8  # the search moved


@pytest.mark.parametrize("make", [sparsity_space, bits_space], ids=["sparsity", "bits"])
def test_front_is_non_dominated_and_spans_the_cost_range(make):
    """On landscapes where compressing less always helps (so the dearest genome is
    the best one and the cheapest the worst), the front reaches both ends."""
    space = make()
    opt, asked = _nsga(space, 1)
    front = opt.front()
    assert _non_dominated(front) and len(front) >= 8
    evaluated = {r.genome: loss(space, r.genome) for r in asked}
    assert all(evaluated[g] == f and space.cost(g) == c for g, f, c in front)
    assert front == pareto_front(points(space, evaluated))  # nothing evaluated beats it
    cheapest, dearest = extremes(space)
    assert front[0][2] == space.cost(cheapest) and front[-1][2] == space.cost(dearest)
    costs = [c for _, _, c in front]
    gaps = [b - a for a, b in zip(costs, costs[1:], strict=False)]
    assert max(gaps) < 0.25 * (costs[-1] - costs[0])  # spread, not two clusters


@pytest.mark.parametrize("make", [sparsity_space, bits_space], ids=["sparsity", "bits"])
def test_front_dominates_more_hypervolume_than_random_genomes(make):
    """At equal evaluations NSGA-II's front beats random valid genomes spread over
    the cost range (walks of random rise), and closes most of their gap to the
    exact front."""
    space = make()
    ref = reference(space)
    best = hypervolume(exact_front(space), ref)
    nsga_gap, rnd_gap = 0.0, 0.0
    for seed in range(3):
        opt, asked = _nsga(space, seed, population=16, offspring=16, generations=12)
        ours = hypervolume(opt.front(), ref)
        rnd = hypervolume(points(space, random_valid(space, seed, len(asked))), ref)
        assert ours > rnd, (seed, ours, rnd)
        nsga_gap += best - ours
        rnd_gap += best - rnd
    assert nsga_gap < 0.7 * rnd_gap, (nsga_gap, rnd_gap)


def test_best_genome_is_the_best_within_the_budget():
    space = sparsity_space()
    opt, asked = _nsga(space, 2)
    feasible = [r.genome for r in asked if space.is_feasible(r.genome)]
    assert space.is_feasible(opt.best_genome)
    assert opt.best_fitness == min(loss(space, g) for g in feasible)
    assert opt.best_fitness > min(loss(space, r.genome) for r in asked)  # dearer ones exist
    assert not NSGA2.budgeted and not opt.budgeted


def test_same_seed_same_requests_other_seed_other_path():
    runs = [_nsga(sparsity_space(), seed)[1] for seed in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_replay_from_recorded_fitness_gives_the_same_search():
    """What resume does: a fresh optimizer with the seed, fed the stored fitness."""
    space = bits_space()
    first, asked = _nsga(space, 5)
    stored = {r.genome: loss(space, r.genome) for r in asked}
    replay = NSGA2(space, NSGA2.Params(**SMALL), seed=5)
    again = []
    while requests := replay.ask():
        again += requests
        replay.tell([stored[r.genome] for r in requests])
    assert again == asked
    assert replay.front() == first.front() and replay.best_genome == first.best_genome


def test_neither_deap_creator_nor_global_random_is_touched():
    creator = dict(vars(deap.creator))
    random.seed(1234)
    state = random.getstate()
    _nsga(sparsity_space(), 0, population=4, offspring=4, generations=3)
    assert random.getstate() == state
    assert dict(vars(deap.creator)) == creator


def test_diverged_genomes_are_recorded_but_never_bred_from():
    space = sparsity_space()
    opt = NSGA2(space, NSGA2.Params(**SMALL), seed=0)
    diverged, asked = set(), []
    while requests := opt.ask():
        asked += [r.genome for r in requests]
        fitness = [loss(space, r.genome) for r in requests]
        for k in range(0, len(requests), 3):
            fitness[k] = math.nan
            diverged.add(requests[k].genome)
        opt.tell(fitness)
    assert opt.progress == (8, 8) and math.isfinite(opt.best_fitness)
    assert len(set(asked)) == len(asked)
    assert not diverged & {g for g, _, _ in opt.front()}


def test_pareto_front_keeps_ties_and_drops_dominated_and_diverged_points():
    pts = [
        ((0,), 5.0, 10),
        ((1,), 5.0, 10),  # a tie: both stay
        ((2,), 6.0, 10),  # same cost, worse
        ((3,), 5.0, 12),  # dearer, no better
        ((4,), 2.0, 20),
        ((5,), math.nan, 1),
        ((6,), 9.0, 3),
    ]
    assert [g for g, _, _ in pareto_front(pts)] == [(6,), (0,), (1,), (4,)]
    assert pareto_front([]) == []


@pytest.mark.parametrize(
    "params",
    [
        {"typo": 1},
        {"crossover": 0.7, "mutation": 0.5},
        {"population": 3},
        {"offspring": 0},
        {"tournament": 3},  # parents come from dominance and crowding, not tournaments
        {"operator": "one-point"},
        {"max_switches": 0},
        {"tokens": 0},
    ],
)
def test_bad_params_are_rejected(params):
    with pytest.raises(ValidationError):
        NSGA2.Params(**params)


def test_registered_by_name():
    assert OPTIMIZERS.get("nsga2") is NSGA2


def test_nsga2_search_through_the_cli(tmp_path, tiny_model_dir, monkeypatch):
    """Needs the runner to check validity, not feasibility, for unbudgeted optimizers."""
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))
    best = cli_search(
        tmp_path,
        tiny_model_dir,
        {"name": "nsga2", "generations": 2, "population": 4, "offspring": 4, "tokens": 64},
    )
    assert best["cost"] <= best["budget"]
    assert best["progress"] == [2, 2]
