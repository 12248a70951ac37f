"""What checking the variant database's checksums costs: SHA-256 over every block
file (what a build does to a finished database before a search uses it, and what
``evocomp database verify`` does), against reading the uniform genome's tensors
(what the search reads first) and the hash's speed in memory.

    python benchmarks/database_verify.py [--config quickstart] [--set k=v ...]

It uses the config's database where it is (building it first if missing) and
rewrites nothing. A database written before checksums were recorded is hashed
all the same: what a check costs does not depend on whether the digest is then
compared. Each figure is measured cold (the block files evicted from the page
cache with posix_fadvise, so read from disk) and warm (second pass, median of
3); GB are 2**30 bytes, as in the other results.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
from pathlib import Path

from _common import add_overrides, write_result

from evocomp.config import load_config
from evocomp.runner import Experiment
from evocomp.supernet import database
from evocomp.supernet.database import open_database, verify_database

GB = 2**30


def _evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (this process's view of them only)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _sha256_in_memory_gb_s(size: int = 512 * 2**20) -> float:
    buf = os.urandom(size)
    started = time.perf_counter()
    hashlib.sha256(buf).digest()
    return size / GB / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="quickstart")
    add_overrides(ap)
    args = ap.parse_args()
    exp = Experiment(load_config(args.config, args.overrides), progress=False)
    spec = exp.database_spec()
    root = exp.database_root(spec)
    started = time.perf_counter()
    _ = exp.database  # what a search starts with (a build's check of every finished block)
    startup_s = time.perf_counter() - started
    manifest = database._read_manifest(root) or {}
    files = sorted(root.glob("block_*.safetensors"))
    size = sum(p.stat().st_size for p in files)
    placements = [(u.name, k) for u, k in exp.space.placements(exp.space.uniform())]

    def verify() -> float:
        found = verify_database(root, spec)
        assert not found.problems, found.problems
        assert found.hashed_bytes == size
        return found.seconds

    def load_uniform() -> tuple[float, int]:
        db = open_database(root, spec)  # a fresh LRU cache
        started = time.perf_counter()
        loaded = sum(db.get(name, key).nbytes for name, key in placements)
        return time.perf_counter() - started, loaded

    _evict(files)
    verify_cold = verify()
    verify_warm = statistics.median(verify() for _ in range(3))
    # verify() left every verdict cached: the loads below read tensors, hash nothing.
    _evict(files)
    load_cold, loaded = load_uniform()
    load_warm = statistics.median(load_uniform()[0] for _ in range(3))
    figures = {
        "database": root.name,
        "block_files": len(files),
        "database_gb": round(size / GB, 3),
        "checksums_recorded": bool(manifest.get("checksums")),
        "verify_cold_s": round(verify_cold, 2),
        "verify_cold_gb_s": round(size / GB / verify_cold, 2),
        "verify_warm_s": round(verify_warm, 2),
        "verify_warm_gb_s": round(size / GB / verify_warm, 2),
        "sha256_in_memory_gb_s": round(_sha256_in_memory_gb_s(), 2),
        "uniform_tensors_gb": round(loaded / GB, 3),
        "uniform_load_cold_s": round(load_cold, 2),
        "uniform_load_warm_s": round(load_warm, 2),
        "search_startup_database_s": round(startup_s, 2),
        "config": args.config,
        "overrides": args.overrides,
    }
    write_result("database_verify", figures)


if __name__ == "__main__":
    main()
