"""Coarse-to-fine width search (Týr-the-Pruner) against one EvoPress pass on the
finest grid, at equal evaluation tokens, on SmolLM2-135M.

    python benchmarks/coarse_to_fine.py [--generations 20] [--iterations 4] [--runs DIR]
        [--set k=v ...]

Both searches run on the same space, the built-in ``width`` config (50% of block
parameters) refined to the finest grid coarse-to-fine reaches (step 12.5% / 2**(it-1),
floored at one GQA head step and 32 neurons), with the same database: coarse-to-fine
runs ``iterations`` EvoPress searches of ``generations / iterations`` generations on
windows of 9 levels per sublayer (step 12.5%, halved each time, re-centred on the
genome found); the single pass runs ``generations`` generations on every fine level.
Figures: held-out KL to the dense model and perplexity (16 x 512 Wikipedia tokens),
evaluation tokens actually spent (repeated genomes are served by the trial store),
and, since the two never spend exactly the same tokens, the best genome of the
dearer search when it had spent as many tokens as the other
(``<name>_at_equal_tokens``). Runs go to ``--runs DIR/<name>`` (default: a temporary
folder); a finished run there is reused, not searched again.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd
from _common import DEVICE, add_overrides, heldout_metrics, timed_search, write_result

from evocomp.config import load_config
from evocomp.runner import Experiment


def _inner(generations: int, offspring: int) -> str:
    return (
        f"{{name: evopress, generations: {generations}, offspring: {offspring}, "
        "max_switches: 3, stages: [{tokens: 512, keep: 2}, {tokens: 2048, keep: 1}]}"
    )


def best_within(trials: pd.DataFrame, tokens: int) -> tuple[tuple[int, ...], float]:
    """The best genome at the final budget among the evaluations made before the
    search had spent ``tokens`` evaluation tokens (trials in the order they ran)."""
    ran = trials.sort_values("number")
    ran = ran[ran.spent.cumsum() <= tokens]
    final = ran[ran.tokens == trials.tokens.max()]
    row = final.loc[final.fitness.idxmin()]
    return tuple(int(g) for g in str(row.genome).split(",")), float(row.fitness)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--generations", type=int, default=20, help="of the single pass")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--runs", help="folder of the two runs (kept; finished runs are reused)")
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
    best, loaded, exp, trials = {}, None, None, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.runs or tmp)
        for name, overrides in runs.items():
            run_dir = root / name
            cfg = [f"run_dir={run_dir}", *overrides, *args.overrides]
            done = run_dir / "best.json"
            progress = json.loads(done.read_text())["progress"] if done.exists() else [0, 1]
            if progress[0] >= progress[1]:
                exp = Experiment(load_config("width", [*cfg, f"model.device={DEVICE}"]),
                                 progress=False)
                if loaded is not None:
                    exp.loaded = loaded
                best[name] = tuple(json.loads(done.read_text())["genome"])
            else:
                exp, result, _ = timed_search("width", cfg, loaded)
                best[name] = result.best
            loaded = exp.loaded
            trials[name] = pd.read_parquet(run_dir / "trials.parquet")
            figures["tokens"][name] = int(trials[name].spent.sum())
            figures["evaluations"][name] = len(trials[name])
            # Evaluation seconds (what a search spends), comparable between reused runs.
            figures["seconds"][name] = round(float(trials[name].seconds.sum()), 1)
            figures["kept"][name] = [
                {k: row[k] for k in ("unit", "heads", "neurons", "kept") if k in row}
                for row in exp.space.describe(best[name])
            ]
            print(f"{name}: {len(trials[name])} evaluations, {figures['tokens'][name]} tokens",
                  flush=True)
        assert exp is not None
        dear, cheap = sorted(runs, key=lambda n: figures["tokens"][n], reverse=True)
        equal, fitness = best_within(trials[dear], figures["tokens"][cheap])
        figures["at_equal_tokens"] = {
            "run": dear, "tokens": figures["tokens"][cheap], "search_kl": round(fitness, 5)
        }
        genomes = {"uniform": exp.space.uniform(), **best, f"{dear}_at_equal_tokens": equal}
        held = heldout_metrics(exp, genomes)
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
