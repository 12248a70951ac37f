"""A chain of searches: each step searches the whole space from the genome the one
before found; budgets, training and progress of every step reach the runner;
deterministic replay; steps that cannot be chained are refused."""

from __future__ import annotations

from functools import partial

import pytest
from landscapes import (
    bits_space,
    depth_space,
    drive,
    flat_space,
    joint_space,
    loss,
    sparsity_space,
    weighted_loss,
)

from evocomp.errors import EvocompError
from evocomp.search.base import Training
from evocomp.search.chain import Chain, ChainParams
from evocomp.search.evopress import EvoPress
from evocomp.search.genetic import GeneticAlgorithm
from evocomp.spaces import Window

GA = {"population": 4, "offspring": 4, "generations": 5, "tokens": 8}
EVOPRESS = {
    "generations": 6, "offspring": 4,
    "stages": [{"tokens": 8, "keep": 2}, {"tokens": 32, "keep": 1}],
}
STEPS = [{"name": "ga", **GA}, {"name": "evopress", **EVOPRESS}]


def _searched(space):
    """A feasible genome away from uniform: the best of a short GA on ``loss``."""
    opt = GeneticAlgorithm(space, GeneticAlgorithm.Params(**GA))
    drive(opt, space)
    assert opt.best_genome != space.uniform()
    return opt.best_genome


@pytest.mark.parametrize("make", [sparsity_space, bits_space, depth_space])
def test_a_whole_window_holds_every_level_and_starts_at_its_centre(make):
    space = make()
    centre = _searched(space)
    window = Window(space, centre)
    for gene in range(len(space)):
        assert window.fine_levels(gene) == list(range(space.n_levels(gene)))
    assert window.uniform() == centre and window.lift(window.uniform()) == centre


def test_each_step_starts_from_the_genome_the_one_before_found():
    space = sparsity_space()
    opt = Chain(space, ChainParams(steps=STEPS), seed=0)
    first_of_step: dict[int, tuple] = {}
    found_before: dict[int, tuple | None] = {}
    while requests := opt.ask():
        if opt.step not in first_of_step:
            first_of_step[opt.step] = requests[0].genome
            found_before[opt.step] = opt.best_genome
        for r in requests:
            assert space.is_feasible(r.genome)
        opt.tell([loss(space, r.genome) for r in requests])
    assert opt.step == 2 and set(first_of_step) == {0, 1}
    assert found_before[0] is None and first_of_step[0] == space.uniform()
    # EvoPress scores its start (the GA's best) first, on its last stage.
    assert found_before[1] is not None and found_before[1] != space.uniform()
    assert first_of_step[1] == found_before[1]
    assert opt.best_fitness <= loss(space, found_before[1])
    done, total = opt.progress
    assert done == total == GA["generations"] + EVOPRESS["generations"]


def test_the_best_follows_the_running_step():
    """Progress bars and best.json read the best after every tell: within a step it
    is that step's best so far, never lost between steps."""
    space = sparsity_space()
    opt = Chain(space, ChainParams(steps=STEPS), seed=0)
    seen: dict[int, list[float]] = {}
    while requests := opt.ask():
        step = opt.step
        opt.tell([loss(space, r.genome) for r in requests])
        assert opt.best_genome is not None and space.is_feasible(opt.best_genome)
        if opt.step == step:
            seen.setdefault(step, []).append(opt.best_fitness)
    # The GA's best (each genome scored on 8 tokens) falls within its step.
    assert len(seen[0]) == GA["generations"] and seen[0] == sorted(seen[0], reverse=True)
    assert seen[0][-1] < seen[0][0]


def test_ga_then_evopress_beats_evopress_alone_at_equal_evaluations():
    """The reason for chains: on many near-equal genes (uniform close to the optimum,
    as on a compressed LLM) the GA's recombination gains fastest early; EvoPress goes
    on from its genome."""
    space, weights = flat_space(genes=60)
    fitness = partial(weighted_loss, space, weights)
    steps = [
        {"name": "ga", "population": 8, "offspring": 8, "generations": 10, "tokens": 8},
        {"name": "evopress", "generations": 20, "offspring": 8,
         "stages": [{"tokens": 8, "keep": 1}]},
    ]
    def evopress(generations: int, seed: int) -> EvoPress:
        options = {k: v for k, v in steps[1].items() if k not in ("name", "generations")}
        params = EvoPress.Params(generations=generations, **options)
        return EvoPress(space, params, seed=seed)

    per_generation = len(drive(evopress(2, 0), space, fitness)) - len(
        drive(evopress(1, 0), space, fitness)
    )
    chained, alone = [], []
    for seed in range(3):
        chain = Chain(space, ChainParams(steps=steps), seed=seed)
        n = len(drive(chain, space, fitness))
        single = evopress(round(n / per_generation), seed)
        assert abs(len(drive(single, space, fitness)) - n) <= per_generation
        chained.append(chain.best_fitness)
        alone.append(single.best_fitness)
    assert sum(chained) < sum(alone), (chained, alone)


def test_a_replay_with_the_same_fitness_asks_the_same_genomes():
    space = sparsity_space()
    runs = [
        [r.genome for r in drive(Chain(space, ChainParams(steps=STEPS), seed=3), space)]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_every_steps_budgets_and_training_reach_the_runner():
    steps = [{"name": "ga", **GA, "train": {"tokens": [16]}}, {"name": "evopress", **EVOPRESS}]
    space = sparsity_space()
    opt = Chain(space, ChainParams(steps=steps), seed=0)
    assert opt.token_budgets() == {
        "steps[0].tokens": 8, "steps[1].stages[0].tokens": 8, "steps[1].stages[1].tokens": 32,
    }
    assert opt.train_budgets() == {"steps[0].train.tokens[0]": 16}
    asked = drive(opt, space)
    assert {(r.tokens, r.train) for r in asked} == {(8, Training(16)), (8, None), (32, None)}


def test_steps_that_cannot_be_chained_are_refused():
    space = sparsity_space()
    with pytest.raises(ValueError, match="at least 2"):
        ChainParams(steps=[{"name": "ga"}])
    for composite in ("chain", "coarse-to-fine"):
        with pytest.raises(ValueError, match=f"unknown inner optimizer '{composite}'"):
            ChainParams(steps=[{"name": composite}, {"name": "ga"}])
    with pytest.raises(ValueError, match="bad options for inner optimizer 'ga': populaton"):
        ChainParams(steps=[{"name": "ga", "populaton": 3}, {"name": "evopress"}])
    with pytest.raises(EvocompError, match=r"search.steps\[1\].name='nsga2' trades cost"):
        Chain(space, ChainParams(steps=[{"name": "ga"}, {"name": "nsga2"}]))
    with pytest.raises(EvocompError, match="measures the model first"):
        steps = [{"name": "ga"}, {"name": "evopress", "start_from": ["owl"]}]
        Chain(space, ChainParams(steps=steps))
    with pytest.raises(EvocompError, match="cannot restart searches on space 'joint'"):
        Chain(joint_space(), ChainParams(steps=STEPS))
