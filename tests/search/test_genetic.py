import json
import random

import deap.creator
import pytest
import yaml
from pydantic import ValidationError

from evocomp.cli import main
from evocomp.search import OPTIMIZERS, GeneticAlgorithm, RandomSearch
from evocomp.spaces import BitsSpace, DepthSpace, JointSpace, SparsitySpace
from evocomp.supernet.units import Unit

# Synthetic landscapes with uneven layer sensitivity: the optimum moves compression
# from the sensitive (heavy) layers to the robust ones.
WEIGHTS = [8.0, 8.0, 4.0, 4.0, 1.0, 1.0, 0.5, 0.5, 0.1, 0.1]


def _sparsity() -> SparsitySpace:
    units = [Unit(f"l{i}", "linear", i, (16, 16)) for i in range(len(WEIGHTS))]
    return SparsitySpace(units, SparsitySpace.Params(target=0.5, step=0.1, levels=4))


def _bits() -> BitsSpace:
    units = [Unit(f"l{i}", "linear", i, (16, 16)) for i in range(len(WEIGHTS))]
    return BitsSpace(units, BitsSpace.Params(target=4, bits=[2, 3, 4, 5, 6, 8]))


def _depth() -> DepthSpace:
    units = [Unit(f"b{b}.{k}", k, b, (64, 64)) for b in range(6) for k in ("attn", "mlp")]
    return DepthSpace(units, DepthSpace.Params(remove=4, granularity="block"))


def _joint() -> JointSpace:
    units = [
        Unit(f"model.layers.{b}.{name}", "linear", b, shape)
        for b in range(3)
        for name, shape in [("self_attn.o_proj", (32, 32)), ("mlp.down_proj", (32, 64))]
    ]
    parts = [
        {"name": "sparsity", "target": 0.5, "step": 0.125, "levels": 2},
        {"name": "bits", "bits": [2, 3, 4, 5, 6], "target": 4},
    ]
    return JointSpace(units, JointSpace.Params(spaces=parts))


def _loss(space, genome) -> float:
    """Weighted squared sparsity (sparsity space), weighted quantization noise
    (bits space), or a weighted sum of levels (any space)."""
    rows = space.describe(genome) if isinstance(space, (SparsitySpace, BitsSpace)) else None
    if isinstance(space, SparsitySpace):
        return sum(w * r["sparsity"] ** 2 for w, r in zip(WEIGHTS, rows, strict=True))
    if isinstance(space, BitsSpace):
        return sum(w * 4.0 ** (4 - r["bits"]) for w, r in zip(WEIGHTS, rows, strict=True))
    return sum((1 + i % 5) * g for i, g in enumerate(genome))


def _drive(opt, space):
    asked = []
    while requests := opt.ask():
        for r in requests:
            assert space.is_feasible(r.genome), r.genome
        asked += requests
        opt.tell([_loss(space, r.genome) for r in requests])
    return asked


def _ga(space, seed=0, **params):
    opt = GeneticAlgorithm(space, GeneticAlgorithm.Params(**params), seed=seed)
    return opt, _drive(opt, space)


def _random_best(space, seed, samples) -> float:
    rnd = RandomSearch(space, RandomSearch.Params(samples=samples, tokens=64), seed=seed)
    _drive(rnd, space)
    return rnd.best_fitness


SMALL = {"population": 8, "offspring": 8, "generations": 8, "tokens": 64}


@pytest.mark.parametrize("make", [_sparsity, _bits], ids=["sparsity", "bits"])
@pytest.mark.parametrize("operator", ["two-point", "uniform"])
def test_ga_beats_random_search_at_equal_evaluations(make, operator):
    ga_best, rnd_best = [], []
    for seed in range(3):
        space = make()
        opt, asked = _ga(space, seed, operator=operator, **SMALL)
        assert space.cost(opt.best_genome) <= space.budget
        assert opt.best_fitness == min(_loss(space, r.genome) for r in asked)
        ga_best.append(opt.best_fitness)
        rnd_best.append(_random_best(make(), seed, len(asked)))
    assert sum(ga_best) < 0.9 * sum(rnd_best), (ga_best, rnd_best)


