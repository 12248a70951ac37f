import pytest
from pydantic import ValidationError

from evocomp.search import OPTIMIZERS, EvoPress, Stage
from evocomp.spaces import SparsitySpace
from evocomp.spaces.units import Unit

# A synthetic landscape: layer i hurts in proportion to weight[i] * sparsity^2,
# so the optimum moves sparsity from sensitive layers to robust ones.
WEIGHTS = [8.0, 8.0, 4.0, 4.0, 1.0, 1.0, 0.5, 0.5, 0.1, 0.1]


def _space() -> SparsitySpace:
    units = [Unit(f"l{i}", "linear", i, (16, 16)) for i in range(len(WEIGHTS))]
    return SparsitySpace(units, SparsitySpace.Params(target=0.5, step=0.1, levels=4))


def _loss(space: SparsitySpace, genome, tokens: int) -> float:
    rows = space.describe(genome)
    # Fewer tokens = a noisier estimate, as with real token budgets.
    noise = 0.02 * ((hash((genome, tokens)) % 1000) / 1000 - 0.5) * (1024 / tokens)
    return sum(w * r["sparsity"] ** 2 for w, r in zip(WEIGHTS, rows, strict=True)) + noise


def _run(seed: int, **params):
    space = _space()
    opt = EvoPress(space, EvoPress.Params(**params), seed=seed)
    asked = []
    while requests := opt.ask():
        for r in requests:
            assert space.cost(r.genome) == space.budget
        asked += requests
        opt.tell([_loss(space, r.genome, r.tokens) for r in requests])
    return space, opt, asked


def test_evopress_beats_uniform_and_moves_sparsity_to_robust_layers():
    space, opt, _ = _run(0, generations=60, offspring=8)
    uniform = _loss(space, space.uniform(), 4096)
    assert opt.best_fitness < 0.8 * uniform
    sparsity = [r["sparsity"] for r in space.describe(opt.best_genome)]
    assert sum(sparsity[:2]) < sum(sparsity[-2:])
    assert space.cost(opt.best_genome) == space.budget


def test_same_seed_same_search_other_seed_other_path():
    _, a, asked_a = _run(3, generations=10, offspring=4)
    _, b, asked_b = _run(3, generations=10, offspring=4)
    _, _, asked_c = _run(4, generations=10, offspring=4)
    assert asked_a == asked_b and a.best_genome == b.best_genome
    assert asked_a != asked_c


def test_stages_sieve_offspring_with_growing_budgets():
    _, opt, asked = _run(
        0,
        generations=2,
        offspring=6,
        stages=[{"tokens": 64, "keep": 3}, {"tokens": 512, "keep": 1}],
    )
    per_budget = {}
    for r in asked:
        per_budget[r.tokens] = per_budget.get(r.tokens, 0) + 1
    # First the uniform parent at the final budget, then each generation asks
    # parent + 6 children at 64 tokens and the 3 survivors at 512.
    assert per_budget == {512: 1 + 2 * 3, 64: 2 * 7}
    assert opt.progress == (2, 2)


def test_parent_is_kept_when_no_child_is_better():
    space = _space()
    opt = EvoPress(space, EvoPress.Params(generations=3, offspring=4), seed=0)
    while requests := opt.ask():
        opt.tell([0.0 if r.genome == space.uniform() else 1.0 for r in requests])
    assert opt.best_genome == space.uniform()


@pytest.mark.parametrize(
    "stages, message",
    [
        ([], "at least one"),
        ([{"tokens": 512, "keep": 2}], "shrink to 1"),
        ([{"tokens": 512, "keep": 2}, {"tokens": 64, "keep": 1}], "must grow"),
        ([{"tokens": 0, "keep": 1}], "greater than 0"),
    ],
)
def test_bad_stage_lists_are_rejected(stages, message):
    with pytest.raises(ValidationError, match=message):
        EvoPress.Params(stages=stages)


def test_registered_by_name():
    assert OPTIMIZERS.get("evopress") is EvoPress
    assert Stage(tokens=8, keep=1).keep == 1


def test_best_of_random_start_is_at_least_as_good_as_uniform():
    space = _space()
    opt = EvoPress(space, EvoPress.Params(generations=0, init_samples=12), seed=0)
    first = opt.ask()
    assert len(first) == 13 and first[0].genome == space.uniform()
    opt.tell([_loss(space, r.genome, r.tokens) for r in first])
    assert opt.ask() == []
    assert opt.best_fitness == min(_loss(space, r.genome, r.tokens) for r in first)


def test_evopress_beats_random_search_at_equal_evaluations():
    from evocomp.search import RandomSearch

    _, evo, asked = _run(0, generations=30, offspring=8)
    space = _space()
    rnd = RandomSearch(space, RandomSearch.Params(samples=len(asked), tokens=4096), seed=0)
    while requests := rnd.ask():
        rnd.tell([_loss(space, r.genome, r.tokens) for r in requests])
    assert rnd.progress == (len(asked), len(asked))
    assert evo.best_fitness < rnd.best_fitness


