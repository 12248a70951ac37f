"""The held-out evaluation of a run (``evocomp eval``, and the end of ``evocomp
search``): dense, the baseline and the searched genome (with ``final_eval.front``,
every Pareto-front candidate too) scored on the held-out text of each corpus, by
perplexity and by KL divergence to the dense model, and on lm-eval tasks.

The corpora are the run's own data (a mixture's held-out split, then each of its
parts alone), then ``final_eval.corpora``; each is marked ``seen`` when the search
calibrated on and scored candidates with (other documents of) that corpus.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from evocomp.errors import EvocompError
from evocomp.evaluators.data import DataConfig, split_tokens
from evocomp.evaluators.metrics import KLEvaluator
from evocomp.evaluators.reference import compute_reference
from evocomp.results import markdown_table
from evocomp.runner import Experiment, RunDir, write_json
from evocomp.search.store import decode_genome, encode_genome
from evocomp.spaces.base import Genome

log = logging.getLogger("evocomp")


@dataclass(frozen=True)
class HeldoutCorpus:
    """Held-out sequences of one corpus (or of the run's mixture) to score on."""

    name: str
    tokens: torch.Tensor
    seen: bool
    """Whether the search saw this corpus: its calibration and search sequences came
    from other documents of it (held-out documents are never seen)."""


def heldout_corpora(exp: Experiment) -> list[HeldoutCorpus]:
    """What :func:`final_eval` scores on: the run's own held-out split, each part of
    its mixture alone (as many sequences, from the same held-out documents), then
    each of ``final_eval.corpora`` not already there."""
    data = exp.cfg.data
    tokenizer = exp.loaded.tokenizer
    out = [HeldoutCorpus(data.name, exp.splits.heldout, seen=True)]
    if len(data.parts) > 1:
        out += [
            HeldoutCorpus(part, split_tokens(data.alone(part), "heldout", tokenizer), seen=True)
            for part in data.parts
        ]
    for name in exp.cfg.final_eval.corpora:
        if name not in {c.name for c in out}:
            tokens = split_tokens(data.alone(name), "heldout", tokenizer)
            out.append(HeldoutCorpus(name, tokens, seen=False))
    return out


def corpus_scores(
    exp: Experiment, genomes: dict[str, Genome | None], corpus: HeldoutCorpus
) -> dict[str, dict[str, float]]:
    """Perplexity and mean per-token KL to the dense model (``ppl``, ``kl``) of each
    named genome (``None`` = dense) on ``corpus``'s held-out sequences."""
    fe = exp.cfg.final_eval
    # Computed here rather than cached on disk: the dense model runs on these tokens
    # anyway (its own row), and held-out sets of several corpora would fill the cache.
    reference = compute_reference(
        exp.model, corpus.tokens, topk=fe.kl_topk, batch_size=fe.batch_size, progress=False
    )
    device = next(exp.model.parameters()).device
    ev = KLEvaluator(corpus.tokens, reference.to(device), batch_size=fe.batch_size)
    out = {}
    for name, genome in tqdm(genomes.items(), desc=corpus.name, disable=not exp.progress):
        with exp.applied(genome) as model:
            metrics = ev.evaluate(model)
        out[name] = {"ppl": metrics["ppl"], "kl": metrics["kl"]}
        log.info("%s %-9s ppl %.3f kl %.5f", corpus.name, name, metrics["ppl"], metrics["kl"])
    return out


def final_eval(exp: Experiment, run: RunDir, best: Genome) -> dict[str, Any]:
    """Score dense, the baseline and the searched genome (with ``final_eval.front``,
    every candidate of pareto.parquet too) on held-out perplexity and KL to the dense
    model of each corpus of :func:`heldout_corpora` and, with
    ``final_eval.downstream``, on lm-eval tasks. Writes eval.parquet (one row per
    candidate, ``ppl.<corpus>`` and ``kl.<corpus>`` columns; the corpora and whether
    the search saw them in ``attrs["corpora"]``), eval.md and eval.json; returns
    what eval.json holds."""
    cfg, space = exp.cfg, exp.space
    fe = cfg.final_eval
    genomes: dict[str, Genome | None] = {
        "dense": None, space.baseline_name: space.uniform(), "searched": best
    }
    if fe.front:
        genomes.update(_front_genomes(run))
    fitness = _search_fitness(run)
    rows = {name: _row(exp, fitness, name, g) for name, g in genomes.items()}
    corpora = heldout_corpora(exp)
    for corpus in corpora:
        for name, metrics in corpus_scores(exp, genomes, corpus).items():
            rows[name][f"ppl.{corpus.name}"] = metrics["ppl"]
            rows[name][f"kl.{corpus.name}"] = metrics["kl"]
    if fe.downstream is not None:
        from evocomp.evaluators.downstream import downstream_scores

        for name, genome in tqdm(genomes.items(), desc="lm-eval", disable=not exp.progress):
            started = time.perf_counter()
            with exp.applied(genome) as model:
                scores = downstream_scores(model, exp.loaded.tokenizer, fe.downstream,
                                           progress=False)
            rows[name].update({f"task.{k}": v for k, v in scores.items()})
            rows[name]["task.seconds"] = time.perf_counter() - started
            log.info("lm-eval %-9s accuracy %.4f", name, scores["accuracy"])
    table = pd.DataFrame(list(rows.values()))
    described = {
        c.name: {"seen": c.seen, "sequences": int(c.tokens.shape[0]),
                 "tokens": int(c.tokens.numel())}
        for c in corpora
    }
    table.attrs["corpora"] = described
    table.to_parquet(run.path / "eval.parquet")
    (run.path / "eval.md").write_text(_markdown(cfg.data, described, table))
    main = cfg.data.name
    result = {
        "heldout_tokens": int(exp.splits.heldout.numel()),
        "corpus": cfg.data.corpus,
        "ppl": {name: row[f"ppl.{main}"] for name, row in rows.items()},
        "kl": {name: row[f"kl.{main}"] for name, row in rows.items()},
        "cost": {name: row["cost"] for name, row in rows.items() if name != "dense"},
        "budget": space.budget,
        "corpora": [c.name for c in corpora],
        "seen": {c.name: c.seen for c in corpora},
        "rows": table.drop(columns="genome").to_dict(orient="records"),
    }
    write_json(run.eval, result)
    return result


def _markdown(data: DataConfig, corpora: dict[str, dict[str, Any]], table: pd.DataFrame) -> str:
    """eval.md: which corpora the search saw, then one row per candidate."""
    mixture = ", ".join(f"{name} {weight:.3g}" for name, weight in data.parts.items())

    def seen(name: str, about: dict[str, Any]) -> str:
        mark = "yes" if about["seen"] else "no"
        own_mixture = name == data.name and len(data.parts) > 1
        return f"{mark} (the mixture {mixture})" if own_mixture else mark

    corpus_table = pd.DataFrame(
        {"corpus": name, "seen by the search": seen(name, about),
         "sequences": about["sequences"], "tokens": about["tokens"]}
        for name, about in corpora.items()
    )
    return (
        "Held-out text per corpus (seen: the search calibrated on and scored candidates "
        "with other documents of it):\n\n"
        + markdown_table(corpus_table)
        + "\n\n"
        + markdown_table(table.drop(columns="genome"))
        + "\n"
    )


def _front_genomes(run: RunDir) -> dict[str, Genome]:
    if not run.pareto.exists():
        raise EvocompError(f"{run.path} has no pareto.parquet yet; has the search run?")
    front = pd.read_parquet(run.pareto).sort_values("cost")
    return {f"front-{k:02d}": decode_genome(g) for k, g in enumerate(front.genome, start=1)}


def _search_fitness(run: RunDir) -> dict[str, float]:
    """Each evaluated genome's fitness at the largest token budget it was scored on."""
    if not run.trials.exists():
        return {}
    trials = pd.read_parquet(run.trials, columns=["genome", "tokens", "fitness"])
    last = trials.sort_values("tokens").groupby("genome").fitness.last()
    return {g: float(f) for g, f in last.items()}


def _row(
    exp: Experiment, fitness: dict[str, float], name: str, genome: Genome | None
) -> dict[str, Any]:
    """A candidate's identity in the eval table: name, genome, cost (of the space's
    budget), and its search fitness when the trial store has it."""
    if genome is None:
        return {"name": name, "genome": None, "cost": None, "cost_of_budget": None}
    cost = exp.space.cost(genome)
    row = {"name": name, "genome": encode_genome(genome), "cost": cost,
           "cost_of_budget": cost / exp.space.budget if exp.space.budget else None}
    if row["genome"] in fitness:
        row["search_fitness"] = fitness[row["genome"]]
    return row
