"""Database build time and peak memory (RSS) for a config, in fresh processes:
one that only loads the model (the floor), one that builds the database.

    python benchmarks/database_build.py [--config quickstart] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

from _common import write_result

CHILD = r"""
import json, resource, sys, time
from evocomp.config import load_config
from evocomp.runner import Experiment
cfg = load_config(sys.argv[1], sys.argv[3:])
exp = Experiment(cfg, progress=False)
t0 = time.perf_counter()
exp.loaded
load_s = time.perf_counter() - t0
if sys.argv[2] == "build":
    exp.splits
    t0 = time.perf_counter()
    exp.database
    build_s = time.perf_counter() - t0
else:
    build_s = 0.0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"load_s": load_s, "build_s": build_s, "peak_rss_gb": rss}))
"""


def _child(config: str, mode: str, overrides: list[str]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, config, mode, *overrides],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="quickstart")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*args.overrides, f"database.path={tmp}/db"]
        floor = _child(args.config, "load", overrides)
        started = time.perf_counter()
        build = _child(args.config, "build", overrides)
        wall = time.perf_counter() - started
        size = sum(p.stat().st_size for p in __import__("pathlib").Path(tmp, "db").glob("*"))
    write_result(
        "database_build",
        {
            "build_s": round(build["build_s"], 1),
            "process_wall_s": round(wall, 1),
            "peak_rss_gb": round(build["peak_rss_gb"], 3),
            "model_only_peak_rss_gb": round(floor["peak_rss_gb"], 3),
            "database_gb": round(size / 2**30, 3),
            "overrides": args.overrides,
            "config": args.config,
        },
    )


if __name__ == "__main__":
    main()
