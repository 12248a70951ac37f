"""Prefix reuse over a whole quickstart search: mean candidate cost over a dense forward
on the same tokens, with and without prefix reuse, measured in one run.

    python benchmarks/prefix_reuse.py [--config quickstart] [--every 3] [--set k=v ...]

Runs the search (prefix reuse on, as by default). Every ``--every``-th evaluation of
the search is paired, right before it, with a dense forward on the same tokens, and
right after it with the same candidate scored plainly (apply + full forward + KL);
pairing each evaluation with its own references keeps the ratios honest on a machine
whose load drifts. The plain scores must equal the search's bit for bit. The search
scores only rows it has not scored for the genome before (a later stage's new
sequences), so its cost is taken over a dense forward of those rows: the ratio is
per token scored, as the search counts tokens.
Target: prefix / dense <= 0.7 (plain was 1.02).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import DEVICE, add_overrides, write_result

from evocomp.config import load_config
from evocomp.evaluators.base import forward_logits
from evocomp.runner import Experiment, prepare_run_dir, run_search


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="quickstart")
    ap.add_argument("--every", type=int, default=3)
    add_overrides(ap)
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    cfg = load_config(args.config, [
        *args.overrides, f"model.device={DEVICE}", "final_eval.enabled=false",
        f"run_dir={Path(tmp.name) / 'run'}",
    ])
    exp = Experiment(cfg, progress=False)
    _ = exp.database, exp.evaluator
    ev = exp.evaluator
    sums = {"dense": 0.0, "dense_scored": 0.0, "prefix": 0.0, "plain": 0.0}
    seen = {"calls": 0, "paired": 0}
    search_evaluate = exp.evaluate

    def sync() -> None:  # CUDA runs asynchronously: time finished work only
        if exp.model.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):  # type: ignore[no-untyped-def]
        sync()
        started = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - started

    def dense(rows: torch.Tensor) -> None:
        with torch.inference_mode():
            for batch in rows.split(ev.batch_size):
                forward_logits(exp.model, batch)

    def plain(genome, tokens, draw):  # type: ignore[no-untyped-def]
        with exp.swapper.apply(genome) as model:
            return ev.evaluate(model, tokens, order=exp.order(draw))

    def paired(genome, tokens, train=None, draw=0):  # type: ignore[no-untyped-def]
        seen["calls"] += 1
        if train is not None or seen["calls"] % args.every:
            return search_evaluate(genome, tokens, train, draw)
        rows = ev.rows_for(tokens, exp.order(draw))
        _, d = timed(lambda: dense(ev.tokens[rows]))
        (metrics, _), s = timed(lambda: search_evaluate(genome, tokens, train, draw))
        reference, p = timed(lambda: plain(genome, tokens, draw))
        scored = metrics.get("scored_tokens", len(rows) * ev.tokens.shape[1])
        if reference != {k: v for k, v in metrics.items() if k != "scored_tokens"}:
            raise AssertionError(f"prefix reuse changed a score: {metrics} != {reference}")
        sums["dense"] += d
        # The search scored only rows it had not scored for this genome before: its
        # cost is over a dense forward of those (rows are equally long).
        sums["dense_scored"] += d * scored / (len(rows) * ev.tokens.shape[1])
        sums["prefix"] += s
        sums["plain"] += p
        seen["paired"] += 1
        return metrics, s

    exp.evaluate = paired  # type: ignore[method-assign]
    with tmp:
        started = time.perf_counter()
        result = run_search(exp, prepare_run_dir(cfg, resume=False))
        search_s = time.perf_counter() - started
    figures = {
        "candidate_cost_ratio": {
            "plain": round(sums["plain"] / sums["dense"], 4),
            "prefix": round(sums["prefix"] / sums["dense_scored"], 4),
        },
        "blocks_run_share": None if exp.prefix is None else round(exp.prefix.share_run, 4),
        "evaluations": seen["calls"],
        "paired": seen["paired"],
        "scores_equal_plain": True,
        "search_s": round(search_s, 1),
        "search_fitness": result.fitness,
        "prefix_gb": exp.cfg.database.prefix_gb,
        "device": DEVICE,
        "config": args.config,
    }
    write_result("prefix_reuse", figures)


if __name__ == "__main__":
    main()
