"""Compact variant databases: the bytes a database takes in the dense layout every
weight was stored in before (storage 1) and in its encoded one (storage 2: packed
codes, sparse bitmask + values), and the time to load a variant not in cache.

Each config's database is built (encoded) under ``--dir``, never in the shared
cache; its dense twin is then written from the decoded tensors with the dense
layout's own writer (``database._ENCODE = False``), timed, and deleted. Where the
cache already holds an old-layout database of the same key (built by an older
evocomp), every variant is compared with it too.

    python benchmarks/compact_db.py [--configs quickstart bits joint] [--switches 300]
    python benchmarks/compact_db.py --configs joint --blocks 3   # its first 3 blocks only
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from _common import write_result
from safetensors import safe_open

from evocomp.config import load_config
from evocomp.paths import cache_dir
from evocomp.runner import Experiment
from evocomp.supernet import database
from evocomp.supernet.database import VariantDatabase, open_database

NAMES = {"quickstart": "sparsity", "bits": "bits", "joint": "joint"}
RESULT = Path(__file__).parent / "results" / "compact_db.json"


def _size(root: Path) -> int:
    """Bytes of a database: its block files and manifest."""
    return sum(p.stat().st_size for p in root.iterdir() if p.name != ".lock")


def _names(manifest: dict[str, Any], block: int) -> list[str]:
    return sorted(database._variant_names(manifest, block, parts=True))


def _write_dense(db: VariantDatabase, root: Path) -> None:
    """``db`` as an older evocomp stored it: every tensor dense, no encodings."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    manifest = {**db.manifest, "done_blocks": [], "checksums": {}, "complete": False}
    manifest.pop("encodings", None)
    manifest.pop("storage", None)
    done: set[int] = set()
    database._ENCODE = False
    try:
        for block in database._blocks(manifest):
            encodings = database._encodings(db.manifest, block)
            with safe_open(str(db.root / database._block_file(block)), framework="pt") as f:
                tensors = {n: database._load(f, n, encodings) for n in _names(manifest, block)}
            database._write_block(root, block, tensors, manifest, done)
    finally:
        database._ENCODE = True
    manifest.pop("encodings", None)  # _write_block records an empty one per block
    manifest["complete"] = True
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _switches(db: VariantDatabase, uniform: dict[str, Any], n: int) -> list[tuple[str, Any]]:
    """The loads of a search's first candidates: the uniform genome's variant of every
    unit, then ``n`` switches of a random unit to a random other level (seeded)."""
    rng = random.Random(0)
    current = dict(uniform)
    loads = list(uniform.items())
    units = sorted(current)
    for _ in range(n):
        unit = rng.choice(units)
        others = [k for k in db.variants(unit) if k != current[unit]]
        current[unit] = rng.choice(others)
        loads.append((unit, current[unit]))
    return loads


def _load_ms(root: Path, exp: Experiment, loads: list[tuple[str, Any]]) -> dict[str, float]:
    """Mean ms of a ``get`` not in cache over ``loads`` (the files already hashed, as
    after a database's first use), and µs of one that is."""
    db = open_database(root, exp.database_spec(), cache_gb=0)  # every load a miss
    for block in database._blocks(db.manifest):
        db._checked.add(block)  # hashing is once per file and process, not per switch
    times = []
    for unit, key in loads:
        started = time.perf_counter()
        db.get(unit, key)
        times.append(time.perf_counter() - started)
    warm = open_database(root, exp.database_spec(), cache_gb=8)
    for unit, key in loads:
        warm.get(unit, key)
    started = time.perf_counter()
    for unit, key in loads:
        warm.get(unit, key)
    hit_us = (time.perf_counter() - started) / len(loads) * 1e6
    return {"miss_ms": statistics.fmean(times) * 1e3, "hit_us": hit_us}


def _same_as(exp: Experiment, root: Path, other: Path) -> bool:
    """Whether every stored tensor (weights and parts) of the database at ``root``
    equals the one at ``other``'s, dtype included."""
    db = open_database(root, exp.database_spec(), cache_gb=0)
    old = open_database(other, exp.database_spec(), cache_gb=0)
    for unit in db.manifest["units"]:
        for key in db.variants(unit):
            for part in ("", *db.stored_parts(unit)):
                a, b = db.get(unit, key, part=part), old.get(unit, key, part=part)
                if a.dtype != b.dtype or not torch.equal(a, b):
                    print(f"differs: {unit} {key} {part!r}", flush=True)
                    return False
    return True


