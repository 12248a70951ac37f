"""The experiment config: YAML validated by pydantic, errors that name the bad
field and the allowed values, and ``--set key=value`` overrides."""

from __future__ import annotations

import difflib
import re
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from evocomp.errors import EvocompError, choices
from evocomp.evaluators import EVALUATORS
from evocomp.evaluators.data import CORPORA, DataConfig
from evocomp.evaluators.downstream import DownstreamParams
from evocomp.registry import Registry, StrictModel
from evocomp.search import OPTIMIZERS
from evocomp.search.executor import EXECUTORS
from evocomp.spaces import SPACES
from evocomp.supernet import COMPRESSORS
from evocomp.supernet.models import ModelConfig

BUILTIN_CONFIGS = Path(__file__).parent / "configs"


class ComponentSpec(BaseModel):
    """A config section that names a registered component: ``{name: <registered
    name>, <that component's options>...}``.

    The options are validated by the registered class's own ``Params`` model, so
    a misspelled option is reported with the options that component accepts. Which
    registry a section draws from is part of its field's type (:func:`component`),
    so one class serves compressors, spaces, evaluators, optimizers and executors.
    """

    model_config = ConfigDict(extra="allow")
    name: str
    _params: StrictModel = PrivateAttr()

    @classmethod
    def of(cls, registry: Registry[Any], data: dict[str, Any]) -> ComponentSpec:
        """A spec of ``registry``'s component from ``{name, ...options}``."""
        return _resolve(registry, cls.model_validate(data))

    @property
    def params(self) -> StrictModel:
        return self._params

    def dump(self) -> dict[str, Any]:
        """Name plus every option with defaults filled in (for run dirs and keys)."""
        return {"name": self.name, **self._params.model_dump(mode="json")}


def _resolve(registry: Registry[Any], spec: ComponentSpec) -> ComponentSpec:
    if spec.name not in registry:
        raise ValueError(
            f"unknown {registry.kind} {spec.name!r}; allowed: {choices(registry.names())}"
        )
    params_cls = registry.get(spec.name).Params
    try:
        spec._params = params_cls(**(spec.model_extra or {}))
    except ValidationError as err:
        raise ValueError(
            f"bad options for {registry.kind} {spec.name!r}: "
            + "; ".join(_format_error(e, params_cls) for e in err.errors())
        ) from None
    return spec


def component(registry: Registry[Any], default: str) -> Any:
    """The type of a config field naming a component of ``registry``; a section
    without ``name`` (or no section) means ``default``."""

    def named(data: Any) -> Any:
        if isinstance(data, dict) and "name" not in data:
            return {"name": default, **data}
        return data

    return Annotated[
        ComponentSpec,
        BeforeValidator(named),
        AfterValidator(partial(_resolve, registry)),
        Field(default_factory=lambda: ComponentSpec.of(registry, {"name": default})),
    ]


COMPONENTS: dict[str, tuple[Registry[Any], str]] = {
    "compressor": (COMPRESSORS, "sparsegpt"),
    "space": (SPACES, "sparsity"),
    "evaluator": (EVALUATORS, "kl"),
    "search": (OPTIMIZERS, "evopress"),
    "executor": (EXECUTORS, "local"),
}
"""The config sections that name a registered component: registry and default name."""


class UnitsConfig(StrictModel):
    """Which linear layers are searched. Patterns match a module name or a dotted
    suffix of it (``down_proj``); ``re:`` patterns are regexes over the full name."""

    targets: list[str] = Field(default_factory=list, description="empty: every block linear")
    ignore: list[str] = Field(
        default_factory=list, description="units to leave out, matched like targets"
    )

    @field_validator("targets", "ignore")
    @classmethod
    def _regexes_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    raise ValueError(f"{pattern!r} is not a regular expression ({err})") from None
            elif not pattern:
                raise ValueError("an empty pattern matches nothing")
        return patterns


