"""Ray database build: the quickstart variant database built in one process and
with its units compressed on local Ray workers, timed, and compared byte for byte.

    python benchmarks/ray_db_build.py [--config quickstart] [--workers 2] [--set k=v ...]

The model is loaded once, untimed; each build writes a fresh database under a
temporary directory (the cached one is not touched). The one-process build and
every Ray worker use one torch thread, so the ratio shows how the build scales
with workers, and the variants can be compared bit for bit. Ray is started before
its build (startup recorded apart); the workers' first imports count in the build.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import tempfile
import time
from pathlib import Path

import ray
import torch
from _common import add_overrides, write_result

from evocomp.config import load_config
from evocomp.runner import Experiment
from evocomp.search.executor import RayExecutor, start_ray
from evocomp.supernet.database import CompressUnits, build_database


def build(exp: Experiment, root: Path, compress: CompressUnits | None) -> float:
    """Seconds to build ``exp``'s database at ``root``, as the runner would."""
    spec = exp.database_spec()
    units = [u for u in exp.units if u.name in spec.variants]
    started = time.perf_counter()
    assert build_database(
        exp.model, units, spec, root, exp.splits.calibration,
        params=exp.cfg.compressor.params, batch_size=exp.cfg.database.batch_size,
        progress=False, compress=compress,
    )
    return time.perf_counter() - started


def identical(a: Path, b: Path) -> bool:
    """The same block files, byte for byte, and the same recorded checksums."""
    names = sorted(p.name for p in a.glob("block_*.safetensors"))
    if names != sorted(p.name for p in b.glob("block_*.safetensors")):
        return False
    sums = [json.loads((r / "manifest.json").read_text())["checksums"] for r in (a, b)]
    return sums[0] == sums[1] and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="quickstart")
    ap.add_argument("--workers", type=int, default=2)
    add_overrides(ap)
    args = ap.parse_args()

    load = os.getloadavg()  # other work on the machine skews these figures
    torch.set_num_threads(1)  # like each Ray worker
    with tempfile.TemporaryDirectory(prefix="ray_db_build-") as tmp:
        cfg = load_config(args.config, [*args.overrides, f"database.path={tmp}/unused"])
        exp = Experiment(cfg, progress=False)
        _ = exp.model, exp.splits  # loaded before the clocks start
        loads = {"1": os.getloadavg()[0]}
        one = build(exp, Path(tmp, "one"), None)
        print(f"one process, 1 thread: {one:.1f} s", flush=True)

        params = RayExecutor.Params(num_workers=args.workers, threads_per_worker=1)
        loads[str(args.workers)] = os.getloadavg()[0]
        started = time.perf_counter()
        start_ray(None, who="benchmark", num_cpus=args.workers)
        startup = time.perf_counter() - started
        try:
            with RayExecutor.compress_units(params) as compress:
                spread = build(exp, Path(tmp, "ray"), compress)
        finally:
            ray.shutdown()
        print(f"ray, {args.workers} workers: {spread:.1f} s (startup {startup:.1f} s)", flush=True)
        same = identical(Path(tmp, "one"), Path(tmp, "ray"))
        files = len(list(Path(tmp, "one").glob("block_*.safetensors")))
        size = sum(p.stat().st_size for p in Path(tmp, "one").glob("block_*.safetensors"))
        load_end = os.getloadavg()

    write_result(
        "ray_db_build",
        {
            "seconds": {"1": round(one, 1), str(args.workers): round(spread, 1)},
            "identical": same,
            "speedup": round(one / spread, 3),
            "what": "'1': one process, 1 torch thread; "
            f"'{args.workers}': local Ray, {args.workers} workers x 1 thread, the driver "
            "forwarding calibration inputs and writing files; model load excluded",
            "ray_startup_s": round(startup, 1),
            "block_files": files,
            "database_gb": round(size / 2**30, 3),
            "compressor": cfg.compressor.name,
            "load_average_at_start": [round(x, 2) for x in load],
            "load_average_before_each_build": {k: round(v, 2) for k, v in loads.items()},
            "load_average_at_end": [round(x, 2) for x in load_end],
            "contention": "the 2 cores were shared with other benchmarks and agents (load averages "
            "above): figures from a saturated machine, the ratio included",
            "overrides": args.overrides,
            "config": args.config,
            "model": cfg.model.name,
        },
    )


if __name__ == "__main__":
    main()
