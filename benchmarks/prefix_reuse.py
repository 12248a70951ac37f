"""Prefix reuse over a whole quickstart search: mean candidate cost over a dense forward
on the same tokens, with and without prefix reuse, measured in one run.

    python benchmarks/prefix_reuse.py [--config quickstart] [--sample 24] [--set k=v ...]

Runs the search (prefix reuse on, as by default) and takes each evaluation's seconds
from its trial store; the dense forward's seconds per token are measured in the same
process. Then ``--sample`` of its evaluations, evenly spread over the search, are
scored again plainly (apply + full forward + KL): their cost gives the plain ratio, and
their scores must equal the search's bit for bit. Target: prefix / dense <= 0.7
(plain was 1.02).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from _common import DEVICE, add_overrides, timed_search, write_result

from evocomp.evaluators.base import forward_logits
from evocomp.search.store import decode_genome


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="quickstart")
    ap.add_argument("--sample", type=int, default=24)
    add_overrides(ap)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        exp, result, search_s = timed_search(args.config, [f"run_dir={run_dir}", *args.overrides])
        trials = pd.read_parquet(run_dir / "trials.parquet").sort_values("number")
    trials = trials[trials["role"] != "probe"]
    ev = exp.evaluator

    def sync() -> None:  # CUDA runs asynchronously: time finished work only
        if exp.model.device.type == "cuda":
            torch.cuda.synchronize()

    def dense_seconds(rows: torch.Tensor) -> float:
        sync()
        started = time.perf_counter()
        with torch.inference_mode():
            for batch in rows.split(ev.batch_size):
                forward_logits(exp.model, batch)
        sync()
        return time.perf_counter() - started

    tokens = [ev.sequences_for(int(t)) * ev.tokens.shape[1] for t in trials["tokens"]]
    per_token = min(dense_seconds(ev.tokens[:4]) for _ in range(3)) / ev.tokens[:4].numel()
    prefix = trials["seconds"].sum() / (sum(tokens) * per_token)
    step = max(1, len(trials) // args.sample)
    plain_s = dense_s = 0.0
    checked = 0
    for _, row in trials.iloc[::step].iterrows():
        genome, budget = decode_genome(row["genome"]), int(row["tokens"])
        dense_s += dense_seconds(ev.tokens[: ev.sequences_for(budget)])
        sync()
        started = time.perf_counter()
        with exp.swapper.apply(genome) as model:
            metrics = ev.evaluate(model, budget)
        sync()
        plain_s += time.perf_counter() - started
        if metrics[type(ev).metric] != row["fitness"]:
            raise AssertionError(f"prefix reuse changed a score: {row['fitness']} -> {metrics}")
        checked += 1
    figures = {
        "candidate_cost_ratio": {"plain": round(plain_s / dense_s, 4), "prefix": round(prefix, 4)},
        "blocks_run_share": None if exp.prefix is None else round(exp.prefix.share_run, 4),
        "evaluations": len(trials),
        "tokens": sum(tokens),
        "plain_sampled": checked,
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
