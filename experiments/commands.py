"""What each ``evocomp`` subcommand does (the CLI only parses arguments)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evocomp.config import BUILTIN_CONFIGS, load_config
from evocomp.errors import EvocompError
from evocomp.runner import (
    Experiment,
    final_eval,
    load_best,
    load_run_config,
    prepare_run_dir,
    run_search,
)
from evocomp.supernet.sublayers import (
    SUBLAYER_KINDS,
    find_sublayer_units,
    without_blocks,
)

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
    run = prepare_run_dir(cfg, resume=bool(resume))
    with _logging_to(run.log):
        log.info("run directory: %s", run.path)
        exp = Experiment(cfg, progress=progress)
        result = run_search(exp, run)
        print(f"best genome and per-layer levels: {run.best}")
        if final and cfg.final_eval.enabled:
            report = final_eval(exp, run, result.best)
            print(_table(report))
    return 0


def _table(report: dict[str, Any]) -> str:
    rows = [f"held-out perplexity ({report['heldout_tokens']} tokens)"]
    for name, ppl in report["ppl"].items():
        rows.append(f"  {name:<9} {ppl:10.3f}")
    return "\n".join(rows)


def database_build(config: str | None, overrides: list[str], *, progress: bool = True) -> int:
    cfg = load_config(config or "quickstart", overrides)
    exp = Experiment(cfg, progress=progress)
    db = exp.database
    if db is None:
        print(f"space {cfg.space.name!r} needs no variant database")
    else:
        print(f"variant database ready: {db.root}")
    return 0


def evaluate(run_dir: Path, *, progress: bool = True) -> int:
    cfg, run = load_run_config(run_dir)
    best = load_best(run)
    with _logging_to(run.log):
        report = final_eval(Experiment(cfg, progress=progress), run, best)
    print(_table(report))
    return 0


def export(run_dir: Path, out: Path, *, progress: bool = True) -> int:
    """Write the searched model so plain ``from_pretrained(out)`` loads it."""
    cfg, run = load_run_config(run_dir)
    best = load_best(run)
    if out.exists() and any(out.iterdir()):
        raise EvocompError(f"{out} exists and is not empty; choose a new --out directory")
    exp = Experiment(cfg, progress=progress)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    empty = _fully_removed_blocks(exp, best)
    with exp.applied(best, export=True) as model, without_blocks(model, empty):
        model.save_pretrained(tmp)
    exp.loaded.tokenizer.save_pretrained(tmp)
    (tmp / "evocomp.json").write_text(
        json.dumps(
            {
                "source_model": exp.loaded.source,
                "space": cfg.space.dump(),
                "compressor": cfg.compressor.dump(),
                "genome": list(best),
                "removed_blocks": sorted(empty),
                "layers": exp.space.describe(best),
            },
            indent=2,
        )
    )
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    print(f"exported to {out}")
    return 0


def _fully_removed_blocks(exp: Experiment, genome: tuple[int, ...]) -> set[int]:
    """Blocks whose every sublayer the genome removes: export leaves them out."""
    removed = {u.name for u, _ in exp.space.placements(genome) if u.kind in SUBLAYER_KINDS}
    if not removed:
        return set()
    by_block: dict[int, list[str]] = {}
    for u in find_sublayer_units(exp.model):
        by_block.setdefault(u.block, []).append(u.name)
    return {b for b, names in by_block.items() if set(names) <= removed}


def list_configs() -> int:
    for path in sorted(BUILTIN_CONFIGS.glob("*.yaml")):
        print(path.stem)
    return 0


__all__ = ["database_build", "evaluate", "export", "list_configs", "search"]
