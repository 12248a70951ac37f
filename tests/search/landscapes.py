"""Shared by the optimizer tests: small spaces, synthetic landscapes with uneven
layer sensitivity, drivers that check feasibility (or, for multi-objective
optimizers, validity), 2-D Pareto helpers, and a CLI run on the tiny model."""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path
from typing import Any

from conftest import search_config

from evocomp.cli import main
from evocomp.search import RandomSearch
from evocomp.search.base import pareto_front
from evocomp.spaces import BitsSpace, DepthSpace, JointSpace, SparsitySpace
from evocomp.spaces.units import Unit

# Layer i hurts in proportion to WEIGHTS[i]: the optimum moves compression from the
# sensitive (heavy) layers to the robust ones.
WEIGHTS = [8.0, 8.0, 4.0, 4.0, 1.0, 1.0, 0.5, 0.5, 0.1, 0.1]


def sparsity_space() -> SparsitySpace:
    units = [Unit(f"l{i}", "linear", i, (16, 16)) for i in range(len(WEIGHTS))]
    return SparsitySpace(units, SparsitySpace.Params(target=0.5, step=0.1, levels=4))


def flat_space(genes: int = 210, spread: float = 0.3) -> tuple[SparsitySpace, list[float]]:
    """Many equal layers of mildly unequal sensitivity (lognormal weights, for
    :func:`weighted_loss`): uniform is close to the optimum, as on a compressed LLM,
    and only small moves improve on it (with a large ``spread``, few genes: far from
    it)."""
    rng = random.Random(7)
    weights = [rng.lognormvariate(0, spread) for _ in range(genes)]
    units = [Unit(f"l{i}", "linear", i, (16, 16)) for i in range(genes)]
    return SparsitySpace(units, SparsitySpace.Params(target=0.5, step=0.1, levels=3)), weights


def weighted_loss(space: SparsitySpace, weights: list[float], genome) -> float:
    """Weighted squared sparsity, with the weights of :func:`flat_space`."""
    rows = space.describe(genome)
    return sum(w * r["sparsity"] ** 2 for w, r in zip(weights, rows, strict=True))


def moved(genome, start) -> int:
    """How many genes ``genome`` sets to another level than ``start``."""
    return sum(a != b for a, b in zip(genome, start, strict=True))


def bits_space() -> BitsSpace:
    units = [Unit(f"l{i}", "linear", i, (16, 16)) for i in range(len(WEIGHTS))]
    return BitsSpace(units, BitsSpace.Params(target=4, bits=[2, 3, 4, 5, 6, 8]))


def depth_space(blocks: int = 6, remove: int = 4) -> DepthSpace:
    units = [Unit(f"b{b}.{k}", k, b, (64, 64)) for b in range(blocks) for k in ("attn", "mlp")]
    return DepthSpace(units, DepthSpace.Params(remove=remove, granularity="block"))


def joint_space() -> JointSpace:
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


def loss(space, genome) -> float:
    """Weighted squared sparsity (sparsity space), weighted quantization noise
    (bits space), or a weighted sum of levels (any other space)."""
    if isinstance(space, SparsitySpace):
        rows = space.describe(genome)
        return sum(w * r["sparsity"] ** 2 for w, r in zip(WEIGHTS[: len(rows)], rows, strict=True))
    if isinstance(space, BitsSpace):
        rows = space.describe(genome)
        return sum(w * 4.0 ** (4 - r["bits"]) for w, r in zip(WEIGHTS, rows, strict=True))
    return sum((1 + i % 5) * g for i, g in enumerate(genome))


def drive(opt, space, fitness=None) -> list:
    """Run ``opt`` to the end on ``fitness(genome)`` (default: :func:`loss`); every
    request must be feasible."""
    fitness = fitness or partial(loss, space)
    asked = []
    while requests := opt.ask():
        for r in requests:
            assert space.is_feasible(r.genome), r.genome
        asked += requests
        opt.tell([fitness(r.genome) for r in requests])
    return asked


