"""Token efficiency: held-out quality of each method's best genome against the
evaluation tokens it spent, on SmolLM2-135M at 50% sparsity (SparseGPT) and at 3.0
bits (GPTQ), with 64 x 512 calibration tokens and 32 x 512 held-out tokens.

    python benchmarks/token_efficiency.py [--problems sparsity bits]
        [--methods default evopress_plain owl sensitivity ...]
        [--checkpoints 32000 64000 128000 254000] [--max-tokens 254000] [--set k=v ...]

Each search runs once, to ``--max-tokens``; its best genome at each checkpoint is the
best it had scored at its largest token budget within that many evaluation tokens
(for EvoPress that is its parent then). Every such genome is scored on the held-out
sequences (one pass each, genomes shared between rows scored once). Gains are
fractions of held-out perplexity relative to the uniform genome of the same problem
(SparseGPT- or GPTQ-uniform). Candidate cost: seconds spent scoring candidates over
the seconds a dense forward takes on as many tokens, per search, measured in the
same run.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from _common import (
    add_overrides,
    evopress_search,
    evopress_tokens_per_generation,
    heldout_metrics,
    timed_search,
    write_result,
)

from evocomp.config import load_config
from evocomp.errors import EvocompError
from evocomp.evaluators.base import forward_logits
from evocomp.search.store import decode_genome, encode_genome

DATA = ["data.calibration=64", "data.heldout=32", "data.search=8"]
PLAIN_STAGES = "search.stages=[{tokens: 512, keep: 2}, {tokens: 4096, keep: 1}]"
CHAIN_FINAL_4096 = f"search.steps.1.{PLAIN_STAGES.removeprefix('search.')}"
CHAIN_SURROGATE = ["search.steps.0.surrogate={pool: 64}", "search.steps.1.surrogate={pool: 64}"]

PROBLEMS: dict[str, dict[str, Any]] = {
    "sparsity": {"config": "quickstart", "overrides": []},
    "bits": {"config": "bits", "overrides": []},
}

METHODS: dict[str, list[str]] = {
    # evocomp's search as configured by default (the built-in config's search: for
    # sparsity, the quickstart's chain of a GA and EvoPress).
    "default": [],
    "default_no_prefix": ["database.prefix_gb=0"],
    # EvoPress as the quickstart ran it before the chain (the rows recorded as
    # "default" up to 2026-12-03 for sparsity), and variants of it: the levers that
    # are options, alone and together (the row recorded as "default" on 2026-12-02 is
    # "levers": both were defaults then).
    "evopress": [],
    "surrogate": ["search.surrogate={pool: 64}"],
    "owl_start": ["search.start_from=[owl]"],
    "levers": ["search.surrogate={pool: 64}", "search.start_from=[owl]"],
    # The reference's settings: 8 children, 512 -> 4096 tokens, no levers.
    "evopress_plain": [
        "search.offspring=8", PLAIN_STAGES, "search.surrogate=null", "search.start_from=[]",
        "database.prefix_gb=0",
    ],
    # Scoring each generation on a fresh draw of the search sequences (with a search
    # split larger than the last stage, e.g. --set data.search=32).
    "resample": ["search.resample=true"],
    # EvoPress's bias to fewer switches per child.
    "fewer_switches": ["search.switches=fewer"],
    # A larger last stage, so the parent is chosen on more text (needs a search
    # split of 8 and 16 sequences, e.g. --set data.search=16): EvoPress fits its 4
    # sequences by 254k tokens.
    "final_4096": [PLAIN_STAGES],
    "final_8192": ["search.stages=[{tokens: 512, keep: 2}, {tokens: 8192, keep: 1}]"],
    # The GA (init: mutants), 8 + 8 per generation, each genome scored on one
    # sequence (as in optimizers.py), on two, or on the 4 EvoPress's last stage uses.
    "ga": ["search.name=ga", "search.population=8", "search.offspring=8", "search.tokens=512"],
    "ga_1024": [
        "search.name=ga", "search.population=8", "search.offspring=8", "search.tokens=1024",
    ],
    "ga_2048": [
        "search.name=ga", "search.population=8", "search.offspring=8", "search.tokens=2048",
    ],
    # The GA for the first half of 254k tokens, then EvoPress (stages 512 -> 2,048)
    # from its genome, 30 + 19 generations as first measured (the quickstart's search
    # since; "default" spends --max-tokens on its EvoPress step instead).
    "ga_then_evopress": [
        "search={name: chain, steps: [{name: ga, population: 8, offspring: 8, tokens: 512, "
        "generations: 30}, {name: evopress, offspring: 8, max_switches: 3, generations: 19, "
        "stages: [{tokens: 512, keep: 2}, {tokens: 2048, keep: 1}]}]}",
    ],
    # The chain with racing in its EvoPress step: the last stage scores its survivors
    # one sequence at a time and drops those significantly worse than the best.
    "race": ["search.steps.1.race={}"],
    # The chain with a larger last EvoPress stage (4,096 tokens: needs a search split
    # of 8 sequences, --set data.search=8), alone and with surrogate screening in
    # both steps: screening fits the search split faster, the larger stage fits less
    # of it.
    "chain_final_4096": [CHAIN_FINAL_4096],
    "chain_final_4096_surrogate": [CHAIN_FINAL_4096, *CHAIN_SURROGATE],
    "chain_surrogate": CHAIN_SURROGATE,
    "owl": ["search.name=owl"],
    # One level either way per unit: 2 probes per unit (radius 2 would spend ~430k tokens).
    "sensitivity": ["search.name=sensitivity", "search.radius=1"],
}
ON_EVOPRESS = {"evopress", "surrogate", "owl_start", "levers", "evopress_plain", "resample",
               "fewer_switches", "final_4096", "final_8192"}
"""Methods that are EvoPress with options: on a problem whose config searches with
another optimizer they start from the quickstart's former EvoPress search."""
GROWING = {"default", "default_no_prefix", "race", "chain_final_4096",
           "chain_final_4096_surrogate", "chain_surrogate", *ON_EVOPRESS,
           "ga", "ga_1024", "ga_2048"}
