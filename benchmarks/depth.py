"""Depth pruning: the EvoPress search vs the three baselines, on held-out text.

    python benchmarks/depth.py [--remove-fraction 0.25] [--generations 16] [--sleb-tokens 512]
        [--swap same-kind|any] [--start-from shortgpt] [--set k=v ...]

Removes a fraction of SmolLM2's 60 attention/MLP sublayers: EvoPress,
drop-last, ShortGPT (Block Influence on calibration text) and SLEB (greedy by
KL on search tokens). Figures: held-out perplexity and KL to the dense model.
"""

from __future__ import annotations

import argparse
import tempfile

from _common import add_overrides, heldout_metrics, timed_search, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--remove-fraction", type=float, default=0.25)
    ap.add_argument("--generations", type=int, default=16)
    ap.add_argument("--sleb-tokens", type=int, default=512)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--swap", default="same-kind", choices=["same-kind", "any"])
    ap.add_argument("--start-from", nargs="*", default=[], help="one-shot baselines")
    add_overrides(ap)
    args = ap.parse_args()
    searched = [
        f"search.generations={args.generations}",
        f"search.offspring={args.offspring}",
        f"search.start_from=[{', '.join(args.start_from)}]",
        f"space.swap={args.swap}",
    ]
    searches = {
        "drop-last": ["search={name: drop-last}"],
        "shortgpt": ["search={name: shortgpt}"],
        "sleb": [f"search={{name: sleb, tokens: {args.sleb_tokens}}}"],
        "searched": searched,
    }
    genomes, seconds, loaded, exp = {}, {}, None, None
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in searches.items():
            exp, result, search_s = timed_search(
                "depth",
                [
                    f"space.remove_fraction={args.remove_fraction}",
                    f"run_dir={tmp}/{name}",
                    *args.overrides,
                    *overrides,
                ],
                loaded,
            )
            loaded = exp.loaded
            genomes[name] = result.best
            seconds[name] = round(search_s, 1)
            print(f"{name}: {seconds[name]} s", flush=True)
        assert exp is not None
        figures = heldout_metrics(exp, {"dense": None, **genomes})
        removed = exp.space.budget
    write_result(
        "depth",
        {
            **figures,
            "budget": {
                "removed_sublayers": removed,
                "of": len(exp.space),
                "fraction": args.remove_fraction,
            },
            "seconds": seconds,
            "search": {
                "generations": args.generations,
                "offspring": args.offspring,
                "swap": args.swap,
                "start_from": args.start_from,
                "sleb_tokens": args.sleb_tokens,
                "overrides": args.overrides,
            },
        },
    )


if __name__ == "__main__":
    main()
