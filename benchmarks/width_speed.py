"""Narrower blocks, really faster? Prefill tokens/s of SmolLM2-135M with every block
narrowed in place by ``evocomp.supernet.shrink`` (some query heads per KV group and
a share of the MLP neurons kept), over the dense model, measured interleaved in one
run. Groundwork for the width space (issue #12): which heads and neurons are kept
does not matter for speed, so the first ones are.

    python benchmarks/width_speed.py [--tokens 512] [--repeats 5] [--mlp 0.5] [--heads 6]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import ExitStack

import torch
from _common import DEVICE, write_result

from evocomp.config import load_config
from evocomp.runner import Experiment
from evocomp.supernet.shrink import heads_kept, neurons_kept
from evocomp.supernet.units import find_blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=512, help="prefill length")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mlp", type=float, default=0.5, help="share of MLP neurons kept")
    ap.add_argument("--heads", type=int, default=6, help="query heads kept per block")
    args = ap.parse_args()

    exp = Experiment(load_config("quickstart", [f"model.device={DEVICE}"]), progress=False)
    model = exp.model
    _, blocks = find_blocks(model)
    attn0, mlp0 = blocks[0].self_attn, blocks[0].mlp
    n_heads = attn0.q_proj.out_features // attn0.head_dim
    per = attn0.num_key_value_groups
    n_kv = n_heads // per
    if args.heads % n_kv:
        raise SystemExit(f"--heads must be a multiple of the {n_kv} KV groups")
    heads = torch.cat([torch.arange(args.heads // n_kv) + g * per for g in range(n_kv)])
    width = mlp0.down_proj.in_features
    neurons = torch.arange(round(args.mlp * width))
    dense_params = sum(p.numel() for b in blocks for p in b.parameters())

    shape = (args.batch, args.tokens)
    tokens = torch.randint(0, 1000, shape, generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(model.device)

    def prefill() -> float:
        if DEVICE != "cpu":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            model(tokens, use_cache=False)
        if DEVICE != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def narrowed() -> ExitStack:
        stack = ExitStack()
        for block in blocks:
            stack.enter_context(heads_kept(block.self_attn, heads))
            stack.enter_context(neurons_kept(block.mlp, neurons))
        return stack

    with narrowed():
        narrow_params = sum(p.numel() for b in blocks for p in b.parameters())
    prefill()  # warm-up of both paths
    with narrowed():
        prefill()
    dense, narrow = [], []
    for _ in range(args.repeats):
        dense.append(prefill())
        with narrowed():
            narrow.append(prefill())
    d, n = statistics.median(dense), statistics.median(narrow)
    n_tokens = args.batch * args.tokens
    figures = {
        "speedup": round(d / n, 3),
        "dense_tokens_per_s": round(n_tokens / d, 1),
        "narrow_tokens_per_s": round(n_tokens / n, 1),
        "block_params_kept": round(narrow_params / dense_params, 4),
        "heads_kept": f"{len(heads)}/{n_heads}",
        "mlp_kept": f"{len(neurons)}/{width}",
        "tokens": args.tokens,
        "batch": args.batch,
        "repeats": args.repeats,
        "model": "smollm2-135m",
    }
    for k, v in figures.items():
        print(f"{k}: {v}")
    write_result("width_speed", figures)


if __name__ == "__main__":
    main()