"""Methods whose (last) generations run until the token budget is spent."""


def _tokens(name: str, params: Any, generations: int) -> float:
    """Evaluation tokens ``generations`` of optimizer ``name`` (EvoPress or the GA) spend."""
    if name == "ga":  # a first population, then `offspring` genomes a generation
        return params.tokens * (params.population + generations * params.offspring)
    return generations * evopress_tokens_per_generation(params)


def _generations(name: str, params: Any, tokens: float) -> int:
    """Generations of ``name`` that spend about ``tokens`` (the inverse of :func:`_tokens`)."""
    first = _tokens(name, params, 0)
    per_generation = _tokens(name, params, 1) - first
    return max(1, math.ceil((tokens - first) / per_generation))


def generations(config: str, overrides: list[str], max_tokens: int) -> str:
    """The override that makes the search spend about ``max_tokens``: its generations
    (EvoPress's, the GA's), or a chain's last step's after the steps before it."""
    search = load_config(config, overrides).search
    if search.name != "chain":
        return f"search.generations={_generations(search.name, search.params, max_tokens)}"
    *before, last = search.params.steps
    spent = sum(_tokens(s.name, s.params(), s.params().generations) for s in before)
    n = _generations(last.name, last.params(), max_tokens - spent)
    return f"search.steps.{len(before)}.generations={n}"


def checkpoints(trials: pd.DataFrame, marks: list[int]) -> dict[int, tuple]:
    """The best genome at the largest token budget the run had scored within each mark
    of spent evaluation tokens (a run that ended before a mark gives its answer at the
    first mark past its end; later marks are left out). Probes (one-shot methods'
    measurements, which may leave the budget) count as spent tokens, never as answers.
    Scores of one draw compare (``search.resample`` scores each generation on its
    own): the answer at a mark is the best of the latest draw whose final-stage scores
    all lie within it, that is a resampling search's parent then, or its confirmed
    last parent."""
    trials = trials.sort_values("number").reset_index(drop=True)
    spent = trials["spent"].cumsum()
    answers = trials["role"] != "probe"
    out = {}
    for i, mark in enumerate(marks):
        if i and marks[i - 1] >= spent.iloc[-1]:
            break
        # The largest budget scored so far (a chain's GA step scores on less text
        # than the EvoPress step after it; other searches score it from the start).
        budget = trials.loc[(spent <= mark) & answers, "tokens"].max()
        if pd.isna(budget):
            continue
        top = trials[(trials["tokens"] == budget) & answers]
        last_of_draw = top.groupby("draw")["number"].idxmax()
        resampled = top["draw"].max() > 0
        within = top[spent[top.index] <= mark]
        groups = {
            d: rows for d, rows in within.groupby("draw")
            if d == 0 or rows.index.max() == last_of_draw[d]  # a whole generation
        }
        if not groups:
            continue
        draw = max(groups, key=lambda d: groups[d].index.max())
        rows = groups[draw]
        if draw == 0 and resampled and rows.index.max() > top.index[0]:
            pick = rows.index.max()  # the last parent, confirmed on the stored order
        else:
            pick = rows["fitness"].idxmin()
        out[mark] = decode_genome(trials.loc[pick, "genome"])
    return out


