"""The ``evocomp`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from evocomp.errors import EvocompError

log = logging.getLogger("evocomp")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evocomp",
        description="Search where to compress a causal LM under a budget.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "config", nargs="?", help="YAML file or built-in config name (e.g. quickstart)"
        )
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set search.generations=10 (repeatable)",
        )

    p = sub.add_parser("search", help="search a compressed model (builds what it needs)")
    with_config(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument("--no-eval", action="store_true", help="skip the final held-out evaluation")

    p = sub.add_parser("database", help="variant database commands")
    dbsub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    with_config(dbsub.add_parser("build", help="build the variant database for a config"))
    with_config(
        dbsub.add_parser(
            "verify", help="check every block file of a config's database against its checksum"
        )
    )

    p = sub.add_parser(
        "eval", help="held-out perplexity and lm-eval tasks: dense vs uniform vs searched"
    )
    p.add_argument("run_dir")
    p.add_argument("--front", action="store_true", help="also every Pareto-front candidate")
    p.add_argument("--corpora", nargs="+", metavar="CORPUS", help="held-out corpora (e.g. books)")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="lm-eval tasks (e.g. arc_easy piqa)")
    p.add_argument("--limit", type=int, help="lm-eval documents per task")
    p.add_argument("--num-fewshot", type=int, help="lm-eval few-shot examples")

    p = sub.add_parser("export", help="save the searched model as a Hugging Face directory")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--format",
        default="hf",
        metavar="FORMAT",
        help="hf (default: every weight as a float), compressed-tensors (quantized layers "
        "packed; transformers, vLLM) or gguf (llama.cpp)",
    )
    p.add_argument(
        "--compact",
        action="store_true",
        help="width searches: physically smaller weights and a modeling file "
        "(load with trust_remote_code=True); default: removed heads/neurons zeroed",
    )

    p.add_argument(
        "--no-finetune",
        action="store_true",
        help="export the searched model even when the run holds a finished fine-tune",
    )

    p = sub.add_parser(
        "finetune",
        help="recovery fine-tuning of the searched model by distillation from the dense one",
    )
    p.add_argument("run_dir")
    p.add_argument("--tokens", type=int, help="training tokens (default 200000)")
    p.add_argument("--method", choices=["full", "lora"],
                   help="full: AdamW on the unfrozen weights (default); lora: peft LoRA adapters")
    p.add_argument("--teacher", choices=["dense", "none"],
                   help="dense: KL to the dense model's logits (default); none: LM loss only")
    p.add_argument("--lm-weight", type=float,
                   help="weight of the next-token loss (default 0 with a teacher, else 1)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-4 full, 1e-3 lora)")
    p.add_argument("--lora-rank", type=int, help="LoRA rank (default 16)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 4)")
    p.add_argument("--checkpoint-every", type=int, default=10, metavar="STEPS",
                   help="steps between checkpoints (default 10)")
    p.add_argument("--restart", action="store_true",
                   help="discard the run's fine-tune (finished or not) and start afresh")

    p = sub.add_parser(
        "report", help="plots and a markdown summary of a run (Pareto front, progress, layers)"
    )
    p.add_argument("run_dir")
    p.add_argument("--out", help="output directory (default: RUN_DIR/report)")

    p = sub.add_parser("configs", help="list the built-in configs")
    p.add_argument(
        "--reference",
        action="store_true",
        help="print the configuration reference (docs/configuration.md) instead",
    )

    p = sub.add_parser("sweep", help="run many searches as Ray Tune trials (a sweep file)")
    p.add_argument("sweep", help="sweep YAML file or built-in sweep name (e.g. sparsity_targets)")
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted sweep in its root"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        return _dispatch(args)
    except EvocompError as err:
        print(f"evocomp: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        saved = (
            "the fine-tune resumes from its last checkpoint when rerun"
            if args.command == "finetune"
            else "every finished evaluation is saved"
        )
        print(f"evocomp: interrupted; {saved}", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from evocomp import commands

    progress = not args.quiet
    if args.command == "search":
        if args.resume and args.config:
            raise EvocompError("give either a config or --resume RUN_DIR, not both")
        return commands.search(
            args.config, args.overrides, resume=args.resume, final=not args.no_eval,
            progress=progress,
        )
    if args.command == "database":
        if args.db_command == "verify":
            return commands.database_verify(args.config, args.overrides, progress=progress)
        return commands.database_build(args.config, args.overrides, progress=progress)
    if args.command == "eval":
        return commands.evaluate(
            Path(args.run_dir),
            front=args.front,
            corpora=args.corpora,
            tasks=args.tasks,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            progress=progress,
        )
    if args.command == "export":
        return commands.export(
            Path(args.run_dir), Path(args.out), fmt=args.format, compact=args.compact,
            finetuned=not args.no_finetune, progress=progress,
        )
    if args.command == "finetune":
        options = {k: getattr(args, k) for k in
                   ("tokens", "method", "teacher", "lm_weight", "lr", "lora_rank", "batch_size")}
        return commands.finetune(
            Path(args.run_dir), options, restart=args.restart,
            checkpoint_every=args.checkpoint_every, progress=progress,
        )
    if args.command == "report":
        return commands.report(Path(args.run_dir), Path(args.out) if args.out else None)
    if args.command == "configs":
        if args.reference:
            from evocomp.reference import config_reference

            sys.stdout.write(config_reference())
            return 0
        return commands.list_configs()
    if args.command == "sweep":
        return commands.sweep(args.sweep, resume=args.resume, progress=progress)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
