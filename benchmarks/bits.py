"""Per-layer bitwidth search vs its baselines, on held-out text.

    python benchmarks/bits.py [--targets 3.0 2.5] [--generations 16] [--random 16]

For each average-bits target: EvoPress over GPTQ variants (2..8 bits), the
uniform allocation when the target is a bitwidth (else the greedy feasible
start), and the best of N random feasible allocations (scored like the search,
on 2,048 search tokens). Figures: held-out perplexity and KL to the dense model.
"""

from __future__ import annotations

import argparse
import tempfile

from _common import EVOPRESS, heldout_metrics, timed_search, write_result

from evocomp.search import RandomSearch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--targets", type=float, nargs="+", default=[3.0, 2.5])
    ap.add_argument("--generations", type=int, default=16)
    ap.add_argument("--random", type=int, default=16)
    args = ap.parse_args()
    results, loaded = {}, None
    for target in args.targets:
        with tempfile.TemporaryDirectory() as tmp:
            exp, result, search_s = timed_search(
                "bits",
                [
                    EVOPRESS,  # as recorded: the bits config's search before the chain
                    f"space.target={target}",
                    f"search.generations={args.generations}",
                    f"search.init_samples={0 if target == int(target) else 8}",
                    f"run_dir={tmp}/run",
                ],
                loaded,
            )
            loaded = exp.loaded
            rnd = RandomSearch(exp.space, RandomSearch.Params(samples=args.random), seed=1)
            while requests := rnd.ask():
                rnd.tell([exp.evaluate(r.genome, r.tokens)[0]["kl"] for r in requests])
            figures = heldout_metrics(
                exp,
                {
                    "dense": None,
                    exp.space.baseline_name: exp.space.uniform(),
                    f"best_of_{args.random}_random": rnd.best_genome,
                    "searched": result.best,
                },
            )
            results[str(target)] = {
                **figures,
                "budget": {"average_bits": target, "achieved": exp.space.average_bits(result.best)},
                "search": {
                    "generations": args.generations,
                    "evaluations": result.evaluations,
                    "seconds": round(search_s, 1),
                },
            }
    first = results[str(args.targets[0])]  # top level: the first target, as in the other JSONs
    write_result(
        "bits",
        {
            "ppl": first["ppl"],
            "kl": first["kl"],
            "budget": first["budget"],
            "targets": results,
            "heldout_tokens": 8192,
            "compressor": "gptq g64",
        },
    )


if __name__ == "__main__":
    main()
