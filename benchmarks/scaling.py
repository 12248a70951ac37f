"""Per-layer figures measured on SmolLM2, and the sized plan for Llama-3-8B / 70B
built from them (docs/scaling.md).

    python benchmarks/scaling.py [--reps 3] [--build]   # measure -> results/scaling.json
    python benchmarks/scaling.py --plan                 # docs/scaling.md's tables

Measured (CPU): per linear type, the Hessian accumulation per calibration token,
the factorisation, one variant of sparsegpt / gptq / magnitude / rtn, the dense
block forward per token, the machine's fp32 GEMM and fp64 Cholesky rates and its
disk write rate. ``--build`` also times the quickstart database build afresh.
Everything else is a formula below: the FLOPs of each step read off the code in
supernet/compressors.py and supernet/quantizers.py, the bytes of each variant in
the compact format, and the plan's extrapolation to a GPU from stated peak rates.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TYPES = ("q", "k", "v", "o", "gate", "up", "down")
GROUP = 64  # quantization group of the bits / joint configs


# -- architectures ------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """A Llama-style decoder: what the sizes and FLOPs depend on."""

    name: str
    blocks: int
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """``(out, in)`` of each linear type of a block."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return {
            "q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h),
            "gate": (self.mlp, h), "up": (self.mlp, h), "down": (h, self.mlp),
        }

    @property
    def block_weights(self) -> int:
        return sum(o * i for o, i in self.linears().values())

    @property
    def searched_weights(self) -> int:
        """Weights in the searched linears (every block linear)."""
        return self.blocks * self.block_weights

    @property
    def weights(self) -> int:
        """All weights: blocks, embedding and (untied) head; norms are negligible."""
        return self.searched_weights + 2 * self.vocab * self.hidden


SMOLLM2 = Arch("SmolLM2-135M", blocks=30, hidden=576, mlp=1536, heads=9, kv_heads=3, vocab=49152)
LLAMA3_8B = Arch("Llama-3-8B", blocks=32, hidden=4096, mlp=14336, heads=32, kv_heads=8,
                 vocab=128256)
LLAMA3_70B = Arch("Llama-3-70B", blocks=80, hidden=8192, mlp=28672, heads=64, kv_heads=8,
                  vocab=128256)


# -- variant bytes: the database size per space ---------------------------------------


@dataclass(frozen=True)
class Space:
    """A space's variants per unit: ``(density, bits)`` each (bits None: float)."""

    name: str
    variants: tuple[tuple[float, int | None], ...]
    compressor: str


def _sparsity(levels: list[float]) -> tuple[tuple[float, None], ...]:
    return tuple((1 - s, None) for s in levels)


SPACES = (
    # quickstart: target 0.5, step 0.1, levels 3 -> 20% .. 80% zeros
    Space("sparsity (7 levels, 20-80%)", _sparsity([0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]),
          "sparsegpt"),
    # bits.yaml: bits [2, 3, 4, 5, 6, 8], gptq group 64
    Space("bits (2,3,4,5,6,8; g64)", tuple((1.0, b) for b in (2, 3, 4, 5, 6, 8)), "gptq"),
    # joint.yaml: sparsity 0 .. 50% step 12.5% x bits [2, 3, 4, 5]
    Space("joint (5 sparsities x 2-5 bits)",
          tuple((1 - s, b) for s in (0, 0.125, 0.25, 0.375, 0.5) for b in (2, 3, 4, 5)),
          "prune-quantize"),
    Space("depth (sublayers dropped)", (), "none"),
)


def compact_bytes_per_weight(density: float, bits: int | None, dtype_bytes: int) -> float:
    """One variant in the compact format: a quantized weight as packed codes plus a
    float32 scale and zero per group of GROUP (``b/8 + 8/GROUP``); a sparse one as its
    nonzero values plus a 1-bit mask (``d·dtype + 1/8``); a dense one as is. A pruned
    and quantized variant is stored as codes (0 is on its grid). Each the smallest
    exact form, as the database's encoder picks it."""
    if bits is not None:
        return bits / 8 + 8 / GROUP
    return min(density * dtype_bytes + 1 / 8, float(dtype_bytes))