def test_training_aware_stages_ask_for_their_own_training():
    from evocomp.search.base import Training

    space = _space()
    stages = [{"tokens": 256, "keep": 4}, {"tokens": 1024, "keep": 1}]
    train = {"tokens": [100, 400], "lr": 2e-5, "params": "lora"}
    opt = EvoPress(space, EvoPress.Params(generations=2, offspring=4, stages=stages, train=train))
    seen = set()
    while requests := opt.ask():
        seen |= {(r.tokens, r.train) for r in requests}
        opt.tell([_loss(space, r.genome, r.tokens) for r in requests])
    assert seen == {
        (256, Training(100, 2e-5, "adamw", "lora")),
        (1024, Training(400, 2e-5, "adamw", "lora")),
    }
    assert opt.train_budgets() == {"train.tokens[0]": 100, "train.tokens[1]": 400}
    plain = EvoPress(space, EvoPress.Params(stages=stages))
    assert all(r.train is None for r in plain.ask()) and plain.train_budgets() == {}


@pytest.mark.parametrize(
    "stages, train, message",
    [
        ([{"tokens": 256, "keep": 1}], {"tokens": [1, 2]}, "one count per stage"),
        ([{"tokens": 256, "keep": 2}, {"tokens": 256, "keep": 1}], {"tokens": [1, 2]},
         "must all differ"),
        ([{"tokens": 256, "keep": 2}, {"tokens": 512, "keep": 1}], {"tokens": [5, 2]}, "grow"),
        ([{"tokens": 256, "keep": 1}], {"tokens": [5], "params": "some"}, "params"),
    ],
)
def test_bad_training_settings_are_refused(stages, train, message):
    with pytest.raises(ValidationError, match=message):
        EvoPress.Params(stages=stages, train=train)


def _true(space: SparsitySpace, genome) -> float:
    rows = space.describe(genome)
    return sum(w * r["sparsity"] ** 2 for w, r in zip(WEIGHTS, rows, strict=True))


def _drawn_loss(space: SparsitySpace, request) -> float:
    # Each draw of sequences favours some genomes by chance, as a few fixed
    # sequences do: an error per (genome, draw) as large as a good move's gain.
    luck = (hash((request.genome, request.draw, 7919)) % 1000) / 1000 - 0.5
    return _true(space, request.genome) + 0.3 * luck


def _drawn_run(seed: int, resample: bool):
    space = _space()
    params = EvoPress.Params(generations=30, offspring=8, resample=resample)
    opt = EvoPress(space, params, seed=seed)
    asked = []
    while requests := opt.ask():
        asked.append(requests)
        opt.tell([_drawn_loss(space, r) for r in requests])
    return space, opt, asked


def test_resampling_scores_each_generation_on_its_own_draw_and_confirms_on_draw_0():
    space, opt, asked = _drawn_run(0, resample=True)
    start, *gens, last = asked
    assert {r.draw for r in start} == {0}
    stages = len(EvoPress.Params().stages)
    for g in range(30):
        for batch in gens[g * stages : (g + 1) * stages]:
            assert {r.draw for r in batch} == {g + 1}
    # The last parent, scored once more on the stored order, is the answer.
    (final,) = last
    assert final.draw == 0 and final.tokens == EvoPress.Params().stages[-1].tokens
    assert opt.best_genome == final.genome
    assert opt.best_fitness == _drawn_loss(space, final)
    _, fixed, asked_fixed = _drawn_run(0, resample=False)
    assert {r.draw for batch in asked_fixed for r in batch} == {0}



def test_resampling_with_surrogate_screening_is_refused():
    with pytest.raises(ValidationError, match="surrogate"):
        EvoPress.Params(resample=True, surrogate={"pool": 32})


@pytest.mark.parametrize("switches, share_of_one", [("fewer", 5 / 9), ("uniform", 1 / 3)])
def test_children_get_fewer_switches_as_in_the_reference_code(switches, share_of_one):
    space = _space()
    counts = []
    mutate = space.mutate

    def recorded(genome, rng, *, switches):
        counts.append(switches)
        return mutate(genome, rng, switches=switches)

    space.mutate = recorded
    opt = EvoPress(space, EvoPress.Params(generations=150, offspring=8, switches=switches))
    while requests := opt.ask():
        opt.tell([_loss(space, r.genome, r.tokens) for r in requests])
    assert set(counts) == {1, 2, 3}
    assert counts.count(1) / len(counts) == pytest.approx(share_of_one, abs=0.05)
    assert counts.count(3) / len(counts) == pytest.approx(
        1 / 9 if switches == "fewer" else 1 / 3, abs=0.05
    )
