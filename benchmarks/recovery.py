"""Recovery fine-tuning: how much of the held-out perplexity gap between the
quickstart's searched model (50% sparsity on SmolLM2-135M) and the dense model
``evocomp finetune`` closes.

    python benchmarks/recovery.py [--run RUN_DIR] [--tokens 200000] [--method full]
        [--lr LR] [--batch-size N] [--restart] [--set k=v ...]

The search recovery.json was recorded on (the quickstart's former EvoPress search,
20 generations) runs first into ``--run`` (default ``runs/recovery``; about 7
minutes on 2 CPU cores; ``--set`` overrides apply to it) unless that directory
holds a finished search, which is reused. The fine-tune goes to ``RUN/finetune``: a
killed benchmark resumes it from its last checkpoint when rerun, and a finished one
is reused (``--restart`` redoes it). Figures: held-out perplexity and KL to the
dense model of dense / before / after, the training tokens and training seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import DEVICE, EVOPRESS, add_overrides, write_result

from evocomp import commands


def _finished(run: Path) -> bool:
    best = run / "best.json"
    if not best.exists():
        return False
    done, total = json.loads(best.read_text())["progress"]
    return done >= total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", default="runs/recovery", help="the quickstart search's run dir")
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--method", default="full", choices=["full", "lora"])
    ap.add_argument("--lr", type=float, help="default: evocomp finetune's for the method")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--restart", action="store_true", help="redo a finished fine-tune")
    add_overrides(ap)
    args = ap.parse_args()
    run = Path(args.run)
    if not _finished(run):
        if (run / "config.yaml").exists():
            commands.search(None, [], resume=str(run), final=False, progress=True)
        else:
            # The search recovery.json was recorded on: the quickstart's former
            # EvoPress search, 20 generations.
            overrides = [f"run_dir={run}", f"model.device={DEVICE}", EVOPRESS,
                         "search.generations=20", *args.overrides]
            commands.search("quickstart", overrides, final=False, progress=True)
    options = {"tokens": args.tokens, "method": args.method, "lr": args.lr,
               "batch_size": args.batch_size}
    commands.finetune(run, options, restart=args.restart, progress=True)
    report = json.loads((run / "finetune" / "finetune.json").read_text())
    write_result(
        "recovery",
        {
            "ppl": {k: round(v, 4) for k, v in report["ppl"].items()},
            "kl": {k: round(v, 5) for k, v in report["kl"].items()},
            "gap_closed": None if report["gap_closed"] is None else round(report["gap_closed"], 4),
            "tokens": report["tokens"],
            "seconds": report["seconds"],
            "steps": report["steps"],
            "heldout_tokens": report["heldout_tokens"],
            "options": report["options"],
            "search": {"run": str(run), "overrides": args.overrides},
        },
    )


if __name__ == "__main__":
    main()