def dense_layout_bytes_per_weight(bits: int | None, dtype_bytes: int) -> float:
    """One variant as databases store it before the compact format: the full weight
    in the model's dtype, plus a quantized variant's grid (float32 scale and zero)."""
    return dtype_bytes + (8 / GROUP if bits is not None else 0.0)


def database_bytes(
    arch: Arch, space: Space, dtype_bytes: int, layout: str = "compact"
) -> float:
    """The variant database of ``space`` over every block linear of ``arch``:
    ``layout`` compact, dense (the layout before it) or dequantized (every
    variant a full ``dtype_bytes`` weight, as EvoPress stores its databases)."""
    per_weight = 0.0
    for density, bits in space.variants:
        if layout == "compact":
            per_weight += compact_bytes_per_weight(density, bits, dtype_bytes)
        elif layout == "dense":
            per_weight += dense_layout_bytes_per_weight(bits, dtype_bytes)
        elif layout == "dequantized":
            per_weight += dtype_bytes
        else:
            raise ValueError(f"unknown layout {layout!r}")
    return per_weight * arch.searched_weights


# -- FLOPs, read off the code --------------------------------------------------------


def accumulate_flops(d_in: int) -> float:
    """Per calibration token: ``H.addmm_(x.T, x)``, a full (not symmetric) product."""
    return 2.0 * d_in * d_in


def factor_flops(d_in: int) -> float:
    """Once per layer, float64 (inverse_hessian_cholesky): Cholesky (n³/3),
    cholesky_inverse (2n³/3), Cholesky of the inverse (n³/3)."""
    return 4.0 / 3.0 * d_in**3


def obs_variant_flops(d_out: int, d_in: int) -> float:
    """One SparseGPT variant: per column a rank-1 update of the rest of its block
    (``addr_``, 2·d_out·(B − i): d_out·d_in·(B + 1) in all) and per block the lazy update
    of every later column (``addmm_``, 2·B·d_out·(d_in − i2): d_out·d_in·(d_in − B)),
    d_out·d_in·(d_in + 1) together, whatever the blocksize B. GPTQ's loops are the
    same less one row per column (d_out·d_in·(d_in − 1))."""
    return d_out * d_in * (d_in + 1.0)


OPS_PER_COLUMN = {"sparsegpt": 4, "gptq": 11}
"""Kernels per column in the sequential loop (counted in the code): SparseGPT's
``w·mask``, ``/d``, ``addr_``, ``err[i] =``; GPTQ's rounding (div, round, add, clamp),
code store, dequantize (sub, mul), error (sub, div), ``addr_``, ``err[j] =``."""


def forward_flops_per_token(arch: Arch, seq: int, *, head: bool = True) -> float:
    """A token's forward: 2 FLOPs per weight of every block linear, attention scores
    and values over on average ``seq / 2`` earlier tokens (causal: 2·2·(seq/2)·hidden
    per block), and the head (``head``) that logits need."""
    attention = 2.0 * seq * arch.hidden * arch.blocks
    return 2.0 * arch.searched_weights + attention + (2.0 * arch.vocab * arch.hidden if head else 0)


def block_forward_flops_per_token(arch: Arch, seq: int) -> float:
    return 2.0 * arch.block_weights + 2.0 * seq * arch.hidden


# -- measurement (CPU) ---------------------------------------------------------------


