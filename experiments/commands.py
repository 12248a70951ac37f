"""What each ``evocomp`` subcommand does (the CLI only parses arguments)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import ValidationError

from evocomp.config import (
    BUILTIN_CONFIGS,
    FinalEvalConfig,
    format_validation_error,
    load_config,
)
from evocomp.errors import EvocompError
from evocomp.final_eval import final_eval
from evocomp.results import markdown_table
from evocomp.runner import (
    Experiment,
    load_best,
    load_run_config,
    prepare_run_dir,
    run_search,
)
from evocomp.spaces.units import Unit
from evocomp.supernet.sublayers import without_blocks
from evocomp.supernet.units import find_sublayer_units

log = logging.getLogger("evocomp")


@contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


def search(
    config: str | None,
    overrides: list[str],
    *,
    resume: str | None = None,
    final: bool = True,
    progress: bool = True,
) -> int:
    if resume:
        cfg, _ = load_run_config(resume)
        if overrides:
            raise EvocompError("--set cannot change a run being resumed; start a new run")
    else:
        cfg = load_config(config or "quickstart", overrides)
    exp = Experiment(cfg, progress=progress)
    # Everything that can fail is checked before the run directory exists, so a
    # failed start leaves nothing behind that would block the fixed rerun.
    exp.check(final_eval=final and cfg.final_eval.enabled)
    cfg = exp.cfg  # with what the space measured (e.g. sublayer timings)
    run = prepare_run_dir(cfg, resume=bool(resume))
    with _logging_to(run.log):
        log.info("run directory: %s", run.path)
        result = run_search(exp, run)
        print(f"best genome and per-layer levels: {run.best}")
        if final and cfg.final_eval.enabled:
            report = final_eval(exp, run, result.best)
            print(_table(report))
    return 0


def _table(report: dict[str, Any]) -> str:
    """The held-out perplexities and KLs; with other corpora or tasks, the whole
    comparison, and which corpora the search saw."""
    rows = report.get("rows", [])
    tasks = bool(rows) and any(k.startswith("task.") for k in rows[0])
    corpora = report.get("corpora", [])
    if tasks or len(corpora) > 1:
        keep = [
            c
            for c in rows[0]
            if c in ("name", "cost_of_budget")
            or c.startswith(("ppl.", "kl."))
            or (c.startswith("task.") and c.endswith("accuracy"))
        ]
        seen = report.get("seen", {})
        marks = ", ".join(f"{c} ({'seen' if seen.get(c) else 'not seen'})" for c in corpora)
        return markdown_table(pd.DataFrame(rows)[keep]) + f"\nheld-out corpora: {marks}"
    # The held-out sequences are never scored by the search; their corpus may be.
    names = ", ".join(corpora)
    seen = all(report.get("seen", {}).get(c, True) for c in corpora)
    about = f"the search scored other {names} text" if seen else "a corpus the search never saw"
    lines = [f"held-out perplexity and KL to dense ({report['heldout_tokens']} held-out "
             f"tokens of {names}; {about})"]
    kl = report.get("kl", {})
    for name, ppl in report["ppl"].items():
        lines.append(f"  {name:<9} ppl {ppl:10.3f}   kl {kl.get(name, float('nan')):.5f}")
    return "\n".join(lines)


def database_build(config: str | None, overrides: list[str], *, progress: bool = True) -> int:
    cfg = load_config(config or "quickstart", overrides)
    exp = Experiment(cfg, progress=progress)
    db = exp.database
    if db is None:
        print(f"space {cfg.space.name!r} needs no variant database")
    else:
        print(f"variant database ready: {db.root}")
    return 0


def database_verify(config: str | None, overrides: list[str], *, progress: bool = True) -> int:
    """Hash every block file of the config's variant database and compare it with
    the checksum recorded when it was written; builds nothing."""
    import shlex

    from evocomp.supernet.database import verify_database

    cfg = load_config(config or "quickstart", overrides)
    exp = Experiment(cfg, progress=progress)
    spec = exp.database_spec()
    if not spec.variants:
        print(f"space {cfg.space.name!r} needs no variant database")
        return 0
    root = exp.database_root(spec)
    found = verify_database(root, spec)
    for name, why in found.problems.items():
        print(f"{root / name} {why}")
    checked = found.files - len(found.problems) - found.unchecked
    size = found.hashed_bytes
    hashed = f"{size / 2**30:.2f} GB" if size >= 2**30 else f"{size / 2**20:.1f} MB"
    summary = (
        f"{root}: {found.files} block files, {hashed} hashed in {found.seconds:.1f} s; "
        f"{checked} match their checksums"
    )
    if found.unchecked:
        summary += (
            f", {found.unchecked} readable but with no checksums (built before checksums "
            "were recorded)"
        )
    if found.problems:
        summary += f", {len(found.problems)} missing or corrupt"
    print(summary)
    if found.problems:
        names = sorted(found.problems)
        build = shlex.join(
            ["evocomp", "database", "build", *([config] if config else []),
             *(a for kv in overrides for a in ("--set", kv))]
        )
        raise EvocompError(
            f"{len(names)} of {found.files} block files of {root} are missing or corrupt "
            f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); "
            f"`{build}` rebuilds them"
        )
    return 0


def evaluate(
    run_dir: Path,
    *,
    front: bool = False,
    corpora: list[str] | None = None,
    tasks: list[str] | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    progress: bool = True,
) -> int:
    """Score the run's best genome (``front``: its whole Pareto front) and the dense
    and uniform baselines on held-out perplexity and KL to the dense model of each
    corpus (the run's own, its mixture's parts, ``corpora``; marked seen or not by the
    search) and on lm-eval tasks; settings not given come from the run's
    ``final_eval`` section."""
    cfg, run = load_run_config(run_dir)
    best = load_best(run)
    fe = cfg.final_eval.model_dump()
    if front:
        fe["front"] = True
    if corpora:
        fe["corpora"] = corpora
    if tasks or limit is not None or num_fewshot is not None:
        downstream = dict(fe.get("downstream") or {})
        for key, value in (("tasks", tasks), ("limit", limit), ("num_fewshot", num_fewshot)):
            if value is not None:
                downstream[key] = value
        fe["downstream"] = downstream
    try:
        cfg = cfg.model_copy(update={"final_eval": FinalEvalConfig(**fe)})
    except ValidationError as err:
        raise EvocompError(
            "bad evaluation options: " + format_validation_error(err, FinalEvalConfig)
        ) from None
    with _logging_to(run.log):
        report = final_eval(Experiment(cfg, progress=progress), run, best)
    print(_table(report))
    print(f"table: {run.path / 'eval.md'} ({run.path / 'eval.parquet'})")
    return 0


def finetune(
    run_dir: Path,
    options: dict[str, Any],
    *,
    restart: bool = False,
    checkpoint_every: int = 10,
    progress: bool = True,
) -> int:
    """Recovery fine-tuning of the run's best candidate (see :mod:`evocomp.finetune`):
    ``options`` are the command line's (``tokens``, ``method``, ``teacher``, ...; None
    where not given). Resumes a killed fine-tune; reuses a finished one."""
    from evocomp.finetune import recover, table

    cfg, run = load_run_config(run_dir)
    best = load_best(run)
    with _logging_to(run.log):
        report, reused = recover(
            cfg, run, best, options, restart=restart, checkpoint_every=checkpoint_every,
            progress=progress,
        )
    print(table(report))
    done = "reused the finished fine-tune in" if reused else "fine-tuned weights and table in"
    print(f"{done} {run.path / 'finetune'} (`evocomp export {run.path} --out DIR` exports it)")
    return 0


def export(
    run_dir: Path,
    out: Path,
    *,
    fmt: str = "hf",
    compact: bool = False,
    finetuned: bool = True,
    progress: bool = True,
) -> int:
    """Write the searched model in ``fmt`` (see :mod:`evocomp.export`): ``hf``, a
    directory plain ``from_pretrained(out)`` loads; ``compressed-tensors``, the same
    with quantized layers packed; ``gguf``, one llama.cpp file. With ``compact``
    (``hf`` only), narrowed sublayers at their narrow size and a modeling file
    beside them (loaded with ``trust_remote_code=True``). A finished fine-tune of
    the best genome (``evocomp finetune``) is exported with its trained weights
    unless ``finetuned`` is False. Nothing is left in ``out`` when it fails."""
    from evocomp.export import FORMATS

    if fmt not in FORMATS:
        raise EvocompError(f"--format {fmt!r} is not a format; choose one of {', '.join(FORMATS)}")
    if compact and fmt != "hf":
        raise EvocompError(f"--compact writes --format hf only, not --format {fmt}")
    cfg, run = load_run_config(run_dir)
    best = load_best(run)
    if out.exists() and not out.is_dir():
        raise EvocompError(f"--out {out} is a file; choose a new --out directory")
    if out.exists() and any(out.iterdir()):
        raise EvocompError(f"--out {out} exists and is not empty; choose a new --out directory")
    tmp = out.with_name(out.name + ".partial")
    try:  # before loading the model: an unwritable place fails at once
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as err:
        raise EvocompError(f"--out {out}: cannot write there ({err.strerror})") from None
    try:
        exp = Experiment(cfg, progress=progress)
        summary = _write_export(exp, cfg, run, best, tmp, fmt, compact=compact,
                                finetuned=finetuned)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _normal_modes(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    tuned = summary["finetune"]
    size = f"{summary['size_bytes'] / 2**20:.1f} MiB"
    if tuned is None:
        print(f"exported to {out} ({fmt}, {size})")
    else:
        o = tuned["options"]
        print(f"exported the fine-tuned model ({o['method']}, {tuned['tokens']} tokens; "
              f"held-out ppl {tuned['ppl']['after']:.3f}) to {out} ({fmt}, {size})")
    return 0


def _write_export(
    exp: Experiment, cfg: Any, run: Any, best: Any, tmp: Path, fmt: str, *, compact: bool,
    finetuned: bool,
) -> dict[str, Any]:
    """Write the export into ``tmp`` and return what evocomp.json says of it."""
    import sys

    from evocomp.export import (
        GGUF_FILE,
        check_format,
        compressed_state_dict,
        folder_bytes,
        gguf_plan,
        layer_formats,
        quantized_layers,
        warnings_for,
        write_quantization_config,
    )
    from evocomp.finetune import export_weights
    from evocomp.finetune import finetuned as finished_finetune
    from evocomp.gguf_export import write_gguf
    from evocomp.supernet.training import loaded_weights

    tuned = finished_finetune(run, best) if finetuned else None
    weights = {} if tuned is None else tuned.weights
    removed = exp.swapper.removed(best)
    storage: dict[str, Any] = {"format": fmt}
    if compact:
        from evocomp.supernet.compact_llama import CompactLlamaConfig, CompactLlamaForCausalLM
        from evocomp.supernet.shrink import compact_copy

        empty: set[int] = set()
        with exp.applied(best) as model, loaded_weights(model, weights):
            small = compact_copy(model, {u.name for u in removed})
        # Writes the modeling file beside the weights and the config's auto_map.
        CompactLlamaConfig.register_for_auto_class()
        CompactLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
        small.save_pretrained(tmp)
        del small
    else:
        empty = _fully_removed_blocks(exp, removed)
        with (
            exp.applied(best, export=True) as model,
            loaded_weights(model, export_weights(exp, best, model, weights)),
        ):
            layers, off_grid = quantized_layers(exp, best, model)
            check_format(fmt, layers)
            plan = gguf_plan(exp, best, model, layers) if fmt == "gguf" else None
            for line in warnings_for(fmt, layers, plan):
                print(f"evocomp: warning: {line}", file=sys.stderr)
            storage = layer_formats(fmt, layers, off_grid, plan)
            with without_blocks(model, empty), _with_cache(model):
                if plan is not None:
                    names = {id(m): n for n, m in model.named_modules()}
                    written = write_gguf(
                        model, exp.loaded.tokenizer, tmp / GGUF_FILE,
                        {names[id(m)]: t for m, t in plan.types.items()},
                        source=exp.loaded.gguf,
                    )
                    storage["file_type"] = written["file_type"]
                elif fmt == "compressed-tensors" and layers:
                    state, quantization = compressed_state_dict(model, layers)
                    model.save_pretrained(tmp, state_dict=state)
                    write_quantization_config(tmp, quantization)
                else:  # hf, or nothing quantized to pack
                    model.save_pretrained(tmp)
    if fmt != "gguf":  # a GGUF file holds its tokenizer
        exp.loaded.tokenizer.save_pretrained(tmp)
    summary = {
        "source_model": exp.loaded.source,
        "space": cfg.space.dump(),
        "compressor": cfg.compressor.dump(),
        "genome": list(best),
        "removed_blocks": sorted(empty),
        "compact": compact,
        "storage": storage,
        "size_bytes": folder_bytes(tmp),
        "layers": exp.space.describe(best),
        "finetune": None if tuned is None else _finetune_summary(tuned.record),
    }
    (tmp / "evocomp.json").write_text(json.dumps(summary, indent=2))
    return summary


def _finetune_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What evocomp.json says of the fine-tune whose weights it holds."""
    options = record["options"]
    summary = {k: record[k] for k in ("tokens", "steps", "ppl", "kl")}
    summary["options"] = options
    if options["method"] == "lora" and record.get("frozen_quantized"):
        summary["note"] = ("LoRA adapters merged into quantized weights: those weights are "
                           "no longer on their quantization grid")
    return summary