def measure(
    config: str, bench: Path, switches: int, loaded: Any, blocks: int | None
) -> tuple[dict[str, Any], Any]:
    overrides = ["model.device=cpu"]
    root = bench / config
    if blocks is not None:  # the linears of the first blocks only (a build too slow here)
        first = "|".join(map(str, range(blocks)))
        overrides.append(f"units.targets=['re:.*[.]layers[.]({first})[.].*']")
        root = bench / f"{config}-{blocks}blocks"
    cfg = load_config(config, [*overrides, f"database.path={root}"])
    exp = Experiment(cfg, progress=False)
    if loaded is not None:
        exp.loaded = loaded
    started = time.perf_counter()
    db = exp.database
    assert db is not None
    build_s = time.perf_counter() - started
    after = _size(root)
    forms = Counter(
        meta["encoding"]
        for block in db.manifest.get("encodings", {}).values()
        for meta in block.values()
    )
    weights = sum(len(db.variants(u)) for u in db.manifest["units"])
    forms["dense"] = weights - sum(forms.values())
    dense = bench / f"{config}-dense"
    _write_dense(db, dense)
    before = _size(dense)
    print(f"{config}: {before} -> {after} bytes ({after / before:.3f}x)", flush=True)
    identical = _same_as(exp, root, dense)
    genome = exp.space.uniform()
    uniform = {u.name: k for u, k in exp.space.placements(genome) if db.holds(u.name)}
    loads = _switches(db, uniform, switches)
    timing = {"before": _load_ms(dense, exp, loads), "after": _load_ms(root, exp, loads)}
    print(f"{config}: load ms per switch {timing}", flush=True)
    cached = cache_dir() / "databases" / f"{cfg.compressor.name}-{exp.database_spec().key[:16]}"
    out: dict[str, Any] = {
        "before_bytes": before,
        "after_bytes": after,
        "ratio": round(after / before, 4),
        "stored_weights_by_encoding": dict(forms),
        "equal_to_dense_layout": identical,
        "load_ms_per_switch": {k: round(v["miss_ms"], 3) for k, v in timing.items()},
        "cached_get_us": {k: round(v["hit_us"], 2) for k, v in timing.items()},
        "loads_timed": len(loads),
        "build_s": round(build_s, 1),
        "blocks": blocks or "all",
        "units": len(db.manifest["units"]),
    }
    if (cached / "manifest.json").exists() and cached != root:
        # An older evocomp's build of this very key: its bytes and every variant.
        out["old_build_in_cache"] = {
            "bytes": _size(cached),
            "equal": _same_as(exp, root, cached),
            "storage": json.loads((cached / "manifest.json").read_text()).get("storage", 1),
        }
    shutil.rmtree(dense)
    return out, exp.loaded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--configs", nargs="+", default=list(NAMES))
    ap.add_argument("--switches", type=int, default=300)
    ap.add_argument("--dir", type=Path, default=cache_dir() / "compact_db_bench")
    ap.add_argument("--blocks", type=int, help="only the first N blocks' linears")
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = None
    mine: dict[str, Any] = {}
    for config in args.configs:
        mine[NAMES[config]], loaded = measure(config, args.dir, args.switches, loaded, args.blocks)
        mine[NAMES[config]]["command"] = " ".join(["python", *sys.argv])
        figures: dict[str, Any] = {}
        if RESULT.exists():  # runs measuring other configs (maybe at once) keep theirs
            old = json.loads(RESULT.read_text())
            figures = {k: v for k, v in old.items() if k in NAMES.values()}
        figures.update(mine)
        measured = [v for k, v in figures.items() if k in NAMES.values()]
        figures["load_ms_per_switch"] = {
            side: round(statistics.fmean(v["load_ms_per_switch"][side] for v in measured), 3)
            for side in ("before", "after")
        }
        figures["ratios"] = {k: v["ratio"] for k, v in figures.items() if k in NAMES.values()}
        figures["not_measured"] = [NAMES[c] for c in NAMES if NAMES[c] not in figures]
        write_result("compact_db", figures)


if __name__ == "__main__":
    main()