def test_ga_moves_compression_to_robust_layers():
    space = _sparsity()
    opt, _ = _ga(space, 0, **SMALL)
    sparsity = [r["sparsity"] for r in space.describe(opt.best_genome)]
    assert sum(sparsity[:2]) < sum(sparsity[-2:])
    assert opt.best_fitness < 0.5 * _loss(space, space.uniform())


@pytest.mark.parametrize("make", [_depth, _joint], ids=["depth-block", "joint-sparsity-bits"])
def test_every_request_is_feasible_and_new(make):
    space = make()
    opt, asked = _ga(space, 0, population=6, offspring=6, generations=5, tokens=64)
    genomes = [r.genome for r in asked]
    assert len(set(genomes)) == len(genomes)  # no genome evaluated twice
    assert all(space.is_feasible(g) for g in genomes)  # also checked in _drive
    assert genomes[0] == space.uniform()
    assert len(genomes) > 6  # the search moved
    assert opt.progress == (5, 5)


def test_same_seed_same_requests_other_seed_other_path():
    runs = [_ga(_sparsity(), seed, **SMALL)[1] for seed in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_replay_from_recorded_fitness_gives_the_same_search():
    """What resume does: a fresh optimizer with the seed, fed the stored fitness."""
    space = _sparsity()
    first, asked = _ga(space, 5, **SMALL)
    stored = {r.genome: _loss(space, r.genome) for r in asked}
    replay = GeneticAlgorithm(space, GeneticAlgorithm.Params(**SMALL), seed=5)
    again = []
    while requests := replay.ask():
        again += requests
        replay.tell([stored[r.genome] for r in requests])
    assert again == asked and replay.best_genome == first.best_genome


def test_neither_deap_creator_nor_global_random_is_touched():
    creator = dict(vars(deap.creator))
    random.seed(1234)
    state = random.getstate()
    _ga(_sparsity(), 0, population=4, offspring=4, generations=3, tokens=64)
    assert random.getstate() == state
    assert dict(vars(deap.creator)) == creator


def test_global_random_does_not_steer_the_search():
    random.seed(1)
    a = _ga(_sparsity(), 0, population=4, offspring=4, generations=3, tokens=64)[1]
    random.seed(2)
    b = _ga(_sparsity(), 0, population=4, offspring=4, generations=3, tokens=64)[1]
    assert a == b


def test_survivors_are_the_best_of_parents_and_children():
    space = _sparsity()
    opt = GeneticAlgorithm(space, GeneticAlgorithm.Params(**SMALL), seed=0)
    best_so_far = float("inf")
    while requests := opt.ask():
        fitness = [_loss(space, r.genome) for r in requests]
        opt.tell(fitness)
        best_so_far = min(best_so_far, *fitness)
        assert opt.best_fitness == best_so_far  # elitist: the best is never lost


@pytest.mark.parametrize(
    "params",
    [
        {"typo": 1},
        {"crossover": 0.7, "mutation": 0.5},
        {"crossover": 0.0, "mutation": 0.0},
        {"population": 1},
        {"offspring": 0},
        {"tournament": 0},
        {"operator": "one-point"},
        {"tokens": 0},
        {"mutation": 1.5},
    ],
)
def test_bad_params_are_rejected(params):
    with pytest.raises(ValidationError):
        GeneticAlgorithm.Params(**params)


def test_registered_by_name():
    assert OPTIMIZERS.get("ga") is GeneticAlgorithm


def test_ga_search_through_the_cli(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))
    cfg = {
        "name": "ga",
        "run_dir": str(tmp_path / "runs" / "ga"),
        "model": {"name": str(tiny_model_dir)},
        "data": {"corpus": "wiki", "seq_len": 64, "calibration": 8, "search": 4, "heldout": 8},
        "compressor": {"name": "sparsegpt"},
        "space": {"name": "sparsity", "target": 0.5, "step": 0.1, "levels": 2},
        "search": {"name": "ga", "generations": 2, "population": 4, "offspring": 4, "tokens": 64},
        "database": {"path": str(tmp_path / "db")},
        "final_eval": {"enabled": False},
    }
    path = tmp_path / "ga.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["-q", "search", str(path)]) == 0
    best = json.loads((tmp_path / "runs" / "ga" / "best.json").read_text())
    assert best["cost"] <= best["budget"]
    assert best["progress"] == [2, 2]