@contextmanager
def _with_cache(model: Any) -> Iterator[None]:
    """The loader turns the KV cache off for scoring (``config.use_cache``); a saved
    model must generate with it, as the model it came from does."""
    saved = model.config.use_cache
    model.config.use_cache = True
    try:
        yield
    finally:
        model.config.use_cache = saved


def _normal_modes(folder: Path) -> None:
    """Give the exported files the modes of any file written here (safetensors
    writes its own as 0600): readable by whom the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _fully_removed_blocks(exp: Experiment, removed: list[Unit]) -> set[int]:
    """Blocks whose every sublayer is ``removed``: export leaves them out."""
    if not removed:
        return set()
    names = {u.name for u in removed}
    by_block: dict[int, list[str]] = {}
    for u in find_sublayer_units(exp.model):
        by_block.setdefault(u.block, []).append(u.name)
    return {b for b, found in by_block.items() if set(found) <= names}


def list_configs() -> int:
    for path in sorted(BUILTIN_CONFIGS.glob("*.yaml")):
        print(path.stem)
    return 0


def report(run_dir: Path, out: Path | None = None) -> int:
    """Plots (pareto.png, progress.png, allocation.png) and report.md of a run,
    in ``out`` (default ``RUN_DIR/report``); loads no model."""
    from evocomp.analysis import load_run, write_report

    path = write_report(load_run(run_dir), out)
    print(f"report written to {path}")
    return 0


def sweep(spec: str, *, resume: bool = False, progress: bool = True) -> int:
    """Run a sweep file (or built-in sweep) on Ray Tune and print its results table."""
    import sys

    from evocomp.sweep import load_sweep, results_markdown, run_sweep, sweep_root

    table = run_sweep(spec, resume=resume, progress=progress)
    root = sweep_root(load_sweep(spec))
    print(results_markdown(table))
    print(f"results: {root / 'results.parquet'} (run directories in {root / 'runs'})")
    failed = table[table.status != "done"] if not table.empty else table
    for row in failed.itertuples():
        print(f"{row.search}: {row.status} {row.error}".rstrip(), file=sys.stderr)
    if len(failed):
        print(
            f"evocomp: {len(failed)} of {len(table)} searches did not finish; "
            "`evocomp sweep ... --resume` continues them",
            file=sys.stderr,
        )
        return 1
    return 0


__all__ = [
    "database_build",
    "database_verify",
    "evaluate",
    "export",
    "finetune",
    "list_configs",
    "search",
]
