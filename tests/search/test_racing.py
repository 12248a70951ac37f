import math

import pytest
from pydantic import ValidationError

from evocomp.search import EvoPress
from evocomp.search.racing import Race, RaceParams, look_budgets, per_look
from evocomp.spaces import SparsitySpace
from evocomp.spaces.units import Unit

WEIGHTS = [8.0, 8.0, 4.0, 4.0, 1.0, 1.0, 0.5, 0.5, 0.1, 0.1]
ROW = 64
STAGES = [{"tokens": ROW, "keep": 2}, {"tokens": 4 * ROW, "keep": 1}]


def _space() -> SparsitySpace:
    units = [Unit(f"l{i}", "linear", i, (16, 16)) for i in range(len(WEIGHTS))]
    return SparsitySpace(units, SparsitySpace.Params(target=0.5, step=0.1, levels=4))


def _row(space: SparsitySpace, genome, row: int, noise: float) -> float:
    """A genome's loss on one sequence: its true loss plus that sequence's luck."""
    rows = space.describe(genome)
    true = sum(w * r["sparsity"] ** 2 for w, r in zip(WEIGHTS, rows, strict=True))
    return true + noise * ((hash((genome, row)) % 1000) / 1000 - 0.5)


def _search(seed: int, race: dict | None, noise: float, generations: int = 25):
    """An EvoPress search scored as the runner scores it, rows kept once scored: the
    mean over a budget's rows; returns the optimizer, its requests and the rows run."""
    space = _space()
    params = EvoPress.Params(generations=generations, offspring=8, stages=STAGES, race=race)
    opt = EvoPress(space, params, seed=seed)
    asked, scored = [], set()
    while requests := opt.ask():
        asked += requests
        fitness = []
        for r in requests:
            rows = range(math.ceil(r.tokens / ROW))
            scored.update((r.genome, i) for i in rows)
            fitness.append(sum(_row(space, r.genome, i, noise) for i in rows) / len(rows))
        opt.tell(fitness)
    return opt, asked, len(scored)


def test_look_budgets_and_per_look_means():
    assert look_budgets(512, 2048, 512) == [1024, 1536, 2048]
    assert look_budgets(512, 1200, 512) == [1024, 1200]
    assert look_budgets(1024, 4096, 1024) == [2048, 3072, 4096]
    # Running means 1, 2, 2 over 1, 2, 4 rows: the new rows' means are 1, 3, 2.
    assert per_look([(1, 1.0), (2, 2.0), (4, 2.0)]) == [1.0, 3.0, 2.0]


def test_nothing_is_dropped_before_warmup_then_significantly_worse_ones_are():
    race = Race(RaceParams(confidence=0.95, warmup=4))
    good = [(1, 1.0), (2, 1.0), (3, 1.0)]
    bad = [(1, 1.5), (2, 1.5), (3, 1.5)]
    assert not race.worse(bad, good)  # no pooled variance yet
    for shift in (0.1, -0.1, 0.2, -0.2):
        race.observe([(1, 1.0 + shift), (2, 1.0), (3, 1.0)], good)
    assert race.sigma is not None and race.sigma > 0
    assert race.worse(bad, good)
    assert not race.worse(good, bad)
    close = [(1, 1.01), (2, 1.01), (3, 1.01)]
    assert not race.worse(close, good)  # within the noise
    assert not race.worse(bad[:1], good[:1])  # one look is no evidence


def test_a_raced_stage_scores_its_candidates_one_look_at_a_time():
    _, asked, _ = _search(0, {"warmup": 4}, noise=0.02, generations=3)
    assert {r.tokens for r in asked} == {ROW, 2 * ROW, 3 * ROW, 4 * ROW}
    _, plain, _ = _search(0, None, noise=0.02, generations=3)
    assert {r.tokens for r in plain} == {ROW, 4 * ROW}


def test_racing_drops_clearly_worse_children_and_finds_the_same_answer_for_fewer_rows():
    for seed in range(3):
        raced, _, rows_raced = _search(seed, {}, noise=0.02)
        plain, _, rows_plain = _search(seed, None, noise=0.02)
        assert raced._race is not None and raced._race.dropped > 0
        assert rows_raced < rows_plain
        assert raced.best_genome == plain.best_genome


def test_with_noise_as_large_as_the_differences_racing_drops_little():
    loud, _, _ = _search(0, {}, noise=5.0)
    quiet, _, _ = _search(0, {}, noise=0.02)
    assert loud._race.dropped < quiet._race.dropped


def test_the_same_scores_give_the_same_race():
    a, asked_a, _ = _search(5, {}, noise=0.5)
    b, asked_b, _ = _search(5, {}, noise=0.5)
    assert asked_a == asked_b and a.best_genome == b.best_genome


def test_racing_with_training_is_refused():
    with pytest.raises(ValidationError, match="race"):
        EvoPress.Params(race={}, train={"tokens": [64, 256]}, stages=STAGES)
    with pytest.raises(ValidationError, match="confidence"):
        EvoPress.Params(race={"confidence": 1.5})
