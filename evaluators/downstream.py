"""Downstream task accuracy with lm-eval-harness, on the model as it is in memory.

:func:`downstream_scores` runs lm-eval's own ``HFLM`` wrapper and ``simple_evaluate``
on a model object, so a genome applied in place (pointer swaps, no reload) is scored
exactly like the same weights saved and reloaded. The tasks come from the offline
registry of :mod:`evocomp.evaluators.lm_tasks` (plus, with ``online: true``, every
task lm-eval ships).

The ``lm_eval`` evaluator makes this a search objective: fitness is
``error = 1 - mean accuracy`` over the tasks. It is far more expensive than ``kl``:
every candidate costs one forward pass per answer choice of every document (four per
ARC question) plus lm-eval's own overhead per request (``arc_easy`` with ``limit: 50``
measured 1.7 s per candidate for the tiny test model and 29 s for SmolLM2-135M, on one
CPU thread), so prefer it for re-ranking a front or for short searches with a small
``limit``. The generative tasks (``triviaqa``, ``nq_open``: greedy answers, exact
match) cost one forward pass per generated token instead, up to lm-eval's 256 when a
model rambles; :func:`downstream_generations` returns the answers themselves.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stderr
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from evocomp.errors import EvocompError, choices
from evocomp.evaluators.base import EVALUATORS, Evaluator, EvaluatorParams, Forward
from evocomp.evaluators.lm_tasks import (
    HEADLINE_METRIC,
    MMLU_SUBJECTS,
    OFFLINE_TASKS,
    offline_leaves,
    offline_task_names,
    require_lm_eval,
    task_manager,
)

if TYPE_CHECKING:
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedTokenizerBase

    from evocomp.evaluators.reference import ReferenceCache

ACCURACY_METRICS = ("acc", "acc_norm", "exact_match")
"""What counts as a task's accuracy, in order of preference, unless
:data:`~evocomp.evaluators.lm_tasks.HEADLINE_METRIC` names its usual one."""

_OFFLINE_HINT = (
    f"{choices(OFFLINE_TASKS)}, or mmlu_<subject> ({len(MMLU_SUBJECTS)} subjects); "
    "lm-eval's other tasks need online: true (and network access)"
)


class LMEvalEvaluatorParams(EvaluatorParams):
    """Options of :class:`LMEvalEvaluator`."""

    tasks: list[str] = Field(
        default_factory=lambda: ["arc_easy", "piqa"],
        min_length=1,
        description="lm-eval task, group or tag names",
    )
    limit: int | None = Field(
        100, ge=1, description="documents per task (per subject for groups); null = all"
    )
    num_fewshot: int = Field(0, ge=0, description="few-shot examples in each prompt")
    batch_size: int = Field(8, ge=1, description="requests per forward pass")
    online: bool = Field(False, description="also allow lm-eval's own (downloading) tasks")

    @model_validator(mode="after")
    def _known_tasks(self) -> LMEvalEvaluatorParams:
        repeated = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if repeated:
            raise ValueError(f"tasks are listed twice: {choices(repeated)}")
        if not self.online:
            known = set(offline_task_names())
            unknown = [t for t in self.tasks if t not in known]
            if unknown:
                raise ValueError(
                    f"unknown offline task {unknown[0]!r}; allowed: {_OFFLINE_HINT}"
                )
            for i, a in enumerate(self.tasks):
                for b in self.tasks[i + 1 :]:
                    if offline_leaves(a) & offline_leaves(b):
                        raise ValueError(
                            f"tasks {a!r} and {b!r} overlap (a group or tag includes "
                            "the other); list each task once"
                        )
        return self


@EVALUATORS.register("lm_eval")
class LMEvalEvaluator(Evaluator[LMEvalEvaluatorParams]):
    """Downstream accuracy with lm-eval-harness; fitness ``error = 1 - mean accuracy``.

    Expensive: see the module docstring. The token budget of multi-fidelity search
    scales the documents scored: a budget of ``b`` of the evaluator's ``max_tokens``
    scores the first ``ceil(limit * b / max_tokens)`` documents of each task, so
    early stages of a multi-stage search score fewer documents, and every candidate
    at one budget is scored on the same documents.
    """

    name = "lm_eval"
    metric = "error"

    Params = LMEvalEvaluatorParams

    def __init__(
        self,
        tokens: torch.Tensor,
        *,
        tokenizer: PreTrainedTokenizerBase,
        params: LMEvalEvaluatorParams,
    ) -> None:
        super().__init__(tokens, batch_size=params.batch_size)
        self.tokenizer = tokenizer
        self.params = params
        self._lm: HFLM | None = None

    @classmethod
    def create(
        cls, model: nn.Module, tokens: torch.Tensor, params: LMEvalEvaluatorParams, *,
        cache: ReferenceCache | None = None, progress: bool = True,
    ) -> LMEvalEvaluator:
        """The evaluator for ``model``, with the tokenizer saved beside its weights
        (``model.name_or_path``, where ``load_model`` loaded both from).

        ``tokens`` (the search split) only sets the scale of token budgets; no
        reference outputs are needed, so ``cache`` is unused.
        """
        evaluator = cls(tokens, tokenizer=tokenizer_of(model), params=params)
        # Names only online tasks could have are checked here, before the search starts.
        _check_tasks(task_manager(params.online), params.tasks, params.online)
        return evaluator

    def limit_for(self, budget_tokens: int | None) -> int | float | None:
        """Documents per task at ``budget_tokens``: an int, ``None`` (all), or a
        fraction below 1 of all documents (lm-eval's ``limit`` semantics)."""
        full = self.params.limit
        if budget_tokens is None or budget_tokens >= self.max_tokens:
            return full
        share = max(budget_tokens, 1) / self.max_tokens
        return share if full is None else max(1, math.ceil(full * share))

    def evaluate(
        self, model: nn.Module, budget_tokens: int | None = None, *,
        forward: Forward | None = None, order: Sequence[int] | None = None,
    ) -> dict[str, float]:
        """lm-eval metrics of ``model`` as it is now, plus ``accuracy`` and ``error``."""
        # HFLM holds the model object; the genome is applied to that same object in
        # place, so one wrapper serves every candidate.
        if self._lm is None or self._lm.model is not model:
            self._lm = _hflm(model, self.tokenizer, self.params.batch_size)
        scores, unscored = _scores(
            self._lm, self.params, self.limit_for(budget_tokens), progress=False
        )
        if unscored:
            raise EvocompError(
                f"lm-eval task {unscored[0]!r} reports none of the accuracies "
                f"{choices(ACCURACY_METRICS)}, so evaluator 'lm_eval' cannot score it"
            )
        return scores


DownstreamParams = LMEvalEvaluatorParams
"""The options of :func:`downstream_scores` (the ``lm_eval`` evaluator's ``Params``)."""


def downstream_scores(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    params: DownstreamParams | None = None,
    *,
    progress: bool = True,
) -> dict[str, float]:
    """lm-eval scores of ``model`` as it is in memory (a genome may be applied).

    Returns a flat dict: ``"<task>/<metric>"`` for every metric lm-eval reports for
    each requested task or group (``arc_easy/acc``, ``arc_easy/acc_norm``,
    ``lambada_openai/perplexity``, ``mmlu/acc``; a tag such as ``lambada`` reports its
    member tasks), ``"<task>/n"`` documents scored, ``"<task>/accuracy"`` the task's
    headline accuracy (``acc_norm`` for arc_challenge, hellaswag and openbookqa, else
    ``acc``), and ``accuracy`` / ``error`` (= 1 - accuracy), the unweighted mean of
    the headline accuracies. Metrics with a non-default lm-eval filter are named
    ``<task>/<metric>,<filter>``.

    Deterministic for given weights: the same documents in the same order, lm-eval's
    fixed seeds (the caller's random states are restored afterwards). ``progress``
    shows lm-eval's progress bars; its log messages are kept below ERROR either way.
    """
    params = params if params is not None else DownstreamParams()
    lm = _hflm(model, tokenizer, params.batch_size)
    return _scores(lm, params, params.limit, progress)[0]


def tokenizer_of(model: nn.Module) -> PreTrainedTokenizerBase:
    """The tokenizer saved with ``model``'s weights (``model.name_or_path``)."""
    from transformers import AutoTokenizer

    source = getattr(model, "name_or_path", "") or ""
    if not source:
        raise EvocompError(
            "evaluator 'lm_eval' needs the model's tokenizer but the model does not say "
            "where it was loaded from (model.name_or_path is empty); call "
            "evocomp.evaluators.downstream_scores(model, tokenizer, params) instead"
        )
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise EvocompError(
            f"could not load the tokenizer of {source!r} for lm-eval: {err}"
        ) from err


def _hflm(model: nn.Module, tokenizer: PreTrainedTokenizerBase, batch_size: int) -> HFLM:
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM


    with _lm_eval_logs_below_error():
        # HFLM sets a pad token on the tokenizer it is given: give it its own copy.
        return HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)


