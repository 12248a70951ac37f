"""Fitness beyond perplexity: a search on a wiki+books mixture against every uniform
baseline on held-out text of each corpus (seen and unseen), and knowledge-intensive
tasks (closed-book TriviaQA / Natural Questions exact match, MMLU) for dense,
uniform and searched.

    python benchmarks/knowledge.py RUN_DIR [--fitness-run RUN_DIR2] [--limit 100]
        [--mmlu-limit 5] [--num-fewshot 5]

RUN_DIR is a finished search on a mixture (e.g. the quickstart with
``--set "data.corpus={wiki: 0.5, books: 0.5}" --set "final_eval.corpora=[c4, code]"``);
its eval.json already holds dense, SparseGPT-uniform and searched on every corpus.
This adds magnitude- and Wanda-uniform (their databases hold only the uniform level,
calibrated on the same mixture) on the same held-out sequences, then the tasks.
RUN_DIR2 is the same search with a first-divergent-token term in its fitness
(``evaluator: {name: combined, parts: {kl: 1.0, dtm: ...}}``): its held-out
perplexity and task scores are reported beside the KL-only search's, to see whether
it keeps more knowledge at the same perplexity.

Steps (``--steps``, default all, in this order): ``baselines`` (magnitude- and
Wanda-uniform perplexity per corpus), ``dtm`` (the DTM-fitness search's best genome
per corpus, from ``--fitness-run``'s best.json), ``tasks``, ``merge`` (dense,
SparseGPT-uniform and searched from RUN_DIR's eval.json, which ``evocomp eval
RUN_DIR --corpora ...`` writes; corpora it lacks are scored here). Each step adds
to the figures of earlier steps of the same run (benchmarks/results/knowledge.json)
and writes them when it ends, so a crash keeps what was measured and steps can run
while the searches finish.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, uniform_baseline_config, write_result

from evocomp.evaluators import DownstreamParams, downstream_scores
from evocomp.evaluators.metrics import PerplexityEvaluator
from evocomp.final_eval import heldout_corpora
from evocomp.runner import Experiment, load_best, load_run_config

STEPS = ("baselines", "dtm", "tasks", "merge")
TASKS = ("trivia_qa", "nq_open", "mmlu")

BASELINES = ("magnitude", "wanda")
"""Uniform baselines scored here; SparseGPT-uniform (the run's own) is in eval.json."""


def baseline_experiment(exp: Experiment, compressor: str) -> Experiment:
    """``exp`` with another compressor, its database holding only the uniform level
    (one level each side), sharing the loaded model and the splits."""
    base = Experiment(uniform_baseline_config(exp.cfg, compressor), progress=False)
    base.loaded = exp.loaded
    base.splits = exp.splits
    return base


def eval_rows(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The rows of a run's eval.json by candidate name."""
    result = json.loads((run_dir / "eval.json").read_text())
    return {row["name"]: row for row in result["rows"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--fitness-run", type=Path, help="the same search with a DTM term")
    ap.add_argument("--corpora", nargs="+", default=["papers", "code"],
                    help="held-out corpora besides the run's mixture and its parts")
    ap.add_argument("--limit", type=int, default=100, help="TriviaQA / NQ documents")
    ap.add_argument("--mmlu-limit", type=int, default=5, help="MMLU documents per subject")
    ap.add_argument("--num-fewshot", type=int, default=5)
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS),
                    help="the tasks step's tasks")
    args = ap.parse_args()
    started = time.perf_counter()

    cfg, run = load_run_config(args.run_dir)
    cfg = cfg.model_copy(
        update={"final_eval": cfg.final_eval.model_copy(update={"corpora": args.corpora})}
    )
    exp = Experiment(cfg, progress=False)
    corpora = heldout_corpora(exp)
    figures = _earlier(args.run_dir)
    figures.update(
        run=str(args.run_dir),
        data=cfg.data.corpus,
        target_sparsity=cfg.space.params.model_dump().get("target"),
        heldout_sequences=int(exp.splits.heldout.shape[0]),
    )
    mixture: dict[str, dict[str, Any]] = figures.setdefault("mixture", {})
    for c in corpora:
        mixture.setdefault(c.name, {})["seen"] = c.seen
    seconds: dict[str, Any] = figures.setdefault("seconds", {})
    batch_size = cfg.final_eval.batch_size

    def perplexities(target: Experiment, genome: Any, name: str) -> None:
        """``name``'s perplexity on each corpus that lacks it (steps rerun with more
        corpora score only the new ones)."""
        todo = [c for c in corpora if name not in mixture[c.name]]
        if not todo:
            return
        with target.applied(genome) as model:
            for c in todo:
                ev = PerplexityEvaluator(c.tokens, batch_size=batch_size)
                mixture[c.name][name] = round(ev.evaluate(model)["ppl"], 4)

    def save(step: str, t0: float) -> None:
        seconds[step] = round(time.perf_counter() - t0, 1)
        write_result("knowledge", figures)

    if "baselines" in args.steps:
        t0 = time.perf_counter()
        for name in BASELINES:
            base = baseline_experiment(exp, name)
            perplexities(base, base.space.uniform(), name)
        save("baselines", t0)
    if "dtm" in args.steps and args.fitness_run is not None:
        t0 = time.perf_counter()
        figures["fitness_run"] = str(args.fitness_run)
        figures["fitness_evaluator"] = load_run_config(args.fitness_run)[0].evaluator.model_dump()
        perplexities(exp, load_best(load_run_config(args.fitness_run)[1]), "searched_dtm")
        save("dtm", t0)
    if "tasks" in args.steps:
        t0 = time.perf_counter()
        genomes: dict[str, Any] = {
            "dense": None, "uniform": exp.space.uniform(), "searched": load_best(run)
        }
        if args.fitness_run is not None:
            genomes["searched_dtm"] = load_best(load_run_config(args.fitness_run)[1])
        limits = {"trivia_qa": args.limit, "nq_open": args.limit,
                  "mmlu_per_subject": args.mmlu_limit}
        if (figures.get("limit"), figures.get("num_fewshot")) != (limits, args.num_fewshot):
            # Scores measured under other limits are not comparable: start the tasks over.
            figures.pop("tasks", None)
            figures.pop("task_seconds", None)
        figures["limit"], figures["num_fewshot"] = limits, args.num_fewshot
        tasks: dict[str, dict[str, Any]] = figures.setdefault("tasks", {})
        task_seconds: dict[str, dict[str, float]] = figures.setdefault("task_seconds", {})
        for task, limit, key in (
            ("triviaqa", args.limit, "trivia_qa"),
            ("nq_open", args.limit, "nq_open"),
            ("mmlu", args.mmlu_limit, "mmlu"),
        ):
            if key not in args.tasks:
                continue
            params = DownstreamParams(tasks=[task], limit=limit, num_fewshot=args.num_fewshot)
            tasks.setdefault(key, {})
            task_seconds.setdefault(key, {})
            for name, genome in genomes.items():
                # A rerun scores only the models a stopped run left out (same limits).
                if name in tasks[key]:
                    continue
                t1 = time.perf_counter()
                with exp.applied(genome) as model:
                    scores = downstream_scores(
                        model, exp.loaded.tokenizer, params, progress=False
                    )
                tasks[key][name] = round(scores[f"{task}/accuracy"], 4)
                tasks[key]["documents"] = int(scores[f"{task}/n"])
                task_seconds[key][name] = round(time.perf_counter() - t1, 1)
                print(f"{key} {name}: {tasks[key][name]} ({task_seconds[key][name]} s)",
                      flush=True)
                save("tasks", t0)
    if "merge" in args.steps:
        t0 = time.perf_counter()
        rows = eval_rows(args.run_dir)
        for c in corpora:
            if f"ppl.{c.name}" in rows["dense"]:
                mixture[c.name].update(
                    dense=rows["dense"][f"ppl.{c.name}"],
                    sparsegpt=rows["uniform"][f"ppl.{c.name}"],
                    searched=rows["searched"][f"ppl.{c.name}"],
                )
        # Corpora the run's evaluation did not score, scored here.
        perplexities(exp, None, "dense")
        perplexities(exp, exp.space.uniform(), "sparsegpt")
        perplexities(exp, load_best(run), "searched")
        # The run's figures come from its final evaluation's KL pass; this checks that
        # the perplexity pass of the steps above agrees with it.
        first = corpora[0]
        if f"ppl.{first.name}" in rows["dense"]:
            ev = PerplexityEvaluator(first.tokens, batch_size=batch_size)
            figures["check_dense"] = {
                "corpus": first.name,
                "ppl_pass": round(ev.evaluate(exp.model)["ppl"], 4),
                "eval_json": rows["dense"][f"ppl.{first.name}"],
            }
        for scores in mixture.values():
            uniform = [scores.get(k, float("inf")) for k in ("magnitude", "wanda", "sparsegpt")]
            scores["searched_beats_every_uniform"] = scores["searched"] < min(uniform)
        seen = [s["searched_beats_every_uniform"] for s in mixture.values() if s["seen"]]
        unseen = [s["searched_beats_every_uniform"] for s in mixture.values() if not s["seen"]]
        figures["must_show"] = {
            "beats_every_uniform_on_every_seen_corpus": all(seen),
            "beats_every_uniform_on_an_unseen_corpus": any(unseen),
        }
        save("merge", t0)
    print(f"done in {time.perf_counter() - started:.0f} s")


def _earlier(run_dir: Path) -> dict[str, Any]:
    """The figures an earlier step wrote for this run, else none."""
    path = RESULTS / "knowledge.json"
    if path.exists():
        earlier = json.loads(path.read_text())
        if earlier.get("run") == str(run_dir):
            for key in ("command", "machine", "date"):
                earlier.pop(key, None)
            return earlier
    return {}


if __name__ == "__main__":
    main()
