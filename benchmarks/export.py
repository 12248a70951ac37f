"""Export size on disk per format, and the reloaded model's held-out perplexity.

    python benchmarks/export.py [--runs quickstart bits3 joint gguf5] [--generations 2]

Each run is a short search of a built-in config on SmolLM2-135M (the export, not
the search, is measured), exported with ``evocomp export --format F`` for every
format; each export is reloaded the way its users load it (``from_pretrained``;
GGUF through transformers' ``gguf_file=``) and scored on the run's held-out
split. The dense model is written as float32 and bf16 for reference. The search
runs are kept in ``--work`` so that a second call only exports again.

Quantized runs use symmetric grids (``compressor.symmetric: true``): transformers
5.24 cannot load asymmetric pack-quantized layers (see docs/export.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from _common import EVOPRESS, RESULTS, write_result

from evocomp.cli import main as evocomp

FORMATS = ("hf", "compressed-tensors", "gguf")
RESULT = RESULTS / "export.json"

RUNS: dict[str, tuple[str, list[str]]] = {
    "quickstart": ("quickstart", [EVOPRESS]),  # as recorded: EvoPress, --generations
    "bits3": ("bits", ["compressor.symmetric=true", "space.target=3.0"]),
    "joint": (
        "joint",
        [
            "compressor.quantize={name: gptq, group_size: 64, symmetric: true}",
            "space.spaces=[{name: sparsity, target: 0.25, step: 0.125, levels: 1}, "
            "{name: bits, bits: [3, 4, 5], target: 4}]",
        ],
    ),
    "gguf5": ("gguf", []),
}


def _reload(folder: Path, fmt: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if fmt == "gguf":
        [path] = folder.glob("*.gguf")
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name).eval()
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _searched_layer_bytes(folder: Path, fmt: str, layers: list[dict[str, Any]]) -> int | None:
    """Bytes the searched linears take in a safetensors export (every tensor of the
    module: packed codes, scales, zero points, shape)."""
    if fmt == "gguf":
        return None
    from safetensors import safe_open

    names = {row["unit"] for row in layers}
    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is no mapping
                if key.rsplit(".", 1)[0] in names:
                    t = f.get_tensor(key)
                    total += t.numel() * t.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--generations", type=int, default=2)
    ap.add_argument("--work", default="/tmp/evocomp-bench-export")
    args = ap.parse_args()
    from evocomp.config import load_config
    from evocomp.evaluators import PerplexityEvaluator
    from evocomp.runner import Experiment, RunDir, load_best

    work = Path(args.work)
    figures: dict[str, Any] = {
        "size_bytes": {}, "size_ratio_vs_bf16": {}, "searched_layers_ratio_vs_bf16": {},
        "reload_ppl": {}, "unsupported": {}, "generations": args.generations,
    }
    if args.runs != list(RUNS) and RESULT.exists():
        # A subset of the runs: the others keep their recorded figures.
        recorded = json.loads(RESULT.read_text())
        for field, value in figures.items():
            if isinstance(value, dict):
                value.update(recorded.get(field, {}))
    dense_done = False
    for run_name in args.runs:
        config, overrides = RUNS[run_name]
        run = work / run_name
        sets = [*overrides, f"run_dir={run}", f"search.generations={args.generations}"]
        if not (run / "eval.json").exists():
            shutil.rmtree(run, ignore_errors=True)
            argv = ["-q", "search", config]
            for s in sets:
                argv += ["--set", s]
            assert evocomp(argv) == 0, run_name
        cfg = load_config(str(run / "config.yaml"))
        exp = Experiment(cfg, progress=False)
        heldout = exp.splits.heldout
        # Scored like the reloads (eval.json's perplexity comes from the KL pass,
        # whose log-softmax rounds differently in the last digits).
        with exp.applied(load_best(RunDir(run))) as model:
            searched = PerplexityEvaluator(heldout, batch_size=1).evaluate(model)["ppl"]
        if not dense_done:
            for dtype, label in ((torch.float32, "dense_fp32"), (torch.bfloat16, "dense_bf16")):
                folder = work / label
                shutil.rmtree(folder, ignore_errors=True)
                copy.deepcopy(exp.model).to(dtype).save_pretrained(folder)
                figures["size_bytes"][label] = sum(
                    p.stat().st_size for p in folder.glob("*.safetensors")
                )
            dense_done = True
        bf16 = figures["size_bytes"]["dense_bf16"]
        for fmt in FORMATS:
            key = f"{run_name}@{fmt}"
            out = work / "exports" / key
            shutil.rmtree(out, ignore_errors=True)
            code = evocomp(["-q", "export", str(run), "--out", str(out), "--format", fmt])
            if code != 0:
                figures["unsupported"][key] = "refused (see the command's one-line error)"
                print(f"{key}: refused", flush=True)
                continue
            info = json.loads((out / "evocomp.json").read_text())
            size = info["size_bytes"]
            figures["size_bytes"][key] = size
            figures["size_ratio_vs_bf16"][key] = round(size / bf16, 4)
            searched_bytes = _searched_layer_bytes(out, fmt, info["layers"])
            if searched_bytes is not None:
                bf16_layers = 2 * sum(
                    exp.model.get_submodule(r["unit"]).weight.numel() for r in info["layers"]
                )
                figures["searched_layers_ratio_vs_bf16"][key] = round(
                    searched_bytes / bf16_layers, 4
                )
            model = _reload(out, fmt)
            ppl = PerplexityEvaluator(heldout, batch_size=1).evaluate(model)["ppl"]
            figures["reload_ppl"][key] = {"searched": round(searched, 4), "reloaded": round(ppl, 4)}
            print(f"{key}: {size / 2**20:.1f} MiB ({size / bf16:.3f}x bf16), "
                  f"ppl searched {searched:.4f} reloaded {ppl:.4f}", flush=True)
            del model
        write_result("export", figures)  # after each run: a crash keeps what was measured


if __name__ == "__main__":
    main()
