"""Pruner-Zero's metric search on SmolLM2: does genetic programming find a pruning
metric that beats Wanda, at 50% unstructured and at 2:4?

    python benchmarks/metric_search.py [--population 24] [--generations 8]
        [--offspring 8] [--propagate dense] [--pattern unstructured]
        [--also-at [2:4]] [--alloc-generations 10] [--set k=v ...]

1. ``evocomp search metric`` (50% ``--pattern``, KL to dense on the search tokens)
   with the given GP budget; X's inputs are propagated as ``--propagate`` says
   during the search (``dense``: measured once, so a metric costs no forward).
   ``--also-at`` (default ``2:4``) scores every metric at further patterns too
   (``space.also_at``: the fitness is the geometric mean of the KLs), so one
   metric is searched for both. Searched at unstructured and 2:4 the figures go
   to ``results/metric_search.json``; at other patterns to
   ``results/metric_search_<p1>[+<p2>...].json`` (``--also-at`` alone: at
   unstructured only, ``metric_search_unstructured.json``). Step 3 runs only
   when the searched pattern is unstructured.
2. Every metric is then applied one-shot the way its authors do it (inputs
   propagated through the blocks already pruned, per-row comparison; N:M per
   group) at both patterns, and scored on the held-out split: magnitude, Wanda,
   Pruner-Zero's published ``mul(abs(mul(W,W)), mms(G))``, the found metric, and
   SparseGPT one-shot (its own order: pruned inputs, OBS updates).
3. The found metric as the ``sparsity`` space's compressor: a quickstart-shaped
   EvoPress allocation search (``--alloc-generations``) vs its uniform 50%.

Figures: held-out perplexity (and KL) per pattern and method, the found
expression, the search budget (population, generations, evaluations, tokens)
and wall seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
from _common import DEVICE, EVOPRESS, add_overrides, pruned_weights, write_result

from evocomp.cli import main as evocomp
from evocomp.config import load_config
from evocomp.evaluators import KLEvaluator
from evocomp.runner import Experiment
from evocomp.supernet.compressors import SparseGPT
from evocomp.supernet.metric import one_shot

METHODS = {"magnitude": "magnitude", "wanda": "wanda", "pruner_zero": "pruner-zero"}


def _heldout(exp: Experiment, expressions: dict[str, str], nm: int | None) -> dict[str, dict]:
    ev = KLEvaluator.create(
        exp.model, exp.splits.heldout, KLEvaluator.Params(batch_size=1), progress=False
    )
    out: dict[str, dict] = {}
    for name, text in expressions.items():
        started = time.perf_counter()
        with exp.applied(exp.space.genome(text)) as model:
            m = ev.evaluate(model)
        out[name] = {"ppl": round(m["ppl"], 3), "kl": round(m["kl"], 4),
                     "seconds": round(time.perf_counter() - started, 1)}
        print(f"{name:>12}: ppl {m['ppl']:.3f}  kl {m['kl']:.4f}", flush=True)
    started = time.perf_counter()
    units = exp.space.units
    params = SparseGPT.Params(nm_group=nm)
    pruned = one_shot(
        exp.model, units, exp.splits.calibration, lambda u, w: SparseGPT(w, params),
        {u.name: exp.space.zeros(u) for u in units}, propagate="pruned",
        batch_size=exp.cfg.database.batch_size,
    )
    with pruned_weights(exp.model, units, pruned):
        m = ev.evaluate(exp.model)
    out["sparsegpt"] = {"ppl": round(m["ppl"], 3), "kl": round(m["kl"], 4),
                        "seconds": round(time.perf_counter() - started, 1)}
    print(f"{'sparsegpt':>12}: ppl {m['ppl']:.3f}  kl {m['kl']:.4f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--population", type=int, default=24)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--seeds", default="[wanda, magnitude, pruner-zero]",
                    help="metrics in the first population (YAML list; [] for none)")
    ap.add_argument("--propagate", choices=["pruned", "dense"], default="dense",
                    help="X's inputs during the search (the final comparison always prunes "
                    "one-shot with pruned propagation)")
    ap.add_argument("--pattern", default="unstructured",
                    help="the pattern searched at ('unstructured' or N:M, e.g. 2:4)")
    ap.add_argument("--also-at", nargs="*", default=["2:4"],
                    help="further patterns every metric is scored at in the search "
                    "(default 2:4: one metric for both; none: --also-at)")
    ap.add_argument("--alloc-generations", type=int, default=10,
                    help="EvoPress generations of the allocation search with the found "
                    "metric (0: skip it)")
    add_overrides(ap)
    args = ap.parse_args()
    args.also_at = [p for p in args.also_at if p != args.pattern]
    figures: dict = {"ppl": {}, "kl": {}}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "search"
        sets = [f"run_dir={run}", f"model.device={DEVICE}",
                f"search.population={args.population}",
                f"search.generations={args.generations}", f"search.offspring={args.offspring}",
                f"space.propagate={args.propagate}", f"search.seeds={args.seeds}",
                f"space.pattern='{args.pattern}'", "final_eval.enabled=false",
                "space.also_at=[" + ", ".join(f"'{p}'" for p in args.also_at) + "]",
                *args.overrides]
        argv = ["-q", "search", "metric"]
        for s in sets:
            argv += ["--set", s]
        started = time.perf_counter()
        assert evocomp(argv) == 0
        searched = time.perf_counter() - started
        best = json.loads((run / "best.json").read_text())
        trials = pd.read_parquet(run / "trials.parquet")
        found = best["expression"]
        print(f"found {found} (search KL {best['fitness']:.4f}) in {searched:.0f} s", flush=True)
        figures["found"] = found
        patterns = [args.pattern, *args.also_at]
        figures["searched_at"] = patterns if args.also_at else args.pattern
        figures["budget"] = {
            "population": args.population, "generations": args.generations,
            "offspring": args.offspring, "propagate": args.propagate, "seeds": args.seeds,
            "evaluations": int(len(trials)),
            "invalid": int(trials.get("metric.invalid", pd.Series(dtype=float)).fillna(0).sum()),
            "tokens": int(trials.spent.sum()),
            # Each evaluation prunes and scores the model once per pattern.
            "forward_tokens": int(trials.spent.sum()) * len(patterns),
        }
        figures["seconds"] = round(searched, 1)
        figures["search_kl"] = best["fitness"]
        top = trials[trials.tokens == trials.tokens.max()].sort_values("fitness")
        figures["finalists"] = top[["genome", "fitness"]].head(8).to_dict(orient="records")

        expressions = {**METHODS, "found": found}
        for pattern, nm in (("unstructured", None), ("2:4", 4)):
            cfg = load_config("metric", [*sets, f"space.pattern='{pattern}'",
                                         "space.propagate=pruned", "space.also_at=[]"])
            exp = Experiment(cfg, progress=False)
            scores = _heldout(exp, expressions, nm)
            figures["ppl"][pattern] = {k: v["ppl"] for k, v in scores.items()}
            figures["kl"][pattern] = {k: v["kl"] for k, v in scores.items()}
            del exp

        if args.alloc_generations and args.pattern == "unstructured":
            alloc = Path(tmp) / "alloc"
            argv = ["-q", "search", "quickstart", "--set", f"run_dir={alloc}",
                    "--set", f"model.device={DEVICE}",
                    "--set", f"compressor={{name: metric, expression: '{found}'}}",
                    "--set", "data.calibration=8",
                    "--set", EVOPRESS,
                    "--set", f"search.generations={args.alloc_generations}",
                    "--set", f"database.path={tmp}/db"]
            for o in args.overrides:
                argv += ["--set", o]
            started = time.perf_counter()
            assert evocomp(argv) == 0
            result = json.loads((alloc / "eval.json").read_text())
            figures["allocation"] = {
                "compressor": f"metric {found}",
                "generations": args.alloc_generations,
                "ppl": {k: round(v, 3) for k, v in result["ppl"].items()},
                "seconds": round(time.perf_counter() - started, 1),
            }
    both = patterns == ["unstructured", "2:4"]
    suffix = "" if both else "_" + "+".join(patterns).replace(":", "of")
    write_result("metric_search" + suffix, figures)


if __name__ == "__main__":
    main()
