"""Shared by the optimizer tests: small spaces, synthetic landscapes with uneven
layer sensitivity, a driver that checks feasibility, and a CLI run on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import search_config

from evocomp.cli import main
from evocomp.search import RandomSearch
from evocomp.spaces import BitsSpace, DepthSpace, JointSpace, SparsitySpace
from evocomp.supernet.units import Unit

# Layer i hurts in proportion to WEIGHTS[i]: the optimum moves compression from the
# sensitive (heavy) layers to the robust ones.
WEIGHTS = [8.0, 8.0, 4.0, 4.0, 1.0, 1.0, 0.5, 0.5, 0.1, 0.1]


def sparsity_space() -> SparsitySpace:
    units = [Unit(f"l{i}", "linear", i, (16, 16)) for i in range(len(WEIGHTS))]
    return SparsitySpace(units, SparsitySpace.Params(target=0.5, step=0.1, levels=4))


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


def drive(opt, space) -> list:
    """Run ``opt`` to the end on :func:`loss`; every request must be feasible."""
    asked = []
    while requests := opt.ask():
        for r in requests:
            assert space.is_feasible(r.genome), r.genome
        asked += requests
        opt.tell([loss(space, r.genome) for r in requests])
    return asked


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
