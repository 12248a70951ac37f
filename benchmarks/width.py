"""Structured width search on SmolLM2-135M against its baselines, the propagation
ablation, and the speed of the compact model.

    python benchmarks/width.py [--generations 20] [--removed 0.5 0.25]
        [--propagations expectation dense level] [--speed-repeats 5] [--set k=v ...]

For each share of block parameters removed: uniform width (every sublayer at the
target, same OBS database), depth at no fewer kept parameters (whole blocks removed,
the better of ShortGPT and an EvoPress depth search with the width search's
budget), and the EvoPress width search. The propagation ablation scores uniform
width at the first share for each ``compressor.propagate``; the searches use the
best of them. Speed: prefill of 512
tokens and greedy decode of 64 from an 8-token prompt, dense vs the compact
searched model (``compact_copy``, what ``export --compact`` saves), interleaved.
Figures: held-out perplexity and KL to the dense model (16 x 512 Wikipedia tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from typing import Any

import torch
from _common import (
    DEVICE,
    RESULTS,
    add_overrides,
    heldout_metrics,
    timed_search,
    write_result,
)

from evocomp.config import load_config
from evocomp.runner import Experiment
from evocomp.supernet.shrink import compact_copy


def _sync() -> None:
    if DEVICE != "cpu":
        torch.cuda.synchronize()


def _speed(dense: torch.nn.Module, compact: torch.nn.Module, repeats: int) -> dict[str, Any]:
    """Prefill and decode tokens/s of both models, measured interleaved."""
    device = next(dense.parameters()).device
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 1000, (1, 512), generator=gen).to(device)

    def prefill(model: torch.nn.Module) -> float:
        _sync()
        started = time.perf_counter()
        with torch.inference_mode():
            model(prompt, use_cache=False)
        _sync()
        return time.perf_counter() - started

    def decode(model: torch.nn.Module) -> float:
        _sync()
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                prompt[:, :8], max_new_tokens=64, min_new_tokens=64, do_sample=False,
                pad_token_id=0,
            )
        _sync()
        return time.perf_counter() - started

    out: dict[str, Any] = {}
    for name, fn, tokens in (("prefill", prefill, 512), ("decode", decode, 64)):
        fn(dense), fn(compact)  # warm-up
        times: dict[str, list[float]] = {"dense": [], "compact": []}
        for _ in range(repeats):
            times["dense"].append(fn(dense))
            times["compact"].append(fn(compact))
        d, c = statistics.median(times["dense"]), statistics.median(times["compact"])
        out[name] = {
            "dense_tokens_per_s": round(tokens / d, 1),
            "compact_tokens_per_s": round(tokens / c, 1),
            "speedup": round(d / c, 3),
        }
        print(f"{name}: {out[name]}", flush=True)
    return out


def _speed_only(args: argparse.Namespace) -> None:
    """Re-measure ``speed`` of the first target's recorded genome into width.json."""
    path = RESULTS / "width.json"
    figures = json.loads(path.read_text())
    first = str(args.removed[0])
    genome = tuple(row["level"] for row in figures["targets"][first]["genome"])
    cfg = load_config(
        "width",
        [f"space.target={round(1 - args.removed[0], 6)}", f"model.device={DEVICE}",
         f"database.path={args.db_root}/db-{figures['propagation_default']}", *args.overrides],
    )
    exp = Experiment(cfg, progress=False)
    with exp.applied(genome) as model:
        compact = compact_copy(model, {u.name for u in exp.swapper.removed(genome)})
    speed = _speed(exp.model, compact, args.speed_repeats)
    figures["quality_command"] = figures.get("quality_command", figures["command"])
    figures["quality_date"] = figures.get("quality_date", figures["date"])
    figures = {k: v for k, v in figures.items() if k not in ("command", "machine", "date")}
    figures["speed"], figures["speedup"] = speed, speed["prefill"]["speedup"]
    figures["speed_remeasured"] = "speed only (--speed-only), same genome and database"
    write_result("width", figures)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--removed", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument(
        "--propagations", nargs="+", default=["expectation", "dense", "level"],
        help="the ablation; the searches use the one whose uniform width is best",
    )
    ap.add_argument("--speed-repeats", type=int, default=5)
    ap.add_argument(
        "--db-root", help="keep the databases here (db-<propagation>), e.g. to re-run; "
        "default: a temporary directory"
    )
    ap.add_argument(
        "--speed-only", action="store_true",
        help="only re-measure the speed of the recorded 50%% genome (needs --db-root)",
    )
    add_overrides(ap)
    args = ap.parse_args()
    if args.speed_only:
        return _speed_only(args)
    loaded = None
    targets: dict[str, Any] = {}
    propagation: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    speed: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # The grid around 50% kept reaches 0..100%: one database serves every target.
        dbs = {p: f"{args.db_root or tmp}/db-{p}" for p in args.propagations}
        for mode in args.propagations:
            cfg = load_config(
                "width",
                [f"compressor.propagate={mode}", f"database.path={dbs[mode]}",
                 f"model.device={DEVICE}", *args.overrides],
            )
            exp = Experiment(cfg, progress=False)
            if loaded is not None:
                exp.loaded = loaded
            loaded = exp.loaded
            started = time.perf_counter()
            _ = exp.database
            seconds[f"database_{mode}"] = round(time.perf_counter() - started, 1)
            print(f"database ({mode}): {seconds[f'database_{mode}']} s", flush=True)
            figures = heldout_metrics(exp, {f"uniform-{mode}": exp.space.uniform()})
            propagation[mode] = {"ppl": figures["ppl"][f"uniform-{mode}"],
                                 "kl": figures["kl"][f"uniform-{mode}"]}
        # The searches use the propagation whose uniform width is closest to dense.
        default = min(propagation, key=lambda m: propagation[m]["kl"])
        print(f"searches use propagate={default}", flush=True)
        for removed in args.removed:
            kept = round(1 - removed, 6)
            base = [f"space.target={kept}", f"model.device={DEVICE}", *args.overrides]
            width = [f"database.path={dbs[default]}", f"compressor.propagate={default}",
                     f"search.generations={args.generations}"]
            exp, result, search_s = timed_search(
                "width", [*base, *width, f"run_dir={tmp}/width-{removed}"], loaded
            )
            seconds[f"search_width_{removed}"] = round(search_s, 1)
            total = sum(u.numel for u in exp.space.units)
            share = exp.space.cost(result.best) / total
            # Whole blocks, no more of them than width removes: depth keeps at least
            # as many parameters (the comparison leans its way).
            n_blocks = len({u.block for u in exp.space.units})
            blocks = math.floor(removed * n_blocks + 1e-9)
            depth_base = [
                "space.granularity=block", f"space.remove={2 * blocks}",
                "space.remove_fraction=null", "data.calibration=16",
            ]
            genomes: dict[str, Any] = {"uniform_width": exp.space.uniform(),
                                       "searched": result.best}
            depth: dict[str, Any] = {}
            for name, search in (
                ("shortgpt", "search={name: shortgpt}"),
                ("evopress", f"search.generations={args.generations}"),
            ):
                dexp, dres, ds = timed_search(
                    "depth",
                    [*depth_base, search, f"model.device={DEVICE}", *args.overrides,
                     f"run_dir={tmp}/depth-{name}-{removed}"],
                    loaded,
                )
                seconds[f"search_depth_{name}_{removed}"] = round(ds, 1)
                depth[name] = (dexp, dres.best)
            figures: dict[str, Any] = {"ppl": {}, "kl": {}}
            for name, (dexp, genome) in depth.items():
                f = heldout_metrics(dexp, {f"depth_{name}": genome})
                figures["ppl"][f"depth_{name}"] = f["ppl"][f"depth_{name}"]
                figures["kl"][f"depth_{name}"] = f["kl"][f"depth_{name}"]
            f = heldout_metrics(exp, {"dense": None, **genomes})
            figures["ppl"] |= f["ppl"]
            figures["kl"] |= f["kl"]
            best_depth = min(depth, key=lambda n: figures["kl"][f"depth_{n}"])
            figures["ppl"]["depth"] = figures["ppl"][f"depth_{best_depth}"]
            figures["kl"]["depth"] = figures["kl"][f"depth_{best_depth}"]
            figures["budget"] = {
                "block_params_kept": round(share, 4),
                "uniform_kept": round(exp.space.cost(exp.space.uniform()) / total, 4),
                "depth_blocks_removed": blocks,
                "depth_params_kept": round(1 - blocks / n_blocks, 4),
            }
            figures["genome"] = exp.space.describe(result.best)
            if removed == args.removed[0]:
                with exp.applied(result.best) as model:
                    removed_units = {u.name for u in exp.swapper.removed(result.best)}
                    compact = compact_copy(model, removed_units)
                speed = _speed(exp.model, compact, args.speed_repeats)
                del compact
            targets[str(removed)] = figures
    first = targets[str(args.removed[0])]
    write_result(
        "width",
        {
            "ppl": first["ppl"],
            "kl": first["kl"],
            "speedup": speed.get("prefill", {}).get("speedup"),
            "speed": speed,
            "budget": first["budget"],
            "targets": targets,
            "propagation": {m: v["ppl"] for m, v in propagation.items()},
            "propagation_kl": {m: v["kl"] for m, v in propagation.items()},
            "propagation_default": default,
            "seconds": seconds,
            "search": {"generations": args.generations, "overrides": args.overrides},
        },
    )


if __name__ == "__main__":
    main()
