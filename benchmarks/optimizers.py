"""Every single-objective optimizer on the same problem and the same token budget.

    python benchmarks/optimizers.py [--seeds 0 1] [--budget 40000] [--config quickstart]
        [--optimizers evopress ga optuna optuna_cmaes random] [--name optimizers]

The problem is a built-in config's, by default the quickstart's: 50% average
sparsity on SmolLM2-135M over SparseGPT variants, candidates scored by KL to the
dense model on the search tokens. ``optuna`` runs the TPE sampler, ``optuna_cmaes``
the CMA-ES sampler (the default); ``ga_random`` the GA with a random first
population. Each optimizer gets about ``--budget`` evaluation tokens per search
(settings below), one search per seed; the best genome of each search is then
scored on held-out text. Figures: held-out KL and perplexity per optimizer and
seed, search wall time, tokens and evaluations actually spent.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
from _common import (
    add_overrides,
    evopress_search,
    evopress_tokens_per_generation,
    heldout_metrics,
    timed_search,
    write_result,
)

from evocomp.config import load_config

TOKENS = 512
"""Tokens per evaluation for the one-fidelity optimizers (one search sequence)."""


def settings(name: str, budget: int, config: str, overrides: list[str]) -> list[str]:
    """Config overrides that spend about ``budget`` evaluation tokens (at most)."""
    evals = budget // TOKENS
    if name == "evopress":
        pin = evopress_search(config, overrides)
        params = load_config(config, [*pin, *overrides]).search.params
        start = params.stages[-1].tokens  # the uniform start, scored on the last stage
        per_generation = evopress_tokens_per_generation(params)
        generations = max(1, int((budget - start) // per_generation))
        return [*pin, f"search.generations={generations}"]
    if name in ("ga", "ga_random"):
        return [
            "search.name=ga",
            f"search.init={'random' if name == 'ga_random' else 'mutants'}",
            "search.population=8",
            "search.offspring=8",
            f"search.generations={max(1, evals // 8 - 1)}",
            f"search.tokens={TOKENS}",
        ]
    if name == "optuna":  # TPE, the default before CMA-ES
        return [
            "search.name=optuna",
            "search.sampler=tpe",
            f"search.trials={evals}",
            "search.batch=8",
            "search.startup=16",
            f"search.tokens={TOKENS}",
        ]
    if name == "optuna_cmaes":
        return [
            "search.name=optuna",
            "search.sampler=cmaes",
            f"search.trials={evals}",
            "search.batch=8",
            f"search.tokens={TOKENS}",
        ]
    if name == "random":
        return ["search.name=random", f"search.samples={evals}", f"search.tokens={TOKENS}"]
    raise SystemExit(f"unknown optimizer {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--budget", type=int, default=40_000, help="evaluation tokens per search")
    ap.add_argument(
        "--optimizers", nargs="+", default=["evopress", "ga", "optuna", "optuna_cmaes", "random"]
    )
    ap.add_argument("--config", default="quickstart", help="the problem (a built-in config)")
    ap.add_argument("--name", default="optimizers", help="results/<name>.json")
    add_overrides(ap)
    args = ap.parse_args()

    runs: dict[str, dict[int, dict]] = {}
    best: dict[str, tuple] = {}
    loaded = exp = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.optimizers:
            for seed in args.seeds:
                run_dir = Path(tmp) / f"{name}-{seed}"
                overrides = [
                    *settings(name, args.budget, args.config, args.overrides),
                    f"seed={seed}", f"run_dir={run_dir}",
                ]
                exp, result, seconds = timed_search(
                    args.config, [*overrides, *args.overrides], loaded
                )
                loaded = exp.loaded
                trials = pd.read_parquet(run_dir / "trials.parquet")
                runs.setdefault(name, {})[seed] = {
                    "search_kl": result.fitness,
                    "seconds": round(seconds, 1),
                    "evaluations": len(trials),
                    "tokens": int(trials.spent.sum()),
                }
                best[f"{name}-{seed}"] = result.best
                print(f"{name} seed {seed}: {runs[name][seed]}", flush=True)
        assert exp is not None
        held = heldout_metrics(exp, {"dense": None, "uniform": exp.space.uniform(), **best})

    def per_seed(key: str) -> dict[str, list]:
        return {n: [runs[n][s][key] for s in args.seeds] for n in runs}

    write_result(
        args.name,
        {
            "best_kl": {n: [held["kl"][f"{n}-{s}"] for s in args.seeds] for n in runs},
            "best_ppl": {n: [held["ppl"][f"{n}-{s}"] for s in args.seeds] for n in runs},
            "uniform": {"kl": held["kl"]["uniform"], "ppl": held["ppl"]["uniform"]},
            "dense_ppl": held["ppl"]["dense"],
            "seeds": args.seeds,
            "tokens": args.budget,
            "tokens_spent": per_seed("tokens"),
            "evaluations": per_seed("evaluations"),
            "search_kl": per_seed("search_kl"),
            "seconds": per_seed("seconds"),
            "heldout_tokens": int(exp.splits.heldout.numel()),
        },
    )


if __name__ == "__main__":
    main()