def dense_seconds_per_token(exp: Any, rows: int = 2) -> float:
    tokens = exp.evaluator.tokens[:rows]
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in tokens.split(exp.evaluator.batch_size):
            forward_logits(exp.model, batch)
    return (time.perf_counter() - started) / tokens.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[32000, 64000, 128000, 254000])
    ap.add_argument("--max-tokens", type=int, default=254000)
    ap.add_argument("--name", default="token_efficiency")
    ap.add_argument(
        "--data", choices=["issue", "config"], default="issue",
        help="issue: 64 calibration / 8 search / 32 held-out sequences; config: the "
        "built-in config's splits (the quickstart's 16 / 4 / 16)",
    )
    add_overrides(ap)
    args = ap.parse_args()

    figures: dict[str, Any] = {}
    loaded = None
    for problem in args.problems:
        spec = PROBLEMS[problem]
        data = DATA if args.data == "issue" else []
        base = [*data, *spec["overrides"], *args.overrides]
        best: dict[str, dict[int, tuple]] = {}
        runs: dict[str, Any] = {}
        exp = None
        with tempfile.TemporaryDirectory() as tmp:
            for method in args.methods:
                pin = evopress_search(spec["config"], base) if method in ON_EVOPRESS else []
                overrides = [*pin, *base, *METHODS[method], f"run_dir={Path(tmp) / method}"]
                if method in GROWING:
                    # Racing spends less a generation than the estimate assumes (it drops
                    # some candidates early): planned longer, the marks cut it.
                    planned = int(args.max_tokens * (1.3 if method == "race" else 1))
                    overrides.append(generations(spec["config"], overrides, planned))
                try:
                    exp, result, seconds = timed_search(spec["config"], overrides, loaded)
                except EvocompError as e:  # e.g. OWL on a space without a kept share
                    runs[method] = {"refused": str(e)}
                    print(f"{problem} {method}: refused: {e}", flush=True)
                    continue
                loaded = exp.loaded
                trials = pd.read_parquet(Path(tmp) / method / "trials.parquet")
                per_token = dense_seconds_per_token(exp)
                best[method] = checkpoints(trials, args.checkpoints)
                runs[method] = {
                    "tokens": int(trials["spent"].sum()),
                    # What the same evaluations add up to when every one scores all
                    # its rows (before rows were kept per genome).
                    "budget_tokens": int(trials["tokens"].sum()),
                    "evaluations": len(trials),
                    "by_budget": {
                        int(b): {"evaluations": len(g), "spent": int(g["spent"].sum())}
                        for b, g in trials.groupby("tokens")
                    },
                    "search_s": round(seconds, 1),
                    "candidate_cost_ratio": round(
                        trials["seconds"].sum() / (trials["spent"].sum() * per_token), 4
                    ),
                    "search_fitness": result.fitness,
                }
                print(f"{problem} {method}: {runs[method]}", flush=True)
        assert exp is not None
        genomes: dict[str, Any] = {"dense": None, "uniform": exp.space.uniform()}
        for method, marks in best.items():
            for mark, genome in marks.items():
                genomes.setdefault(f"{method}@{mark}", genome)
        # One held-out pass per distinct genome.
        distinct: dict[Any, str] = {}
        for name, genome in genomes.items():
            distinct.setdefault(genome, name)
        held = heldout_metrics(exp, {name: g for g, name in distinct.items()})
        ppl = {name: held["ppl"][distinct[g]] for name, g in genomes.items()}
        kl = {name: held["kl"][distinct[g]] for name, g in genomes.items()}
        uniform = ppl["uniform"]
        gain: dict[str, dict[str, float]] = {}
        for method, marks in best.items():
            for mark in marks:
                gain.setdefault(str(mark), {})[method] = round(
                    1 - ppl[f"{method}@{mark}"] / uniform, 4
                )
        figures[problem] = {
            "gain_vs_uniform": gain,
            "heldout_ppl": ppl,
            "heldout_kl": kl,
            "runs": runs,
            # The genomes behind the figures, so that "the same genome" can be checked.
            "genomes": {name: encode_genome(g) for name, g in genomes.items() if g is not None},
        }
        # Written after every problem, so a long run that dies keeps what it measured.
        write_result(args.name, _summary(figures, args))


def _summary(figures: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The figures of the problems run so far, with the run-wide fields."""
    out = dict(figures)
    if "sparsity" in figures:
        runs = figures["sparsity"]["runs"]
        out["candidate_cost_ratio"] = {
            key: runs[method]["candidate_cost_ratio"]
            for key, method in (("plain", "default_no_prefix"), ("prefix", "default"))
            if "candidate_cost_ratio" in runs.get(method, {})
        }
    out["checkpoints"] = args.checkpoints
    out["data"] = DATA if args.data == "issue" else "as in the built-in configs"
    missing = [p for p in args.problems if p not in figures]
    if missing:
        out["not_yet_run"] = missing
    return out


if __name__ == "__main__":
    main()
