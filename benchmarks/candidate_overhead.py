"""Candidate overhead: time to score one candidate (apply genome + forward + KL)
over the time of a plain dense forward on the same tokens, measured in one run.

    python benchmarks/candidate_overhead.py [--tokens 2048] [--repeats 5] [--set k=v ...]

Target: ratio <= 1.10. Uses the quickstart config (SmolLM2-135M) unless overridden.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from _common import write_result

from evocomp.config import load_config
from evocomp.evaluators.base import forward_logits
from evocomp.runner import Experiment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="quickstart")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    exp = Experiment(load_config(args.config, args.overrides), progress=False)
    ev = exp.evaluator
    _ = exp.database  # built (or opened) outside the timed region
    n_seq = ev.sequences_for(args.tokens)
    tokens = ev.tokens[:n_seq]
    rng = random.Random(0)
    genomes = [exp.space.random(rng, steps=200) for _ in range(args.repeats)]
    # Warm-up: first touches of each variant load it from disk into the cache. Scored
    # around the runner, which would keep their rows (and prefixes) and serve the
    # timed evaluations from them.
    for g in genomes:
        with exp.swapper.apply(g) as model:
            ev.evaluate(model, args.tokens)

    def sync() -> None:  # CUDA runs asynchronously: time finished work only
        if exp.model.device.type == "cuda":
            torch.cuda.synchronize()

    dense, apply_only, candidate = [], [], []
    for g in genomes:  # interleaved, so machine noise hits both alike
        sync()
        started = time.perf_counter()
        with torch.inference_mode():
            for batch in tokens.split(ev.batch_size):
                forward_logits(exp.model, batch)
        sync()
        dense.append(time.perf_counter() - started)
        started = time.perf_counter()
        with exp.swapper.apply(g):
            pass
        sync()
        apply_only.append(time.perf_counter() - started)
        candidate.append(exp.evaluate(g, args.tokens)[1])

    d, c = statistics.median(dense), statistics.median(candidate)
    write_result(
        "candidate_overhead",
        {
            "ratio": round(c / d, 4),
            "dense_forward_s": round(d, 4),
            "candidate_s": round(c, 4),
            "apply_and_restore_s": round(statistics.median(apply_only), 6),
            "tokens": int(tokens.numel()),
            "units": len(exp.space),
            "repeats": args.repeats,
            "model": exp.cfg.model.name,
        },
    )


if __name__ == "__main__":
    main()