def _best(fn: Callable[[], Any], reps: int) -> float:
    """The fastest of ``reps`` timed calls (seconds): on a contended machine the
    minimum is the run least disturbed by other work."""
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def _machine_rates(reps: int) -> dict[str, float]:
    import torch

    a, b = torch.randn(1536, 2048), torch.randn(2048, 1536)
    gemm = _best(lambda: a @ b, reps)
    spd = torch.randn(1536, 1536, dtype=torch.float64)
    spd = spd @ spd.T + 1536 * torch.eye(1536, dtype=torch.float64)
    chol = _best(lambda: torch.linalg.cholesky(spd), reps)
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file

        tensors = {f"t{i}": torch.randn(1536, 576) for i in range(30)}  # ~106 MB
        n = sum(t.numel() * 4 for t in tensors.values())
        write = _best(lambda: save_file(tensors, f"{tmp}/x.safetensors"), reps)
    return {
        "fp32_gemm_flops": 2 * 1536 * 2048 * 1536 / gemm,
        "fp64_cholesky_flops": 1536**3 / 3 / chol,
        "write_bytes_per_s": n / write,
    }


def measure(reps: int, blocks: list[int], tokens: int) -> dict[str, Any]:
    """Per linear type of SmolLM2 (averaged over ``blocks``), in seconds."""
    import torch

    from evocomp.supernet.compressors import (
        COMPRESSORS,
        Magnitude,
        SparseGPT,
        inverse_hessian_cholesky,
    )
    from evocomp.supernet.database import capture_block_inputs
    from evocomp.supernet.models import ModelConfig, load_model
    from evocomp.supernet.quantizers import GPTQ, RTN
    from evocomp.supernet.units import find_blocks, find_linear_units

    model = load_model(ModelConfig()).model
    _, layers = find_blocks(model)
    units = {(u.block, u.name.rsplit(".", 1)[-1].removesuffix("_proj")): u
             for u in find_linear_units(model)}
    gen = torch.Generator().manual_seed(0)
    rows: dict[str, dict[str, list[float]]] = {t: {} for t in TYPES}
    for b in blocks:
        for t in TYPES:
            weight = model.get_submodule(units[b, t].name).weight.detach()
            x = torch.randn(tokens, weight.shape[1], generator=gen)
            sg = SparseGPT(weight, COMPRESSORS.get("sparsegpt").Params())
            acc = _best(lambda sg=sg, x=x: sg.add_batch(x), reps) / tokens
            half = weight.numel() // 2
            factor = _best(lambda sg=sg: inverse_hessian_cholesky(sg.hessian, 0.01), reps)
            sg.compress(half)  # caches the factorisation
            gq = GPTQ(weight, GPTQ.Params(group_size=GROUP))
            gq.add_batch(x)
            gq.compress(4)
            mag = Magnitude(weight)
            first = _best(lambda mag=mag, half=half: _rank_again(mag, half), reps)
            rtn = RTN(weight, RTN.Params(group_size=GROUP))
            got = {
                "accumulate_per_token_s": acc,
                "factor_s": factor,
                "sparsegpt_variant_s": _best(lambda sg=sg, half=half: sg.compress(half), reps),
                "gptq_variant_s": _best(lambda gq=gq: gq.compress(4), reps),
                "magnitude_rank_s": first,
                "magnitude_variant_s": _best(lambda mag=mag, half=half: mag.compress(half), reps),
                "rtn_variant_s": _best(lambda rtn=rtn: rtn.compress(4), reps),
            }
            for k, v in got.items():
                rows[t].setdefault(k, []).append(v)
            print(f"block {b} {t}: " + ", ".join(f"{k} {v:.3g}" for k, v in got.items()),
                  flush=True)
    per_type = {
        t: {"shape": list(SMOLLM2.linears()[t]), **{k: statistics.mean(v) for k, v in r.items()}}
        for t, r in rows.items()
    }
    seq = 512
    tokens_in = torch.randint(0, 49152, (1, seq), generator=gen)
    with torch.inference_mode():
        inputs = capture_block_inputs(model, tokens_in, 1)
        hidden, kw = inputs[0]
        fwd = statistics.mean(
            _best(lambda b=b: layers[b](hidden, **kw), reps) for b in blocks
        ) / seq
    return {"per_type": per_type, "block_forward_per_token_s": fwd, "seq_len": seq}


