"""Prefix reuse over a whole quickstart search: mean candidate cost over a dense forward
on the same tokens, with and without prefix reuse, measured in one run.

    python benchmarks/prefix_reuse.py [--config quickstart] [--set k=v ...]

Runs the search once (prefix reuse on, as by default), then replays its evaluations in
the order the search made them; for each one, interleaved so machine noise hits all
alike: a dense forward on the candidate's tokens, the candidate scored plainly
(apply + forward + KL), and scored with prefix reuse (a fresh cache, so it sees exactly
what the search saw). Also checks that both scorings agree bit for bit.
Target: prefix / dense <= 0.7 (plain was 1.02).
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
from evocomp.supernet.prefix import PrefixCache, block_signature


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="quickstart")
    add_overrides(ap)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        exp, result, search_s = timed_search(args.config, [f"run_dir={run_dir}", *args.overrides])
        trials = pd.read_parquet(run_dir / "trials.parquet").sort_values("number")
    ev, space = exp.evaluator, exp.space
    cache = PrefixCache(
        exp.model, forward_logits, max_bytes=int(exp.cfg.database.prefix_gb * 2**30)
    )

    def sync() -> None:  # CUDA runs asynchronously: time finished work only
        if exp.model.device.type == "cuda":
            torch.cuda.synchronize()

    dense = plain = prefix = 0.0
    tokens = 0
    for genome_text, budget in zip(trials["genome"], trials["tokens"], strict=True):
        genome = decode_genome(genome_text)
        n = ev.sequences_for(int(budget))
        rows = ev.tokens[:n]
        sync()
        started = time.perf_counter()
        with torch.inference_mode():
            for batch in rows.split(ev.batch_size):
                forward_logits(exp.model, batch)
        sync()
        dense += time.perf_counter() - started
        started = time.perf_counter()
        with exp.swapper.apply(genome) as model:
            full = ev.evaluate(model, int(budget))
        sync()
        plain += time.perf_counter() - started
        started = time.perf_counter()
        signature = block_signature(cache.n_blocks, space.placements(genome))
        with exp.swapper.apply(genome) as model:
            reused = ev.evaluate(model, int(budget), forward=cache.forward(signature))
        sync()
        prefix += time.perf_counter() - started
        if reused != full:
            raise AssertionError(f"prefix reuse changed a score: {reused} != {full}")
        tokens += rows.numel()
    figures = {
        "candidate_cost_ratio": {
            "plain": round(plain / dense, 4), "prefix": round(prefix / dense, 4),
        },
        "blocks_run_share": round(cache.share_run, 4),
        "evaluations": len(trials),
        "tokens": tokens,
        "dense_s": round(dense, 2), "plain_s": round(plain, 2), "prefix_s": round(prefix, 2),
        "search_s": round(search_s, 1),
        "search_kl": result.fitness,
        "prefix_gb": exp.cfg.database.prefix_gb,
        "device": DEVICE,
        "config": args.config,
    }
    write_result("prefix_reuse", figures)


if __name__ == "__main__":
    main()
