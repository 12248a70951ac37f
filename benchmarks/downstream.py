"""Downstream accuracy of dense vs uniform vs searched, from a finished run.

    python benchmarks/downstream.py RUN_DIR [--tasks arc_easy hellaswag piqa winogrande]
                                            [--limit 100]

RUN_DIR is a finished search (e.g. the quickstart's). Each model is scored with
lm-eval-harness on the offline tasks (the first ``--limit`` documents of each,
zero-shot), in memory with its genome applied; the figures are each task's
headline metric (acc_norm for ARC-Challenge, HellaSwag and OpenBookQA, else acc).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import write_result

from evocomp.evaluators import DownstreamParams, downstream_scores
from evocomp.runner import Experiment, load_best, load_run_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--tasks", nargs="+", default=["arc_easy", "hellaswag", "piqa", "winogrande"])
    ap.add_argument("--limit", type=int, default=100)
    args = ap.parse_args()

    cfg, run = load_run_config(args.run_dir)
    exp = Experiment(cfg, progress=False)
    genomes = {"dense": None, "uniform": exp.space.uniform(), "searched": load_best(run)}
    params = DownstreamParams(tasks=args.tasks, limit=args.limit)
    scores: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    for name, genome in genomes.items():
        t0 = time.perf_counter()
        with exp.applied(genome) as model:
            scores[name] = downstream_scores(model, exp.loaded.tokenizer, params, progress=False)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"{name:>9}: accuracy {scores[name]['accuracy']:.4f} ({seconds[name]} s)", flush=True)
    write_result(
        "downstream",
        {
            "tasks": {
                t: {name: round(scores[name][f"{t}/accuracy"], 4) for name in genomes}
                for t in args.tasks
            },
            "mean": {name: round(scores[name]["accuracy"], 4) for name in genomes},
            "limit": args.limit,
            "num_fewshot": 0,
            "documents": {t: int(scores["dense"][f"{t}/n"]) for t in args.tasks},
            "seconds": round(time.perf_counter() - started, 1),
            "seconds_per_model": seconds,
            "run": str(args.run_dir),
            "heldout_ppl": json.loads(run.eval.read_text())["ppl"] if run.eval.exists() else None,
        },
    )


if __name__ == "__main__":
    main()