def _rank_again(pruner: Any, level: int) -> None:
    """A magnitude variant with its ranking redone (the first variant of a layer)."""
    pruner._ranks = None
    pruner.compress(level)


def build_quickstart() -> dict[str, float]:
    """Time the quickstart database build afresh (a new process, a temporary path)."""
    child = (
        "import json, sys, time\n"
        "from evocomp.config import load_config\n"
        "from evocomp.runner import Experiment\n"
        "exp = Experiment(load_config('quickstart', [f'database.path={sys.argv[1]}']),"
        " progress=False)\n"
        "exp.loaded, exp.splits, exp.space\n"
        "t0 = time.perf_counter(); exp.database\n"
        "print(json.dumps({'build_s': time.perf_counter() - t0}))\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", child, f"{tmp}/db"], check=True,
                             capture_output=True, text=True, env=env).stdout
        size = sum(p.stat().st_size for p in Path(tmp, "db").glob("block_*.safetensors"))
        manifest = json.loads(Path(tmp, "db", "manifest.json").read_text())
    layout = "compact" if any(manifest.get("encodings", {}).values()) else "dense"
    return {**json.loads(out.strip().splitlines()[-1]), "database_bytes": size, "layout": layout}


# -- the model of a build, checked on SmolLM2 and extrapolated -----------------------


def fit_cpu(per_type: dict[str, dict[str, Any]], compressor: str) -> dict[str, float]:
    """Least squares ``t = FLOPs / rate + columns · per_column`` over the linear types:
    the CPU's effective rate on the variant loop and its cost per sequential column."""
    xs = [(obs_variant_flops(*r["shape"]), r["shape"][1], r[f"{compressor}_variant_s"])
          for r in per_type.values()]
    # Normal equations of the two-parameter fit, without numpy.
    saa = sum(f * f for f, _, _ in xs)
    sab = sum(f * c for f, c, _ in xs)
    sbb = sum(c * c for _, c, _ in xs)
    sat = sum(f * t for f, _, t in xs)
    sbt = sum(c * t for _, c, t in xs)
    det = saa * sbb - sab * sab
    inv_rate = (sat * sbb - sab * sbt) / det
    per_column = (saa * sbt - sab * sat) / det
    return {"flops_per_s": 1 / inv_rate if inv_rate > 0 else math.inf, "per_column_s": per_column}


@dataclass(frozen=True)
class Gpu:
    """Stated peak rates of an H100-class GPU (H100 SXM data sheet, dense) and the
    efficiencies assumed: none of these is measured here."""

    name: str = "H100 SXM 80 GB"
    memory_gb: float = 80
    fp32_flops: float = 67e12  # non-tensor FP32: the compressors' arithmetic (TF32 is off)
    fp64_flops: float = 67e12  # FP64 tensor core: the Cholesky factorisations
    bf16_flops: float = 989e12  # dense BF16 tensor core: the forwards
    efficiency: float = 0.5  # of peak, on large GEMMs
    factor_efficiency: float = 0.3  # cuSOLVER potrf / potri at n = 4k..28k
    op_s: float = 10e-6  # one eager PyTorch op (launch + dispatch) in the column loops
    pcie_bytes_per_s: float = 25e9  # host -> device, pageable memory (PCIe 5 x16)
    disk_bytes_per_s: float = 2e9  # NVMe write


H100 = Gpu()


def layer_seconds_gpu(d_out: int, d_in: int, compressor: str, gpu: Gpu = H100) -> dict[str, float]:
    """A layer's one-off and per-variant seconds on ``gpu``: FLOPs at the stated rates,
    the variant loop no faster than its sequential columns' kernel launches."""
    compute = obs_variant_flops(d_out, d_in) / (gpu.fp32_flops * gpu.efficiency)
    launches = d_in * OPS_PER_COLUMN[compressor] * gpu.op_s
    return {
        "accumulate_per_token_s": accumulate_flops(d_in) / (gpu.fp32_flops * gpu.efficiency),
        "factor_s": factor_flops(d_in) / (gpu.fp64_flops * gpu.factor_efficiency),
        "variant_s": max(compute, launches),
        "variant_compute_s": compute,
        "variant_launch_s": launches,
    }


