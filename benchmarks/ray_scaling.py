"""Ray scaling: candidates per second with the Ray executor at 1 and 2 workers, and
in process (the local executor on one torch thread) for reference, on the same
random feasible genomes of the quickstart config (SmolLM2-135M).

    python benchmarks/ray_scaling.py [--candidates 16] [--tokens 512] [--workers 1 2]
                                     [--set k=v ...]

Every worker (and the local run) uses one torch thread, so the figures show how
throughput scales with workers rather than thread contention. Each configuration
gets a fresh executor; starting it (Ray, one model replica per actor) and one
warm-up job per worker are not timed. With EVOCOMP_BENCH_DEVICE=cuda each worker
gets 1/max(workers) of the GPU unless --gpus-per-worker says otherwise.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
from _common import DEVICE, add_overrides, write_result

from evocomp.config import load_config
from evocomp.runner import Experiment
from evocomp.search.base import Request
from evocomp.search.executor import Executor, LocalExecutor, RayExecutor


def timed(ex: Executor, jobs: list[Request], warmup: list[Request]) -> dict[str, object]:
    """Candidates per second over ``jobs`` after one untimed warm-up job per worker."""
    list(ex.map(warmup))
    results: dict[int, dict[str, float]] = {}
    seconds = []
    started = time.perf_counter()
    for index, metrics, s in ex.map(jobs):
        results[index] = metrics
        seconds.append(s)
    wall = time.perf_counter() - started
    return {
        "candidates_per_s": len(jobs) / wall,
        "wall_s": wall,
        "median_candidate_s": statistics.median(seconds),  # as measured by the worker
        "metrics": results,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="quickstart")
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--gpus-per-worker", type=float, default=None)
    add_overrides(ap)
    args = ap.parse_args()

    load = os.getloadavg()[0]  # other work on the machine skews these figures
    torch.set_num_threads(1)  # the local reference, like each Ray worker
    cfg = load_config(args.config, [*args.overrides, f"model.device={DEVICE}"])
    exp = Experiment(cfg, progress=False)
    _ = exp.database, exp.evaluator  # opened (or built) by the driver, before any actor
    rng = random.Random(0)
    genomes = [exp.space.random(rng) for _ in range(args.candidates)]
    jobs = [Request(g, args.tokens) for g in genomes]
    uniform = exp.space.uniform()
    gpus = args.gpus_per_worker
    if gpus is None:
        gpus = 0.0 if DEVICE == "cpu" else 1.0 / max(args.workers)

    print(f"{len(jobs)} candidates at {args.tokens} tokens, load average {load:.2f}", flush=True)
    with LocalExecutor(exp.evaluation(), LocalExecutor.Params()) as ex:
        local = timed(ex, jobs, [Request(uniform, args.tokens)])
    print(f"local, 1 thread: {local['candidates_per_s']:.3f} candidates/s", flush=True)

    ray: dict[int, dict[str, object]] = {}
    startup: dict[int, float] = {}
    for n in args.workers:
        params = RayExecutor.Params(num_workers=n, threads_per_worker=1, gpus_per_worker=gpus)
        started = time.perf_counter()
        with RayExecutor(exp.evaluation(), params) as ex:
            startup[n] = time.perf_counter() - started
            ray[n] = timed(ex, jobs, [Request(uniform, args.tokens)] * n)
        print(
            f"ray, {n} worker(s): {ray[n]['candidates_per_s']:.3f} candidates/s "
            f"(startup {startup[n]:.1f} s)",
            flush=True,
        )

    cps = {str(n): round(r["candidates_per_s"], 4) for n, r in ray.items()}
    lo, hi = min(ray), max(ray)
    write_result(
        "ray_scaling",
        {
            "candidates_per_s": cps,
            "local_1_thread": round(local["candidates_per_s"], 4),
            "speedup": round(ray[hi]["candidates_per_s"] / ray[lo]["candidates_per_s"], 3),
            "speedup_workers": [lo, hi],
            "median_candidate_s": {
                "local": round(local["median_candidate_s"], 4),
                **{str(n): round(r["median_candidate_s"], 4) for n, r in ray.items()},
            },
            "startup_s": {str(n): round(s, 1) for n, s in startup.items()},
            "metrics_match_local": all(r["metrics"] == local["metrics"] for r in ray.values()),
            "tokens": args.tokens,
            "candidates": len(jobs),
            "gpus_per_worker": gpus,
            "load_average_at_start": round(load, 2),
            "model": cfg.model.name,
        },
    )


if __name__ == "__main__":
    main()
