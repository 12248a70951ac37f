"""Coarse-to-fine width search (Týr-the-Pruner) against one EvoPress pass on the
finest grid, at equal evaluation tokens, on SmolLM2-135M.

    python benchmarks/coarse_to_fine.py [--generations 20] [--iterations 4] [--set k=v ...]

Both searches run on the same space, the built-in ``width`` config (50% of block
parameters) refined to the finest grid coarse-to-fine reaches (step 12.5% / 2**(it-1),
floored at one GQA head step and 32 neurons), with the same database: coarse-to-fine
runs ``iterations`` EvoPress searches of ``generations / iterations`` generations on
windows of 9 levels per sublayer (step 12.5%, halved each time, re-centred on the
genome found); the single pass runs ``generations`` generations on every fine level.
Figures: held-out KL to the dense model and perplexity (16 x 512 Wikipedia tokens),
evaluation tokens actually spent (repeated genomes are served by the trial store).
"""

from __future__ import annotations

import argparse
import json
import tempfile

import pandas as pd
from _common import add_overrides, heldout_metrics, timed_search, write_result


def _inner(generations: int, offspring: int) -> str:
    return (
        f"{{name: evopress, generations: {generations}, offspring: {offspring}, "
        "max_switches: 3, stages: [{tokens: 512, keep: 2}, {tokens: 2048, keep: 1}]}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--generations", type=int, default=20, help="of the single pass")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--offspring", type=int, default=8)
    add_overrides(ap)
    args = ap.parse_args()
    per = args.generations // args.iterations
    refine = 2 ** (args.iterations - 1)
    runs = {
        "coarse_to_fine": [
            f"search={{name: coarse-to-fine, iterations: {args.iterations}, levels: 4, "
            f"inner: {_inner(per, args.offspring)}}}"
        ],
        "single": [f"space.refine={refine}", f"search={_inner(args.generations, args.offspring)}"],
    }
    figures: dict = {"tokens": {}, "evaluations": {}, "seconds": {}, "kept": {}}
    best, loaded, exp = {}, None, None
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in runs.items():
            run_dir = f"{tmp}/{name}"
            exp, result, seconds = timed_search(
                "width", [f"run_dir={run_dir}", *overrides, *args.overrides], loaded
            )
            loaded = exp.loaded
            trials = pd.read_parquet(f"{run_dir}/trials.parquet")
            best[name] = result.best
            figures["tokens"][name] = int(trials.tokens.sum())
            figures["evaluations"][name] = len(trials)
            figures["seconds"][name] = round(seconds, 1)
            figures["kept"][name] = [
                {k: row[k] for k in ("unit", "heads", "neurons", "kept") if k in row}
                for row in exp.space.describe(result.best)
            ]
            print(f"{name}: {len(trials)} evaluations, {figures['tokens'][name]} tokens, "
                  f"{seconds:.0f} s", flush=True)
        assert exp is not None
        held = heldout_metrics(exp, {"uniform": exp.space.uniform(), **best})
    figures["kl"], figures["ppl"] = held["kl"], held["ppl"]
    figures["settings"] = {
        "generations": args.generations, "iterations": args.iterations,
        "offspring": args.offspring, "fine_levels": {
            u.name: exp.space.n_levels(i) for i, u in enumerate(exp.space.units[:2])
        },
    }
    print(json.dumps({"kl": figures["kl"], "tokens": figures["tokens"]}))
    write_result("coarse_to_fine", figures)


if __name__ == "__main__":
    main()