def build_seconds(
    arch: Arch, space: Space, tokens: int, layer: Callable[[str, int, int], dict[str, float]],
    forward_per_token: float, write_bytes_per_s: float, dtype_bytes: int,
    transfer_per_block: float = 0.0, propagate: bool = True, layout: str = "compact",
) -> dict[str, float]:
    """A whole database build, by parts: statistics (every linear accumulates its own
    Hessian), factorisations, variants, block forwards (a second one with the start
    variants when ``propagate``), host-device copies of offloaded blocks, writes."""
    n = len(space.variants)
    parts = {"accumulate": 0.0, "factor": 0.0, "variants": 0.0}
    for t, (d_out, d_in) in arch.linears().items():
        got = layer(t, d_out, d_in)
        parts["accumulate"] += got["accumulate_per_token_s"] * tokens
        parts["factor"] += got["factor_s"]
        parts["variants"] += got["variant_s"] * n
    parts = {k: v * arch.blocks for k, v in parts.items()}
    parts["forwards"] = arch.blocks * tokens * forward_per_token * (2 if propagate else 1)
    parts["offload_copies"] = arch.blocks * transfer_per_block
    parts["write"] = database_bytes(arch, space, dtype_bytes, layout) / write_bytes_per_s
    parts["total"] = sum(parts.values())
    return parts


# -- the search --------------------------------------------------------------------


@dataclass(frozen=True)
class SearchPlan:
    """EvoPress at scale: offspring per generation and the (tokens, survivors) stages
    (DarwinLM's multi-step selection: 16 children, 8/4/2/1 at 1K/2K/4K/8K tokens)."""

    offspring: int = 16
    stages: tuple[tuple[int, int], ...] = ((1024, 8), (2048, 4), (4096, 2), (8192, 1))
    generations: int = 200
    seq: int = 2048

    def evaluations(self) -> list[tuple[int, int]]:
        """(candidates, tokens each) per stage of a generation."""
        out, n = [], self.offspring
        for tokens, keep in self.stages:
            out.append((n, tokens))
            n = keep
        return out

    @property
    def tokens_per_generation(self) -> int:
        return sum(n * t for n, t in self.evaluations())


def candidate_seconds(arch: Arch, tokens: int, plan: SearchPlan, gpu: Gpu = H100,
                      offloaded: bool = False, dtype_bytes: int = 2) -> float:
    """One candidate scored on ``tokens``: forward FLOPs at the bf16 rate; offloaded,
    each sequence's forward also copies every block to the device."""
    compute = tokens * forward_flops_per_token(arch, plan.seq) / (gpu.bf16_flops * gpu.efficiency)
    if not offloaded:
        return compute
    sequences = math.ceil(tokens / plan.seq)
    copies = sequences * arch.searched_weights * dtype_bytes / gpu.pcie_bytes_per_s
    return max(compute, copies)  # copies of the next block overlap the current one's compute


def generation_seconds(arch: Arch, plan: SearchPlan, workers: int, **kw: Any) -> float:
    """A generation with ``workers`` evaluating its candidates in parallel, stage by
    stage (a stage waits for its slowest worker)."""
    return sum(
        math.ceil(n / workers) * candidate_seconds(arch, tokens, plan, **kw)
        for n, tokens in plan.evaluations()
    )


LRU_GENOMES = 1.25
"""The variant LRU holds a whole genome's variants and then some: the parent's
(every searched unit, decoded) plus what its children change. Smaller, and every
candidate reads most of its variants from disk again."""


