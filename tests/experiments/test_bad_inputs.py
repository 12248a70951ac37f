"""Bad input, as a new user types it: every case exits 2 with one message line
that names the field, no traceback, and no run directory left behind.

Most cases are generated from the code (every option of every registered
component and every config section: an unknown name, a value past its bound, a
value of the wrong type), so a new option is covered the day it is added; the
rest are the hand-written cases of files, paths, stores and search settings.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from annotated_types import Ge, Gt, Le, Lt
from conftest import search_config, tiny_llama
from pydantic import BaseModel

from evocomp.cli import main
from evocomp.config import COMPONENTS, Config


@dataclass(frozen=True)
class Case:
    """``evocomp`` arguments (``{cfg}``, ``{tmp}`` filled in) and what the message
    must name; ``setup`` writes files the case needs."""

    id: str
    argv: tuple[str, ...]
    names: str
    setup: Callable[[Path], None] | None = field(default=None, compare=False)


def _search(*overrides: str) -> tuple[str, ...]:
    return ("search", "{cfg}", *(a for o in overrides for a in ("--set", o)))


def _bounds(info: Any) -> Iterator[tuple[str, Any]]:
    """Values just past each bound of a numeric field."""
    for meta in info.metadata:
        if isinstance(meta, Ge):
            yield "below", meta.ge - 1
        elif isinstance(meta, Gt):
            yield "at-lower", meta.gt
        elif isinstance(meta, Le):
            yield "above", meta.le + 1
        elif isinstance(meta, Lt):
            yield "at-upper", meta.lt


def _numeric(ann: Any) -> bool:
    """``int``, ``float``, or either or ``None``."""
    args = [a for a in get_args(ann) if a is not type(None)] or [ann]
    return all(a in (int, float) for a in args) and ann is not bool


def _field_cases(
    prefix: str, model: type[BaseModel], base: tuple[str, ...], label: str
) -> Iterator[Case]:
    """An unknown option, and per option a value of the wrong type and values past
    its bounds; ``base`` are overrides that select the component ``label``."""
    yield Case(f"{label}.unknown", _search(*base, f"{prefix}.nmae=1"), f"{prefix}")
    for name, info in model.model_fields.items():
        ann = info.annotation
        key = f"{prefix}.{name}"
        if _numeric(ann):
            yield Case(f"{label}.{name}.type", _search(*base, f"{key}=abc"), name)
            for where, value in _bounds(info):
                yield Case(f"{label}.{name}.{where}", _search(*base, f"{key}={value}"), name)
        elif ann is bool:
            yield Case(f"{label}.{name}.type", _search(*base, f"{key}=[1]"), name)
        elif str(ann).startswith("list["):
            yield Case(f"{label}.{name}.type", _search(*base, f"{key}=7"), name)


def _generated() -> Iterator[Case]:
    for section, (registry, _) in COMPONENTS.items():
        yield Case(f"{section}.name", _search(f"{section}.name=nope"), section)
        for name in registry.names():
            params = registry.get(name).Params
            yield from _field_cases(
                section, params, (f"{section}.name={name}",), f"{section}:{name}"
            )
    for section, info in Config.model_fields.items():
        ann = info.annotation
        if section not in COMPONENTS and isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _field_cases(section, ann, (), section)


def _write(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).write_bytes(content)


def _run_with_best(tmp: Path) -> None:
    """A run directory with a config and a best genome (what export reads first)."""
    run = tmp / "done"
    run.mkdir()
    cfg = yaml.safe_load(Path(tmp / "base.yaml").read_text())
    cfg["run_dir"] = str(run)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "best.json").write_text(json.dumps({"genome": [2] * 28}))
    (tmp / "a-file").write_text("x")


def _run_without_best(tmp: Path) -> None:
    """A run directory whose search recorded no best genome yet."""
    _run_with_best(tmp)
    (tmp / "done").rename(tmp / "no-best")
    (tmp / "no-best" / "best.json").unlink()


HAND: list[Case] = [
    # units
    Case("width.finer-than-a-head",
         _search("compressor={name: structured-obs}", "space={name: width, step: 0.1}"),
         "space.step"),
    Case("width.unreachable",
         _search("compressor={name: structured-obs}",
                 "space={name: width, target: 0.3, step: 0.25}"),
         "space.target"),
    Case("width.sparsity-compressor", _search("space={name: width, step: 0.25}"),
         "compressor.name"),
    Case("width.joint", _search("space={name: joint, spaces: [{name: width}]}"), "spaces"),
    Case("search.resample.evaluator",
         _search("search.resample=true", "evaluator={name: dtm, prompts: 2, new_tokens: 4}"),
         "search.resample"),
    Case("units.regex", _search('units.targets=["re:(("]'), "units.targets"),
    Case("units.ignore.regex", _search('units.ignore=["re:[z"]'), "units.ignore"),
    Case("units.nothing", _search("units.targets=[nothing]"), "units.targets"),
    Case("units.empty-pattern", _search('units.targets=[""]'), "units.targets"),
    # files
    Case("config.binary", ("search", "{tmp}/binary.yaml"), "binary.yaml",
         _write("binary.yaml", bytes(range(256)))),
    Case("config.utf16", ("search", "{tmp}/utf16.yaml"), "utf16.yaml",
         _write("utf16.yaml", "name: x\n".encode("utf-16"))),
    Case("config.empty", ("search", "{tmp}/empty.yaml"), "empty.yaml",
         _write("empty.yaml", b"")),
    Case("config.comment-only", ("search", "{tmp}/comment.yaml"), "comment.yaml",
         _write("comment.yaml", b"# nothing here\n")),
    Case("config.list", ("search", "{tmp}/list.yaml"), "list.yaml",
         _write("list.yaml", b"- a\n- b\n")),
    Case("config.bad-yaml", ("search", "{tmp}/bad.yaml"), "bad.yaml",
         _write("bad.yaml", b"search: [1,\n")),
    Case("config.missing", ("search", "{tmp}/missing.yaml"), "missing.yaml"),
    Case("data.binary", _search("data.corpus=text", "data.path={tmp}/binary.txt"), "data.path",
         _write("binary.txt", bytes(range(128, 256)) * 4)),
    Case("data.missing", _search("data.corpus=text", "data.path={tmp}/none.txt"), "data.path"),
    Case("data.suffix", _search("data.corpus=text", "data.path={tmp}/x.csv"), "data.path",
         _write("x.csv", b"a,b\n")),
    Case("data.jsonl", _search("data.corpus=text", "data.path={tmp}/x.jsonl"), "x.jsonl",
         _write("x.jsonl", b'{"txt": 1}\n')),
    Case("data.path-without-text", _search("data.path={tmp}/x.txt"), "path"),
    Case("data.corpus", _search("data.corpus=nope"), "corpus"),
    Case("data.mixture.unknown", _search("data.corpus={wiki: 0.5, nope: 0.5}"), "data.corpus"),
    Case("data.mixture.negative", _search("data.corpus={wiki: -1, books: 1}"), "data.corpus"),
    Case("data.mixture.zero", _search("data.corpus={wiki: 0, books: 1}"), "data.corpus"),
    Case("data.mixture.empty", _search("data.corpus=[]"), "data.corpus"),
    Case("data.mixture.path", _search("data.corpus=[wiki, books]", "data.path={tmp}/x.txt"),
         "path", _write("x.txt", b"some text\n")),
    Case("data.mixture.text-without-path", _search("data.corpus=[wiki, text]"), "path"),
    # --set
    Case("set.yaml", _search("search.generations=[1,"), "search.generations"),
    Case("set.double-dot", _search("search..generations=3"), "search..generations"),
    Case("set.no-equals", ("search", "{cfg}", "--set", "search.generations"), "key=value"),
    Case("set.not-section", _search("seed=1", "seed.x=2"), "seed"),
    Case("set.index", _search("search={name: chain, steps: [{name: ga}, {name: evopress}]}",
                              "search.steps.2.generations=1"), "search.steps has 2 items"),
    # paths
    Case("run_dir.proc", _search("run_dir=/proc/x/run"), "run_dir"),
    Case("run_dir.file", _search("run_dir={tmp}/a-file"), "run_dir",
         _write("a-file", b"x")),
    Case("database.path.file", _search("database.path={tmp}/a-file"), "database.path",
         _write("a-file", b"x")),
    Case("store.journal-dir", _search("store.storage=journal:/nonexistent/dir/x.journal"),
         "store.storage"),
    Case("store.nonsense", _search("store.storage=trials"), "store.storage"),
    Case("export.out-file", ("export", "{tmp}/done", "--out", "{tmp}/a-file"), "--out",
         _run_with_best),
    Case("export.out-proc", ("export", "{tmp}/done", "--out", "/proc/x/out"), "--out",
         _run_with_best),
    Case("export.not-a-run", ("export", "{tmp}", "--out", "{tmp}/out"), "config.yaml"),
    Case("eval.not-a-run", ("eval", "{tmp}/nothing"), "config.yaml"),
    Case("resume.not-a-run", ("search", "--resume", "{tmp}/nothing"), "config.yaml"),
    # finetune (checked before the model loads; tests/experiments/test_finetune.py has
    # the cases that need it: tokens beyond the corpus, a LoRA rank beyond a layer)
    Case("finetune.not-a-run", ("finetune", "{tmp}/nothing"), "config.yaml"),
    Case("finetune.no-best", ("finetune", "{tmp}/no-best"), "best.json", _run_without_best),
    Case("finetune.tokens", ("finetune", "{tmp}/done", "--tokens", "10"), "--tokens",
         _run_with_best),
    Case("finetune.lr", ("finetune", "{tmp}/done", "--lr", "-1"), "--lr", _run_with_best),
    Case("finetune.lora-rank", ("finetune", "{tmp}/done", "--lora-rank", "0"), "--lora-rank",
         _run_with_best),
    Case("finetune.batch-size", ("finetune", "{tmp}/done", "--batch-size", "0"),
         "--batch-size", _run_with_best),
    Case("finetune.no-loss", ("finetune", "{tmp}/done", "--teacher", "none", "--lm-weight",
                              "0"), "--lm-weight", _run_with_best),
    # names
    Case("name.empty", _search('name=""'), "name"),
    Case("name.slash", _search("name=a/b"), "name"),
    Case("name.dots", _search("name=.."), "name"),
    # search settings
    Case("stages.tokens", _search("search.stages=[{tokens: 1000000000, keep: 1}]"),
         "search.stages[0].tokens"),
    Case("random.tokens", _search("search.name=random", "search.tokens=100000"),
         "search.tokens"),
    Case("stages.keep", _search("search.stages=[{tokens: 64, keep: 2}]"), "stage keep"),
    Case("stages.grow", _search("search.stages=[{tokens: 128, keep: 2}, {tokens: 64, keep: 1}]"),
         "stage token"),
    Case("stages.empty", _search("search.stages=[]"), "stages"),
    Case("start_from", _search("search.start_from=[evopress]"), "start_from"),
    Case("start_from.probes", _search("search.start_from=[sensitivity]"),
         "search.start_from.sensitivity.tokens=512"),
    Case("owl.bits", _search("space.name=bits", "compressor.name=gptq", "search.name=owl"),
         "space.name one of: 'sparsity', 'width'"),
    Case("sensitivity.depth", _search("space.name=depth", "space.remove=2",
                                      "search.name=sensitivity"), "space.name"),
    Case("heldout.zero", _search("data.heldout=0"), "data.heldout"),
    Case("sleb.sparsity", _search("search.name=sleb"), "space.name"),
    Case("nsga2.depth", _search("space.name=depth", "space.remove=2", "search.name=nsga2"),
         "depth"),
    # spaces and compressors
    Case("depth.remove.over", _search("space.name=depth", "space.remove=100"), "space.remove"),
    Case("depth.remove.zero", _search("space.name=depth", "space.remove=0"), "space.remove"),
    Case("depth.remove.all", _search("space.name=depth", "space.remove=8"), "space.remove"),
    Case("depth.both", _search("space.name=depth", "space.remove=1", "space.remove_fraction=0.1"),
         "remove"),
    Case("sparsity.levels", _search("space.target=0.95", "space.step=0.1"), "step"),
    Case("bits.target", _search("space.name=bits", "space.target=9"), "target"),
    Case("bits.width", _search("space.name=bits", "space.bits=[1, 3]"), "bits"),
    Case("space.compressor", _search("space.name=bits"), "compressor.name"),
    Case("nm_group", _search("compressor.nm_group=3"), "nm_group"),
    Case("joint.one-part", _search("space.name=joint", "space.spaces=[{name: sparsity}]"),
         "spaces"),
    Case("joint.depth-only", _search("space.name=joint",
                                     "space.spaces=[{name: depth, remove: 1}, {name: depth}]"),
         "spaces"),
    Case("c2f.bits", _search("space.name=bits", "compressor.name=gptq",
                             "search={name: coarse-to-fine}"), "space.name"),
    Case("c2f.inner.nsga2", _search("search={name: coarse-to-fine, inner: {name: nsga2}}"),
         "search.inner.name"),
    Case("c2f.inner.unknown", _search("search={name: coarse-to-fine, inner: {name: nope}}"),
         "inner"),
    Case("c2f.inner.option",
         _search("search={name: coarse-to-fine, inner: {name: evopress, offsprng: 3}}"),
         "offsprng"),
    Case("c2f.inner.tokens",
         _search("search={name: coarse-to-fine, inner: {stages: [{tokens: 99999, keep: 1}]}}"),
         "search.inner.stages[0].tokens"),
    Case("chain.one-step", _search("search={name: chain, steps: [{name: ga}]}"), "steps"),
    Case("chain.joint", _search(
        "space={name: joint, spaces: [{name: sparsity, target: 0.25, step: 0.125, levels: 2}, "
        "{name: bits, bits: [2, 4], target: 3}]}",
        "compressor={name: prune-quantize, prune: {name: magnitude}, quantize: {name: rtn}}",
        "search={name: chain, steps: [{name: ga}, {name: evopress}]}"), "space 'joint'"),
    Case("chain.nsga2", _search("search={name: chain, steps: [{name: ga}, {name: nsga2}]}"),
         "search.steps[1].name"),
    Case("chain.tokens",
         _search("search={name: chain, steps: [{name: ga, tokens: 99999}, {name: evopress}]}"),
         "search.steps[0].tokens"),
    Case("train.calibration", _search("search.train={tokens: [64, 99999]}"),
         "search.train.tokens[1]"),
    Case("train.per-stage", _search("search.train={tokens: [64]}"), "train.tokens"),
    Case("train.params", _search("search.train={tokens: [64, 128], params: some}"), "params"),
    Case("pq.pruner", _search("compressor.name=prune-quantize", "compressor.prune={name: gptq}"),
         "prune"),
    Case("metric.expression", _search("compressor={name: metric, expression: 'mul(W, Y)'}"),
         "unknown symbol 'Y' at position 7"),
    Case("metric.deep",
         _search("compressor={name: metric, expression: '" + "neg(" * 9 + "W" + ")" * 9 + "'}"),
         "9 levels deep; at most 8"),
    Case("metric.unclosed", _search("compressor={name: metric, expression: 'mul(W, X'}"),
         "position 8"),
    Case("metric.pattern.unquoted", _search("space={name: metric, pattern: 2:4}"), "pattern"),
    Case("metric.pattern.inputs", _search("space={name: metric, pattern: '1:48'}"),
         "space.pattern"),
    Case("metric.evopress", _search("space={name: metric}"), "search.name"),
    Case("metric-gp.sparsity", _search("search={name: metric-gp}"), "space.name"),
    Case("metric-gp.seeds",
         _search("space={name: metric}", "search={name: metric-gp, seeds: ['sqr(Q)']}"),
         "seeds"),
    Case("metric-gp.stages",
         _search("space={name: metric}",
                 "search={name: metric-gp, stages: [{tokens: 99999, keep: 1}]}"),
         "search.stages[0].tokens"),
    # model
    Case("model.path", _search("model.name={tmp}/no-model"), "no-model"),
    Case("model.device", _search("model.device=gpu7"), "model.device"),
    Case("model.dtype", _search("model.dtype=float8"), "model.dtype"),
    Case("executor.cuda", _search("executor.name=ray", "model.device=cuda"), "cuda"),
    Case("downstream.task", _search("final_eval.downstream={tasks: [nope]}"), "nope"),
    Case("final_eval.corpus", _search("final_eval.corpora=[nope]"), "corpora"),
    # A hub corpus offline: refused before the search, not after it.
    Case("final_eval.corpus.offline", _search("final_eval.corpora=[c4]"), "'c4'"),
    Case("evaluator.lm_eval.task", _search("evaluator.name=lm_eval", "evaluator.tasks=[nope]"),
         "nope"),
]

CASES = [*_generated(), *HAND]


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 150
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def tmp_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model and a search config on it: the base every case changes."""
    from conftest import _saved

    root = tmp_path_factory.mktemp("bad-inputs")
    model = _saved(tiny_llama(), root / "tiny-llama")
    cfg = Path(search_config(root, model, search={"generations": 1}))
    cfg.rename(root / "base.yaml")
    return root


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line(
    case: Case, tmp_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_base / "cache"))
    # Offline as this machine is, wherever the tests run (the hub corpus case).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "base.yaml").write_text((tmp_base / "base.yaml").read_text())
    cfg = yaml.safe_load((tmp_path / "base.yaml").read_text())
    cfg["run_dir"] = str(tmp_path / "runs" / "case")
    cfg["database"]["path"] = str(tmp_base / "db")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(cfg))
    if case.setup is not None:
        case.setup(tmp_path)
    argv = [
        a.replace("{cfg}", str(tmp_path / "base.yaml")).replace("{tmp}", str(tmp_path))
        for a in case.argv
    ]
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("evocomp: error: ")]
    assert len(errors) == 1, err
    assert errors[0] == lines[-1], f"the message is not one line:\n{err}"
    assert "Traceback" not in err
    assert case.names in errors[0], errors[0]
    assert not (tmp_path / "runs").exists(), "a failed start left a run directory"
