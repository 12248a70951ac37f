"""Search quality: held-out perplexity at the run's sparsity — dense, uniform
with each compressor (magnitude, Wanda, SparseGPT), and the searched allocation.

    python benchmarks/search_quality.py RUN_DIR

RUN_DIR is a finished search (e.g. the quickstart's). Uniform baselines use the
same held-out tokens; their databases only need the uniform level.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from _common import uniform_baseline_config, write_result

from evocomp.runner import Experiment, RunDir, load_best, load_run_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", type=Path)
    args = ap.parse_args()

    cfg, run = load_run_config(args.run_dir)
    exp = Experiment(cfg, progress=False)
    best = load_best(run)
    ppl = {k: v["ppl"] for k, v in exp.heldout({"dense": None, "searched": best}).items()}
    for name in ("magnitude", "wanda", "sparsegpt"):
        baseline_cfg = uniform_baseline_config(cfg, name)
        base = Experiment(baseline_cfg, progress=False)
        base.loaded = exp.loaded  # same model object: no second load
        base.splits = exp.splits
        ppl[f"uniform_{name}"] = base.heldout({"u": base.space.uniform()})["u"]["ppl"]
    ppl["uniform"] = ppl[f"uniform_{cfg.compressor.name}"]

    trials = pd.read_parquet(RunDir(run.path).trials)
    search = cfg.search.params.model_dump()
    write_result(
        "search_quality",
        {
            "ppl": {k: round(v, 4) for k, v in ppl.items()},
            "target_sparsity": cfg.space.params.model_dump().get("target"),
            "heldout_tokens": int(exp.splits.heldout.numel()),
            "search_budget": {
                **search,
                "evaluations": len(trials),
                "tokens_evaluated": int(trials.spent.sum()),
                "search_seconds": round(float(trials.seconds.sum()), 1),
            },
            "best_fitness": json.loads(run.best.read_text())["fitness"],
            "run_dir": str(run.path),
        },
    )


if __name__ == "__main__":
    main()