def worker_memory_gb(arch: Arch, plan: SearchPlan, offloaded: bool,
                     dtype_bytes: int = 2) -> dict[str, float]:
    """A search worker's device memory: the weights (outside the blocks only, when
    offloaded, plus one visiting block), the variant LRU (``database.cache_gb``,
    :data:`LRU_GENOMES` genomes; on the host when offloaded: the Swapper keeps
    variants where the weights are), one sequence's activations and its float32
    logits (the candidate's and the dense reference's)."""
    cache_gb = LRU_GENOMES * arch.searched_weights * dtype_bytes / 1e9
    outside = 2 * arch.vocab * arch.hidden * dtype_bytes
    weights = (outside + arch.block_weights * dtype_bytes) if offloaded else (
        arch.weights * dtype_bytes)
    activations = plan.seq * (4 * arch.hidden + 2 * arch.mlp) * dtype_bytes
    logits = plan.seq * arch.vocab * 4 * 2  # the candidate's and the dense reference's
    out = {
        "weights": weights / 1e9,
        "variant_lru": 0.0 if offloaded else cache_gb,
        "activations+logits": (activations + logits) / 1e9,
    }
    out["total"] = sum(out.values())
    # Offloaded, the blocks' weights and the variant LRU live in host memory.
    out["host"] = (arch.searched_weights * dtype_bytes / 1e9 + cache_gb) if offloaded else 0.0
    return out


# -- tables --------------------------------------------------------------------------


def _gb(x: float) -> str:
    return f"{x / 1e9:,.0f} GB" if x >= 10e9 else f"{x / 1e9:.2f} GB"


