"""Training-aware selection (DarwinLM) against plain selection, judged after the
same recovery fine-tune: does fine-tuning candidates during selection pick a genome
that recovers better?

    python benchmarks/training_aware.py [--tiny] [--generations 8]
        [--train 1024 4096] [--lr 1e-4] [--recover 16384] [--name N] [--set k=v ...]

Both searches are the same EvoPress width search (the built-in ``width`` config,
50% of block parameters; ``--tiny``: the tiny uneven Llama of the tests, built in
memory), with the same seed; the training-aware one fine-tunes every candidate of
stage k on ``--train[k]`` calibration tokens (all weights, AdamW) before
scoring it (distilled from the dense model). Each picked genome is then fine-tuned
the same way, ``evocomp finetune --tokens RECOVER --lr LR``, and scored on held-out
text. Figures: held-out KL to dense and perplexity before and after recovery,
evaluation and training tokens of each search, wall seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from _common import DEVICE, add_overrides, write_result

from evocomp.cli import main as evocomp


def _tiny_model(root: Path) -> str:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import _saved, uneven_llama

    return str(_saved(uneven_llama(), root / "uneven-llama"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiny", action="store_true", help="the tiny uneven Llama, not SmolLM2")
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--train", type=int, nargs=2, default=[1024, 4096],
                    help="training tokens per candidate at the two stages")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--recover", type=int, default=16384, help="recovery fine-tune tokens")
    ap.add_argument("--recover-lr", type=float, help="its learning rate (default: --lr)")
    ap.add_argument("--name", help="results/<name>.json (default: training_aware[.tiny])")
    add_overrides(ap)
    args = ap.parse_args()
    stages = "[{tokens: 512, keep: 2}, {tokens: 2048, keep: 1}]"
    figures: dict = {"kl_after_recovery": {}, "kl_before_recovery": {}, "ppl_after_recovery": {},
                     "tokens": {}, "train_tokens": {}, "seconds": {}, "genome": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = [f"model.device={DEVICE}", f"search.generations={args.generations}",
                f"search.offspring={args.offspring}", f"search.stages={stages}",
                "final_eval.enabled=false"]
        if args.tiny:
            base += [
                f"model.name={_tiny_model(Path(tmp))}", "data.seq_len=64", "data.calibration=128",
                "data.search=32", "data.heldout=32",
                "search.stages=[{tokens: 256, keep: 2}, {tokens: 1024, keep: 1}]",
                "space={name: width, target: 0.5, step: 0.25, levels: 2, neuron_multiple: 16}",
                f"database.path={tmp}/db",
            ]
        train = f"search.train={{tokens: [{args.train[0]}, {args.train[1]}], lr: {args.lr}}}"
        for name, extra in (("plain", []), ("training_aware", [train])):
            run = f"{tmp}/{name}"
            started = time.perf_counter()
            argv = ["-q", "search", "width", "--set", f"run_dir={run}"]
            for o in [*base, *extra, *args.overrides]:
                argv += ["--set", o]
            assert evocomp(argv) == 0
            searched = time.perf_counter() - started
            trials = pd.read_parquet(f"{run}/trials.parquet")
            figures["tokens"][name] = int(trials.spent.sum())
            spent = trials.get("metric.train_tokens", pd.Series([0]))
            figures["train_tokens"][name] = int(spent.sum())
            figures["genome"][name] = json.loads(Path(f"{run}/best.json").read_text())["genome"]
            started = time.perf_counter()
            lr = args.recover_lr or args.lr
            ft = ["-q", "finetune", run, "--tokens", str(args.recover), "--lr", str(lr)]
            assert evocomp(ft) == 0
            report = json.loads(Path(f"{run}/finetune/finetune.json").read_text())
            figures["seconds"][name] = {"search": round(searched, 1),
                                        "recovery": round(time.perf_counter() - started, 1)}
            figures["kl_before_recovery"][name] = round(report["kl"]["before"], 5)
            figures["kl_after_recovery"][name] = round(report["kl"]["after"], 5)
            figures["ppl_after_recovery"][name] = round(report["ppl"]["after"], 4)
            print(name, {k: v[name] for k, v in figures.items()}, flush=True)
    figures["recovery_tokens"] = args.recover
    figures["settings"] = {
        "train": args.train, "lr": args.lr, "recover_lr": args.recover_lr or args.lr,
        "generations": args.generations, "offspring": args.offspring,
    }
    figures["model"] = "tiny uneven Llama" if args.tiny else "SmolLM2-135M"
    default = "training_aware.tiny" if args.tiny else "training_aware"
    write_result(args.name or default, figures)


if __name__ == "__main__":
    main()