def drive_valid(opt, space) -> list:
    """Run an unbudgeted (multi-objective) ``opt`` to the end on :func:`loss`: every
    request must be valid and never asked before; the budget does not bind."""
    assert not opt.budgeted
    asked, seen = [], set()
    while requests := opt.ask():
        for r in requests:
            assert space.is_valid(r.genome), r.genome
            assert r.genome not in seen, r.genome
            seen.add(r.genome)
        asked += requests
        opt.tell([loss(space, r.genome) for r in requests])
    return asked


def span(space) -> int:
    """Smallest steps from one end of the cost range to the other (at most)."""
    return sum(space.n_levels(i) - 1 for i in range(len(space)))


def extremes(space) -> tuple[tuple, tuple]:
    """A cheapest and a dearest genome (walks down and up across the whole range)."""
    rng = random.Random(0)
    start = space.uniform()
    return tuple(space.wander(start, rng, steps=span(space), rise=r) for r in (0.0, 1.0))


def points(space, genomes) -> list[tuple]:
    """(genome, loss, cost) of each genome."""
    return [(g, loss(space, g), space.cost(g)) for g in genomes]


def hypervolume(front, reference: tuple[float, float]) -> float:
    """The area of the (fitness, cost) plane, both minimised, that ``front``'s points
    dominate up to ``reference`` (any points: the dominated ones add nothing)."""
    rf, rc = reference
    pts = [(f, c) for _, f, c in pareto_front(front) if f < rf and c < rc]
    area = 0.0
    for k, (f, c) in enumerate(pts):  # by cost, fitness falling
        nxt = pts[k + 1][1] if k + 1 < len(pts) else rc
        area += (nxt - c) * (rf - f)
    return area


def reference(space) -> tuple[float, float]:
    """Worst fitness (the cheapest genome's) and highest cost: every genome is inside."""
    cheap, dear = extremes(space)
    return loss(space, cheap) * 1.01 + 1e-9, space.cost(dear) * 1.01 + 1


def exact_front(space) -> list[tuple]:
    """The true (loss, cost) front of a sparsity or bits space, whose loss and cost
    are both sums over genes: the least loss at every reachable cost, by dynamic
    programming over the genes."""
    assert isinstance(space, (SparsitySpace, BitsSpace))
    start = space.uniform()
    base = loss(space, start)

    def gene_loss(i: int, level: int) -> float:
        return loss(space, start[:i] + (level,) + start[i + 1 :]) - base

    best: dict[int, tuple[float, tuple]] = {0: (0.0, ())}
    for i in range(len(space)):
        grown: dict[int, tuple[float, tuple]] = {}
        for cost, (lost, genes) in best.items():
            for lv in range(space.n_levels(i)):
                c, f = cost + space.level_cost(i, lv), lost + gene_loss(i, lv)
                if c not in grown or f < grown[c][0]:
                    grown[c] = (f, (*genes, lv))
        best = grown
    return pareto_front(points(space, [genes for _, genes in best.values()]))


def random_valid(space, seed: int, n: int) -> list[tuple]:
    """``n`` distinct random valid genomes over the cost range: walks from the start
    of random length and random rise (the random baseline of multi-objective search)."""
    rng = random.Random(seed)
    start, out = space.uniform(), {space.uniform()}
    for _ in range(100 * n):
        if len(out) == n:
            break
        out.add(space.wander(start, rng, steps=rng.randint(1, span(space)), rise=rng.random()))
    return list(out)


def random_best(space, seed: int, samples: int) -> float:
    rnd = RandomSearch(space, RandomSearch.Params(samples=samples, tokens=64), seed=seed)
    drive(rnd, space)
    return rnd.best_fitness


def cli_search(tmp_path: Path, model_dir: Path, search: dict[str, Any]) -> dict[str, Any]:
    """``evocomp search`` on the tiny model with ``search``; returns best.json."""
    name = search["name"]
    cfg = search_config(
        tmp_path, model_dir, name=name, search=search, final_eval={"enabled": False}
    )
    assert main(["-q", "search", cfg]) == 0
    return json.loads((tmp_path / "runs" / name / "best.json").read_text())
