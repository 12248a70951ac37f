"""Asking for speed instead of size: a width search on SmolLM2-135M with the measured
latency as its cost (``space.cost: latency``), and what the compact model it finds
really runs at.

    python benchmarks/width_latency.py [--speedup 1.5] [--generations 20] [--set k=v ...]

The budget is the blocks' sublayer time over ``--speedup`` (``space.target =
1 / speedup``), timed per sublayer width on this machine (prefill of one 512-token
sequence). Figures: the predicted block speed-up (dense table cost / searched cost),
the measured prefill and decode speed-up of the compact model (whole model: embedding
and LM head included, so below the blocks' own), its share of block parameters kept,
and held-out perplexity / KL against the parameter-budget search at the same share.
"""

from __future__ import annotations

import argparse
import tempfile

from _common import DEVICE, add_overrides, heldout_metrics, timed_search, write_result
from width import _speed

from evocomp.supernet.shrink import compact_copy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--speedup", type=float, default=1.5)
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--speed-repeats", type=int, default=5)
    ap.add_argument("--db", help="database.path to reuse (e.g. benchmarks/width.py's)")
    ap.add_argument(
        "--compare", action="store_true",
        help="also search with the parameter budget at the share of parameters found",
    )
    add_overrides(ap)
    args = ap.parse_args()
    target = round(1 / args.speedup, 4)
    base = [f"model.device={DEVICE}", f"search.generations={args.generations}",
            *([f"database.path={args.db}"] if args.db else []), *args.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        exp, result, seconds = timed_search(
            "width",
            [*base, "space.cost=latency", f"space.target={target}", f"run_dir={tmp}/latency"],
        )
        space = exp.space
        dense_ns = space.cost_axis().scale
        predicted = dense_ns / space.cost(result.best)
        kept_params = space.params_kept(result.best)
        figures = heldout_metrics(exp, {"dense": None, "latency_budget": result.best})
        with exp.applied(result.best) as model:
            removed = {u.name for u in exp.swapper.removed(result.best)}
            compact = compact_copy(model, removed)
        speed = _speed(exp.model, compact, args.speed_repeats)
        del compact
        same: dict[str, dict[str, float]] = {"ppl": {}, "kl": {}}
        if args.compare:  # the same share of parameters, searched with the parameter budget
            pexp, presult, _ = timed_search(
                "width",
                [*base, f"space.target={round(kept_params, 4)}", f"run_dir={tmp}/params"],
                exp.loaded,
            )
            same = heldout_metrics(pexp, {"params_budget": presult.best})
    write_result(
        "width_latency",
        {
            "speedup_asked": args.speedup,
            "predicted_block_speedup": round(predicted, 3),
            "speed": speed,
            "block_params_kept": round(kept_params, 4),
            "ppl": {**figures["ppl"], **same["ppl"]},
            "kl": {**figures["kl"], **same["kl"]},
            "latency_table_ms": {
                k: {c: round(t / 1e6, 3) for c, t in v.items()}
                for k, v in (space.params.latency or {}).items()
            },
            "genome": space.describe(result.best),
            "search_seconds": round(seconds, 1),
            "search": {"generations": args.generations, "overrides": args.overrides},
        },
    )


if __name__ == "__main__":
    main()