def _dur(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    if s < 1:
        return f"{s * 1e3:.0f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} µs"
    return f"{s:.2f} s" if s < 10 else f"{s:.0f} s"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plan_markdown(results: dict[str, Any]) -> str:
    """Every table of docs/scaling.md, from the measured figures in ``results``."""
    per_type = results["per_type"]
    rates = results["rates"]
    out = []

    # 1. measured per-layer figures
    rows = []
    for t in TYPES:
        r = per_type[t]
        rows.append([
            t, f"{r['shape'][0]}×{r['shape'][1]}",
            f"{r['accumulate_per_token_s'] * 1e6:.2f} µs", f"{r['factor_s'] * 1e3:.1f} ms",
            f"{r['sparsegpt_variant_s'] * 1e3:.0f} ms", f"{r['gptq_variant_s'] * 1e3:.0f} ms",
            f"{r['magnitude_variant_s'] * 1e3:.1f} ms", f"{r['rtn_variant_s'] * 1e3:.1f} ms",
        ])
    out.append("### Measured per layer (SmolLM2-135M, CPU)\n\n" + _table(
        ["linear", "out×in", "statistics / token", "factorisation", "sparsegpt / variant",
         "gptq / variant", "magnitude / variant", "rtn / variant"], rows))
    fits = {c: fit_cpu(per_type, c) for c in ("sparsegpt", "gptq")}
    out.append(
        f"Dense block forward: {results['block_forward_per_token_s'] * 1e6:.0f} µs per token "
        f"({results['seq_len']}-token sequences). Machine rates: fp32 GEMM "
        f"{rates['fp32_gemm_flops'] / 1e9:.0f} GFLOP/s, fp64 Cholesky "
        f"{rates['fp64_cholesky_flops'] / 1e9:.0f} GFLOP/s, safetensors write "
        f"{rates['write_bytes_per_s'] / 1e9:.2f} GB/s. Fit of the variant times to "
        "`FLOPs / rate + columns × per-column`: " + "; ".join(
            f"{c} {f['flops_per_s'] / 1e9:.0f} GFLOP/s and {f['per_column_s'] * 1e6:.0f} µs "
            "per column" for c, f in fits.items()) + ".")

    # 2. the check on SmolLM2's quickstart database
    def cpu_layer(t: str, d_out: int, d_in: int) -> dict[str, float]:
        r = per_type[t]
        return {"accumulate_per_token_s": r["accumulate_per_token_s"],
                "factor_s": r["factor_s"], "variant_s": r["sparsegpt_variant_s"]}

    def cpu_flops_layer(t: str, d_out: int, d_in: int) -> dict[str, float]:
        f = fits["sparsegpt"]
        return {
            "accumulate_per_token_s": accumulate_flops(d_in) / rates["fp32_gemm_flops"],
            "factor_s": factor_flops(d_in) / rates["fp64_cholesky_flops"],
            "variant_s": obs_variant_flops(d_out, d_in) / f["flops_per_s"]
            + d_in * f["per_column_s"],
        }

    quick = SPACES[0]
    qtokens = 16 * 512
    fwd = results["block_forward_per_token_s"]
    wr = rates["write_bytes_per_s"]
    measured = results.get("quickstart_build") or {}
    recorded = results.get("recorded_build", {})
    layout = measured.get("layout", "dense")  # what the build timed here wrote
    direct = build_seconds(SMOLLM2, quick, qtokens, cpu_layer, fwd, wr, 4, layout=layout)
    by_flops = build_seconds(SMOLLM2, quick, qtokens, cpu_flops_layer, fwd, wr, 4,
                             layout=layout)
    rows = [[k, _dur(direct[k]), _dur(by_flops[k])] for k in direct]
    sizes = {lay: measured["database_bytes"] for lay in [layout] if measured}
    sizes.setdefault("dense", recorded.get("database_bytes", 0))
    lines = [
        "### Check: SmolLM2's quickstart database, predicted and measured\n",
        _table(["part", "from per-layer times", "from FLOPs + per-column fit"], rows),
        "",
        _table(["", "predicted", "measured"], [
            ["build time", f"{_dur(direct['total'])} (FLOP model {_dur(by_flops['total'])})",
             "; ".join(x for x in [
                 f"{measured['build_s']:.0f} s now" if "build_s" in measured else "",
                 f"{recorded['build_s']:.0f} s ({recorded.get('date', '')}, "
                 "database_build.json)" if recorded else ""] if x)],
            *([f"database size, float32, {lay} layout",
               _gb(database_bytes(SMOLLM2, quick, 4, lay)),
               _gb(sizes[lay]) if lay in sizes else "—"] for lay in ("dense", "compact")),
        ]),
    ]
    out.append("\n".join(lines))

    # 3. database size per space
    rows = []
    for arch in (LLAMA3_8B, LLAMA3_70B):
        for sp in SPACES:
            if not sp.variants:
                rows.append([arch.name, sp.name, "0 (no variants)", "0", "0"])
                continue
            rows.append([arch.name, sp.name] + [
                _gb(database_bytes(arch, sp, 2, lay)) for lay in ("compact", "dense",
                                                                  "dequantized")])
    out.append("### Database size per space (bf16 model)\n\n" + _table(
        ["model", "space", "compact format", "dense layout (before it)",
         "dequantized (EvoPress)"], rows))

    # 4. build time on one GPU
    rows = []
    for arch, tokens in ((LLAMA3_8B, 128 * 2048), (LLAMA3_70B, 128 * 2048)):
        fwd_gpu = block_forward_flops_per_token(arch, 2048) / (H100.bf16_flops * H100.efficiency)
        for sp in SPACES[:2]:
            def gpu_layer(t: str, d_out: int, d_in: int, c: str = sp.compressor
                          ) -> dict[str, float]:
                return layer_seconds_gpu(d_out, d_in, c)

            copy = arch.block_weights * 2 / H100.pcie_bytes_per_s
            b = build_seconds(arch, sp, tokens, gpu_layer, fwd_gpu, H100.disk_bytes_per_s, 2,
                              transfer_per_block=copy, propagate=sp.compressor == "sparsegpt")
            rows.append([arch.name, f"{sp.compressor}, {len(sp.variants)} levels",
                         *(_dur(b[k]) for k in ("accumulate", "factor", "variants", "forwards",
                                                 "offload_copies", "write", "total"))])
    out.append("### Build time on one GPU (extrapolated)\n\n" + _table(
        ["model", "compressor", "statistics", "factorisations", "variants", "forwards",
         "offload copies", "writes", "total"], rows))
    rows = []
    for arch, (d_out, d_in) in ((LLAMA3_8B, LLAMA3_8B.linears()["q"]),
                                (LLAMA3_8B, LLAMA3_8B.linears()["down"]),
                                (LLAMA3_70B, LLAMA3_70B.linears()["down"])):
        for c in ("sparsegpt", "gptq"):
            g = layer_seconds_gpu(d_out, d_in, c)
            rows.append([arch.name, f"{d_out}×{d_in}", c, _dur(g["variant_compute_s"]),
                         _dur(g["variant_launch_s"]), _dur(g["factor_s"])])
    out.append("Per variant, the sequential column loop's kernel launches outweigh its "
               "arithmetic on a GPU:\n\n" + _table(
                   ["model", "layer", "compressor", "variant: FLOPs", "variant: launches",
                    "factorisation"], rows))

    # 5. search: per generation, memory, workers
    plan = SearchPlan()
    rows = []
    for arch, offl in ((LLAMA3_8B, False), (LLAMA3_70B, True)):
        per_gen = generation_seconds(arch, plan, 1, offloaded=offl)
        mem = worker_memory_gb(arch, plan, offl)
        rows.append([
            arch.name + (" (offloaded)" if offl else ""),
            f"{plan.tokens_per_generation:,}",
            f"{forward_flops_per_token(arch, plan.seq) / 1e9:.1f} GFLOP",
            _dur(per_gen),
            f"{mem['weights']:.0f} + {mem['variant_lru']:.0f} + "
            f"{mem['activations+logits']:.1f} = {mem['total']:.0f} GB",
            f"{mem['host']:.0f} GB" if mem["host"] else "—",
        ])
    out.append(
        f"### Search (EvoPress, {plan.offspring} offspring, stages "
        + ", ".join(f"{t} tokens → keep {k}" for t, k in plan.stages)
        + ")\n\n" + _table(["model", "tokens / generation", "forward / token",
                             "generation, 1 GPU", "GPU memory per worker (weights + "
                             "LRU + activations)", "host memory (blocks + LRU)"], rows))
    rows = []
    for arch, offl in ((LLAMA3_8B, False), (LLAMA3_70B, True)):
        row = [arch.name + (" (offloaded)" if offl else "")]
        for w in (1, 2, 4, 8, 16):
            row.append(_dur(plan.generations * generation_seconds(arch, plan, w, offloaded=offl)))
        rows.append(row)
    out.append(f"Wall time of {plan.generations} generations with W Ray workers (one GPU "
               "each):\n\n" + _table(["model", "W=1", "W=2", "W=4", "W=8", "W=16"], rows))
    return "\n\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", action="store_true", help="print the tables from results/")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 15])
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens per layer")
    ap.add_argument("--build", action="store_true", help="also time the quickstart build")
    args = ap.parse_args()
    path = Path(__file__).parent / "results" / "scaling.json"
    if args.plan:
        print(plan_markdown(json.loads(path.read_text())))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from _common import write_result

    # One thread, here and in the timed build: on a contended machine a second
    # OpenMP thread waits at every barrier for a core, which made a 576-wide
    # factorisation 40x slower than its FLOPs; one thread measures the work.
    torch.set_num_threads(1)

    load_before = os.getloadavg()
    figures: dict[str, Any] = {"rates": _machine_rates(args.reps)}
    figures |= measure(args.reps, args.blocks, args.tokens)
    recorded = json.loads((path.parent / "database_build.json").read_text())
    figures["recorded_build"] = {"build_s": recorded["build_s"], "date": recorded["date"],
                                 "database_bytes": round(recorded["database_gb"] * 2**30)}
    if args.build:
        figures["quickstart_build"] = build_quickstart()
    figures["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    figures["settings"] = {"reps": args.reps, "blocks": args.blocks, "tokens": args.tokens}
    write_result("scaling", figures)
    print(plan_markdown(figures))


if __name__ == "__main__":
    main()
