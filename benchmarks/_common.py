"""Shared by the benchmark scripts: machine description and JSON results."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
DEVICE = os.environ.get("EVOCOMP_BENCH_DEVICE", "cpu")
"""Where benchmarks run (``EVOCOMP_BENCH_DEVICE=cuda``); figures from a device other
than the CPU go to ``results/<name>.<device>.json``, beside the CPU ones."""

EVOPRESS = (
    "search={name: evopress, offspring: 8, max_switches: 3, "
    "stages: [{tokens: 512, keep: 2}, {tokens: 2048, keep: 1}]}"
)
"""The quickstart's EvoPress search before the quickstart became a chain (GA, then
EvoPress): an override, put before any other ``search.`` override, for benchmarks
that measure EvoPress itself or reproduce figures recorded with it."""


def evopress_search(config: str, overrides: list[str]) -> list[str]:
    """Overrides that make ``config``'s search EvoPress: none when it is already (its
    own options then hold), else :data:`EVOPRESS`."""
    from evocomp.config import load_config

    return [] if load_config(config, overrides).search.name == "evopress" else [EVOPRESS]


def machine() -> dict[str, Any]:
    from evocomp.supernet.latency import cpu_name

    info = {
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def add_overrides(ap: argparse.ArgumentParser) -> None:
    """``--set k=v`` (repeatable): config overrides applied to every run of a benchmark."""
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="config overrides for every run (e.g. evaluator.batch_size=4)",
    )


def write_result(name: str, figures: dict[str, Any]) -> Path:
    """Write benchmarks/results/<name>.json with the command, machine and date."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if DEVICE == "cpu" else "." + DEVICE.split(":")[0]
    path = RESULTS / f"{name}{suffix}.json"
    payload = {
        **figures,
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    return path


def heldout_metrics(exp: Any, genomes: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Held-out KL to the dense model and perplexity (one pass each) per genome;
    ``None`` is the dense model."""
    from evocomp.evaluators import KLEvaluator

    ev = KLEvaluator.create(
        exp.model, exp.splits.heldout, KLEvaluator.Params(batch_size=1), progress=False
    )
    out: dict[str, dict[str, float]] = {"ppl": {}, "kl": {}}
    for name, genome in genomes.items():
        with exp.applied(genome) as model:
            m = ev.evaluate(model)
        out["ppl"][name] = round(m["ppl"], 4)
        out["kl"][name] = round(m["kl"], 5)
        print(f"{name:>14}: ppl {m['ppl']:.3f}  kl {m['kl']:.4f}", flush=True)
    return out


def timed_search(config: str, overrides: list[str], loaded: Any = None) -> tuple[Any, Any, float]:
    """Run one search of a built-in config in a fresh run dir (given in
    ``overrides``), reusing an already loaded model; returns the experiment, the
    search result and the search's wall seconds."""
    from evocomp.config import load_config
    from evocomp.runner import Experiment, prepare_run_dir, run_search

    cfg = load_config(config, [*overrides, f"model.device={DEVICE}", "final_eval.enabled=false"])
    exp = Experiment(cfg, progress=False)
    if loaded is not None:
        exp.loaded = loaded  # one model load for every search of a benchmark
    _ = exp.database, exp.evaluator  # built or loaded outside the timed search
    started = time.perf_counter()
    result = run_search(exp, prepare_run_dir(exp.cfg, resume=False))
    return exp, result, time.perf_counter() - started


@contextmanager
def pruned_weights(
    model: torch.nn.Module, units: Iterable[Any], weights: dict[str, torch.Tensor]
) -> Iterator[None]:
    """While active, each unit's weight points at ``weights[unit.name]`` (stored as
    the unit's ``[out, in]`` matrix, transposed back for Conv1D); restored on exit."""
    saved = []
    try:
        for u in units:
            module = model.get_submodule(u.name)
            saved.append((module, module.weight.data))
            w = weights[u.name]
            module.weight.data = (w.T if u.transposed else w).to(module.weight.dtype)
        yield
    finally:
        for module, original in saved:
            module.weight.data = original


def uniform_baseline_config(cfg: Any, compressor: str) -> Any:
    """``cfg`` with another compressor whose database holds only the uniform level
    (one level each side, its own default path): a uniform baseline's config."""
    from evocomp.config import Config

    data = cfg.dump()
    data["compressor"] = {"name": compressor}
    data["space"] = {**data["space"], "levels": 1}
    data["database"] = {**data["database"], "path": None}
    return Config.model_validate(data)


def evopress_tokens_per_generation(params: Any) -> float:
    """Evaluation tokens one EvoPress generation spends on average (``params``: its
    search options): its children on the first stage and, on average, 1.5 new genomes
    on each later stage (the parent's scores are reused), each on the sequences the
    stage before did not score (the runner keeps rows it scored); a resampling one
    scores the parent again at every stage."""
    tokens = [s.tokens for s in params.stages]
    new = [b - a for a, b in zip(tokens, tokens[1:], strict=False)]
    if getattr(params, "resample", False):
        kept = [s.keep for s in params.stages]
        return (params.offspring + 1) * tokens[0] + sum(
            k * t for k, t in zip(kept, new, strict=False)
        )
    return params.offspring * tokens[0] + sum(1.5 * t for t in new)