def _check_tasks(manager: TaskManager, tasks: list[str], online: bool) -> None:
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            hint = "the tasks `lm-eval ls tasks` lists" if online else _OFFLINE_HINT
            raise EvocompError(f"unknown lm-eval task {name!r}; allowed: {hint}")


def downstream_generations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    params: DownstreamParams | None = None,
    *,
    progress: bool = True,
) -> dict[str, list[str]]:
    """The answers ``model`` generates for each generative task in ``params.tasks``
    (``triviaqa``, ``nq_open``), in document order, after lm-eval's filters: the
    strings its exact match is computed on. Tasks that score log-likelihoods (multiple
    choice, LAMBADA) have no entry. Deterministic like :func:`downstream_scores`
    (greedy decoding)."""
    params = params if params is not None else DownstreamParams()
    lm = _hflm(model, tokenizer, params.batch_size)
    results = _evaluate(lm, params, params.limit, progress, log_samples=True)
    out: dict[str, list[str]] = {}
    for task, samples in results.get("samples", {}).items():
        responses = [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
        # A generative task's filters (take_first) leave one string per document;
        # log-likelihood tasks leave (log-prob, is-greedy) pairs.
        if responses and all(len(r) == 1 and isinstance(r[0], str) for r in responses):
            out[task] = [r[0] for r in responses]
    return out


def _scores(
    lm: HFLM, params: DownstreamParams, limit: int | float | None, progress: bool
) -> tuple[dict[str, float], list[str]]:
    """The flat scores (see :func:`downstream_scores`) and the tasks without an accuracy."""
    results = _evaluate(lm, params, limit, progress)
    return _flatten(results, params.tasks, task_manager(params.online))


def _evaluate(
    lm: HFLM,
    params: DownstreamParams,
    limit: int | float | None,
    progress: bool,
    log_samples: bool = False,
) -> Mapping[str, Any]:
    """lm-eval's ``simple_evaluate`` results for ``params.tasks``, quietly and reproducibly."""
    from lm_eval import evaluator as lm_evaluator

    manager = task_manager(params.online)
    _check_tasks(manager, params.tasks, params.online)
    with (
        _lm_eval_logs_below_error(),
        _restored_random_states(),
        _without_env_report(),
        _stderr_to_devnull(not progress),
    ):
        results = lm_evaluator.simple_evaluate(
            model=lm,
            tasks=list(params.tasks),
            num_fewshot=params.num_fewshot,
            limit=limit,
            task_manager=manager,
            # Standard errors by bootstrap (perplexity) cost seconds per call; the
            # accuracies themselves do not depend on them.
            bootstrap_iters=0,
            log_samples=log_samples,
        )
    assert results is not None  # None only on non-zero ranks of a distributed run
    return results


def _flatten(
    results: Mapping[str, Any], requested: list[str], manager: TaskManager
) -> tuple[dict[str, float], list[str]]:
    table: Mapping[str, Mapping[str, Any]] = results["results"]
    subtasks: Mapping[str, list[str]] = results.get("group_subtasks", {})
    samples: Mapping[str, Mapping[str, int]] = results.get("n-samples", {})

    def docs(name: str) -> int:
        if name in samples:
            return int(samples[name]["effective"])
        return sum(docs(child) for child in subtasks.get(name, []))

    names: list[str] = []  # lm-eval runs a task named twice (itself and by a tag) once
    for name in requested:
        for member in [name] if name in table else _tag_members(manager, name):
            if member not in names:
                names.append(member)
    out: dict[str, float] = {}
    accuracies: list[float] = []
    unscored: list[str] = []
    for name in names:
        row = table[name]
        found: dict[str, float] = {}
        for key, value in row.items():
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            label = metric if filt == "none" else f"{metric},{filt}"
            found[label] = out[f"{name}/{label}"] = float(value)
        out[f"{name}/n"] = float(docs(name))
        preferred = [HEADLINE_METRIC.get(name, "acc"), *ACCURACY_METRICS]
        headline = next((found[m] for m in preferred if m in found), None)
        if headline is None:  # e.g. exact_match under a named filter (generative tasks)
            headline = next(
                (v for k, v in found.items() if k.split(",")[0] in ACCURACY_METRICS), None
            )
        if headline is None:
            unscored.append(name)
        else:
            out[f"{name}/accuracy"] = headline
            accuracies.append(headline)
    if accuracies:
        out["accuracy"] = sum(accuracies) / len(accuracies)
        out["error"] = 1.0 - out["accuracy"]
    return out, unscored


def _tag_members(manager: TaskManager, name: str) -> list[str]:
    """The tasks a tag stands for (lm-eval reports tags by their member tasks)."""
    entry = manager.task_index.get(name)
    if isinstance(entry, dict):  # lm-eval < 0.4.10 keeps index entries as dicts
        members = entry.get("task", [])
        return [members] if isinstance(members, str) else list(members)
    return sorted(getattr(entry, "tags", ()) or ())


@contextmanager
def _lm_eval_logs_below_error() -> Iterator[None]:
    # lm-eval logs at INFO/WARNING for every call (and a warning per truncated
    # request); under the CLI's INFO root logger that would bury the search's log.
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _restored_random_states() -> Iterator[None]:
    # simple_evaluate seeds Python's, NumPy's and torch's global generators (its
    # defaults keep results comparable); the caller's streams must not change.
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextmanager
def _without_env_report() -> Iterator[None]:
    # simple_evaluate ends by recording the environment (`pip list` and more in
    # subprocesses: about 2-3 s per call) and the git commit of the working
    # directory (printing git's error outside a repository). A search objective
    # pays that per candidate and evocomp never reads it, so both are skipped.
    from lm_eval import evaluator as lm_evaluator

    stubs = {"add_env_info": lambda results: None, "get_git_commit_hash": lambda: None}
    saved = {name: getattr(lm_evaluator, name) for name in stubs if hasattr(lm_evaluator, name)}
    for name in saved:
        setattr(lm_evaluator, name, stubs[name])
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(lm_evaluator, name, original)


@contextmanager
def _stderr_to_devnull(enabled: bool) -> Iterator[None]:
    # lm-eval's and datasets' progress bars cannot be switched off per call.
    if not enabled:
        yield
        return
    with open(os.devnull, "w") as sink, redirect_stderr(sink):
        yield
