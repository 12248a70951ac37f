"""Measured forward time of attention and MLP sublayers at every width they can keep:
the cost table of a width search asked for in time (``space.cost: latency``).

A sublayer at a width is timed inside its real block, on that block's real inputs
(masks, rotary embeddings) for one sequence of ``tokens`` tokens, with the other
sublayer of the block skipped; the time of the block with both skipped (norms,
residual adds) is subtracted, so a removed sublayer costs 0. Which heads or neurons
are kept does not change the time, so the first ones per KV group are. Times are
the fastest of ``repeats`` runs, made non-decreasing in the width (a wider sublayer
never costs less: timing noise must not make the search prefer it), and cached per
machine, device, dtype and shape, so a second search (or a resume) reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from evocomp.spaces.units import TimingRequest, Unit
from evocomp.supernet.database import capture_block_inputs
from evocomp.supernet.shrink import output_weight
from evocomp.supernet.sublayers import skip
from evocomp.supernet.units import find_blocks
from evocomp.supernet.widths import WidthVariant, applied, block_sublayers

__all__ = ["cpu_name", "sublayer_timings"]

log = logging.getLogger("evocomp")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    return f"{cpu_name()}|{gpu}|{os.cpu_count()}|{torch.get_num_threads()}|{torch.__version__}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _width(model: nn.Module, unit: Unit, kept: int, whole_groups: bool) -> AbstractContextManager:
    """``unit`` keeping ``kept`` groups (the first ones per KV group, or the first
    whole groups; dense at full width, skipped at 0)."""
    if kept == unit.groups:
        return nullcontext()
    module = model.get_submodule(unit.name)
    if unit.kind == "attn":
        per, n_kv = unit.groups // unit.kv_groups, unit.kv_groups
        if whole_groups:
            heads = list(range(kept))
        else:  # the same number in every group
            heads = [g * per + i for g in range(n_kv) for i in range(kept // n_kv)]
        index = torch.tensor(heads, dtype=torch.long)
        dim = int(module.head_dim)
        columns = (index[:, None] * dim + torch.arange(dim)).reshape(-1)
    else:
        index = columns = torch.arange(kept)
    weight = output_weight(module, unit.kind)[:, columns]
    return applied(model, unit, WidthVariant(index.to(weight.device), weight))


def _fastest_ns(
    model: nn.Module,
    block: nn.Module,
    hidden: torch.Tensor,
    kwargs: dict[str, Any],
    request: TimingRequest,
    kept: int | None,
    repeats: int,
) -> int:
    """Fastest of ``repeats`` runs of ``block`` (nanoseconds) with ``request.unit``
    keeping ``kept`` groups (None: skipped, the baseline), after one warm-up run.
    The fastest, not the median: other work on the machine only ever adds time."""
    device = hidden.device
    if kept is None:
        manager: Any = skip(model, [request.unit])
    else:
        manager = _width(model, request.unit, kept, request.whole_groups)
    with manager:
        block(hidden, **kwargs)
        times = []
        for _ in range(repeats):
            _sync(device)
            started = time.perf_counter_ns()
            block(hidden, **kwargs)
            _sync(device)
            times.append(time.perf_counter_ns() - started)
    return min(times)


def sublayer_timings(
    model: nn.Module,
    requests: dict[str, TimingRequest],
    *,
    tokens: int = 512,
    repeats: int = 5,
    cache: Path | None = None,
    progress: bool = True,
) -> dict[str, dict[int, int]]:
    """Forward nanoseconds of each requested sublayer at each kept count:
    ``{key: {kept: ns}}``."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out: dict[str, dict[int, int]] = {}
    todo: dict[str, tuple[TimingRequest, Path | None]] = {}
    for key, request in requests.items():
        path = None
        if cache is not None:
            ident = json.dumps(
                [_machine(), str(device), str(dtype), key, list(request.counts),
                 request.whole_groups, tokens, repeats]
            )
            path = cache / f"{hashlib.sha256(ident.encode()).hexdigest()[:24]}.json"
            if path.exists():
                out[key] = {int(k): int(v) for k, v in json.loads(path.read_text()).items()}
                continue
        todo[key] = (request, path)
    if not todo:
        return out
    path_, blocks = find_blocks(model)
    vocab = int(getattr(model.config, "vocab_size", 1000))
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        hidden, kwargs = capture_block_inputs(model, ids, 1)[0]
        bar = tqdm(todo.items(), desc="latency", unit="shape", disable=not progress)
        for key, (request, path) in bar:
            unit = request.unit
            block = blocks[unit.block]
            sublayers = block_sublayers(path_, unit.block, block)
            other = sublayers["mlp" if unit.kind == "attn" else "attn"]

            with skip(model, [other]):
                base = _fastest_ns(model, block, hidden, kwargs, request, None, repeats)
                table: dict[int, int] = {}
                floor = 0
                for kept in sorted(request.counts):
                    ns = 0
                    if kept:
                        took = _fastest_ns(model, block, hidden, kwargs, request, kept, repeats)
                        ns = max(0, took - base)
                    floor = max(floor, ns)
                    table[kept] = floor
            out[key] = table
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(table))
                os.replace(tmp, path)
    log.info("timed %d sublayer shapes at every width", len(todo))
    return out