class DatabaseConfig(StrictModel):
    path: str | None = Field(None, description="default: <cache>/databases/<compressor>-<key>")
    batch_size: int = Field(4, ge=1, description="calibration sequences per forward")
    cache_gb: float = Field(8.0, gt=0, description="variants kept in memory (LRU)")
    prefix_gb: float = Field(
        1.0,
        ge=0,
        description="hidden states of recent candidates kept in memory (LRU), so a candidate "
        "starts its forward at the first block it compresses differently; 0: off",
    )


class StoreConfig(StrictModel):
    storage: str = Field(
        "journal", description="journal | journal:PATH | sqlite | an SQLAlchemy URL"
    )
    study: str | None = Field(None, description="study name; default: the experiment name")
    grace_s: float = Field(
        60.0,
        gt=0,
        description="a worker silent this long has its claimed evaluations taken over",
    )


class FinalEvalConfig(StrictModel):
    """What ``search`` (at its end) and ``eval`` score: dense, the baseline and the
    searched genome (``front``: every Pareto-front candidate too) on held-out text
    of each corpus (perplexity and KL to the dense model), and on lm-eval tasks when
    ``downstream`` is set."""

    enabled: bool = Field(True, description="score held-out perplexity when a search ends")
    batch_size: int = Field(4, ge=1, description="sequences per forward pass")
    corpora: list[str] = Field(
        default_factory=list,
        description="held-out corpora besides data.corpus and its mixture's parts "
        "(e.g. [books, code])",
    )
    kl_topk: int | None = Field(
        None, ge=1, description="held-out KL over the dense top-k tokens only (large "
        "vocabularies or held-out sets); null: the full distribution",
    )
    front: bool = Field(False, description="also score every candidate of pareto.parquet")
    downstream: DownstreamParams | None = Field(
        None, description="lm-eval tasks: {tasks: [arc_easy, piqa], limit: 100, ...}; null: none"
    )

    @field_validator("corpora")
    @classmethod
    def _packaged_corpora(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in CORPORA or name == "text":
                allowed = [n for n in CORPORA.names() if n != "text"]
                raise ValueError(f"unknown corpus {name!r}; allowed: {choices(allowed)}")
        return names


class Config(StrictModel):
    """A whole experiment. Every section has defaults; see experiments/configs/."""

    name: str = Field(
        "evocomp", description="the experiment; names the run dir (runs/<name>) and study"
    )
    seed: int = Field(0, description="seed of the search (every optimizer is deterministic)")
    run_dir: str | None = Field(None, description="default: runs/<name>")
    model: ModelConfig = Field(default_factory=ModelConfig)
    units: UnitsConfig = Field(default_factory=UnitsConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    compressor: component(*COMPONENTS["compressor"])  # type: ignore[valid-type]
    space: component(*COMPONENTS["space"])  # type: ignore[valid-type]
    evaluator: component(*COMPONENTS["evaluator"])  # type: ignore[valid-type]
    search: component(*COMPONENTS["search"])  # type: ignore[valid-type]
    executor: component(*COMPONENTS["executor"])  # type: ignore[valid-type]
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    final_eval: FinalEvalConfig = Field(default_factory=FinalEvalConfig)

    @field_validator("name")
    @classmethod
    def _one_path_component(cls, name: str) -> str:
        # The name becomes a folder (runs/<name>) and a study name: refuse what
        # would point elsewhere or nowhere.
        if not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"{name!r} must be a non-empty name without slashes")
        return name

    def dump(self) -> dict[str, Any]:
        """The fully resolved config, every default written out."""
        out = self.model_dump(mode="json")
        for key in COMPONENTS:
            out[key] = getattr(self, key).dump()
        return out


def _format_error(err: Any, root: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        allowed = _fields_at(root, err["loc"][:-1])
        if allowed:
            close = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            msg = f"unknown field{hint}; allowed: {choices(allowed)}"
    elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
        msg = f"{msg} (got {err['input']!r})"
    return f"{loc}: {msg}" if loc else msg


def _fields_at(model: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    for part in path:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def format_validation_error(err: ValidationError, root: type[BaseModel] = Config) -> str:
    """Every problem of ``err`` on one line, each naming its field."""
    return "; ".join(_format_error(e, root) for e in err.errors())


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["search.generations=5", "data.corpus=books"]`` -> nested dict; values are
    parsed as YAML so numbers, booleans and lists work."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise EvocompError(f"--set expects key=value, got {pair!r}")
        parts = key.split(".")
        if not all(parts):
            raise EvocompError(
                f"--set {key}: a key is section names joined by single dots "
                "(e.g. search.generations)"
            )
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as err:
            raise EvocompError(
                f"--set {key}: {raw!r} is not valid YAML ({_one_line(err)})"
            ) from None
        node: Any = out
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list) and part.isdigit():  # a list set by an earlier --set
                i = _index(node, part, ".".join(parts[:depth]), key)
                if last:
                    node[i] = _merged(node[i], value, key)
                else:
                    node = node[i]
            elif not isinstance(node, dict):
                raise EvocompError(f"--set {key}: {parts[depth - 1]!r} is not a section")
            elif last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
    return out


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _merge(base: dict[str, Any], over: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Deep-merge ``over`` into ``base``; a section that names another component
    (``search.name=sleb``) replaces the old one, whose options would not fit. A
    number addresses an item of a list (``search.steps.1.generations=5``)."""
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merged(merged.get(k), v, f"{path}{k}")
    return merged


def _merged(old: Any, new: Any, path: str) -> Any:
    """``new`` merged into ``old`` (the value at ``path``)."""
    if isinstance(new, dict) and isinstance(old, dict):
        if new.get("name", old.get("name")) == old.get("name"):
            return _merge(old, new, f"{path}.")
    elif isinstance(new, dict) and isinstance(old, list) and new and all(map(str.isdigit, new)):
        items = list(old)
        for index, value in new.items():
            i = _index(items, index, path, f"{path}.{index}")
            items[i] = _merged(items[i], value, f"{path}.{index}")
        return items
    return new


def _index(items: list[Any], index: str, path: str, key: str) -> int:
    """``index`` as a position in ``items`` (the list at ``path``), or the one-line
    error of ``--set key``."""
    if int(index) < len(items):
        return int(index)
    have = f"{len(items)} items (indices 0..{len(items) - 1})" if items else "no items"
    raise EvocompError(f"--set {key}: {path} has {have}")


def resolve_yaml(spec: str | Path, builtin: Path, what: str) -> Path:
    """A YAML path, or the name of a YAML file in ``builtin`` (a built-in ``what``)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    named = builtin / f"{spec}.yaml"
    if named.is_file():
        return named
    names = sorted(p.stem for p in builtin.glob("*.yaml"))
    raise EvocompError(
        f"{what} {str(spec)!r} is not a file or a built-in {what} ({choices(names)})"
    )


def resolve_config_path(spec: str) -> Path:
    """A YAML path, or the name of a built-in config (``quickstart``)."""
    return resolve_yaml(spec, BUILTIN_CONFIGS, "config")


def load_config(spec: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a config file (or built-in name), apply ``--set`` overrides, validate."""
    data: dict[str, Any] = {}
    if spec is not None:
        path = resolve_config_path(str(spec))
        data = read_yaml(path, holds="config sections")
    data = _merge(data, parse_overrides(overrides or []))
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        where = f" in {spec}" if spec else ""
        raise EvocompError(f"invalid config{where}: {format_validation_error(err)}") from None


def read_yaml(path: Path, *, holds: str) -> dict[str, Any]:
    """The mapping a YAML file (a config or a sweep) holds; ``holds`` says what it
    should hold, for errors. An empty file is refused rather than read as "all
    defaults", which would silently run the built-in model and search."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EvocompError(f"{path} is not a UTF-8 text file (YAML: {holds})") from None
    except OSError as err:
        raise EvocompError(f"cannot read {path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise EvocompError(f"{path} is not valid YAML: {_one_line(err)}") from None
    if data is None:
        raise EvocompError(f"{path} is empty; it must hold {holds} (or name a built-in)")
    if not isinstance(data, dict):
        raise EvocompError(f"{path} must hold a mapping of {holds}")
    return data
