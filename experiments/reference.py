"""The configuration reference (``docs/configuration.md``), rendered from the
pydantic models so that it cannot drift from the code.

Regenerate it with ``python -m evocomp.reference > docs/configuration.md`` (or
``evocomp configs --reference > docs/configuration.md``); a test fails while the
committed file differs from :func:`config_reference`.
"""

from __future__ import annotations

import inspect
import re
import sys
import types
from collections.abc import Iterator
from typing import Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

REGENERATE = "python -m evocomp.reference > docs/configuration.md"

_INTRO = """\
A config is YAML validated by pydantic (`extra="forbid"`: misspelled fields are
errors that suggest the right name). All sections have defaults; see
[`experiments/configs/quickstart.yaml`](../experiments/configs/quickstart.yaml) and the
other built-in configs (`evocomp configs`). Every value can be overridden on the
command line with `--set section.key=value` (repeatable; values are parsed as YAML);
a number picks an item of a list (`--set search.steps.1.generations=10`).

The sections `compressor`, `space`, `evaluator`, `search` and `executor` each name a
registered component (`{name: <component>, <its options>...}`); their tables list
the options of every component. `--set` naming another component replaces that
section of the file instead of merging options into it.
"""


def config_reference() -> str:
    """``docs/configuration.md``: one table per config section (key, type, default,
    description) and, for the component sections, one per registered component."""
    from evocomp.config import COMPONENTS, ComponentSpec, Config

    out = [
        "<!-- Generated from the pydantic models by evocomp.reference: do not edit. "
        f"Regenerate with `{REGENERATE}` "
        "(or `evocomp configs --reference > docs/configuration.md`). -->",
        "",
        "# Configuration reference",
        "",
        "_Generated from the pydantic models of the code (`evocomp.reference`), so it lists "
        f"exactly what a config accepts. Regenerate it with `{REGENERATE}`._",
        "",
        _INTRO,
    ]
    top = {k: f for k, f in Config.model_fields.items() if _section_model(f) is None}
    top = {k: f for k, f in top.items() if f.annotation is not ComponentSpec}
    out += ["## Top level", "", *_table("", top), ""]
    for key, field in Config.model_fields.items():
        if field.annotation is ComponentSpec:
            registry, default = COMPONENTS[key]
            out += _component_section(key, registry, default)
        elif (model := _section_model(field)) is not None:
            out += _model_section(key, model, optional=_is_optional(field.annotation))
    return "\n".join(out).rstrip("\n") + "\n"


def _component_section(key: str, registry: Any, default: str) -> list[str]:
    names = registry.names()
    out = [
        f"## `{key}`",
        "",
        f"`{key}.name` names a registered {registry.kind}: "
        + ", ".join(f"`{n}`" for n in names)
        + f" (default `{default}`). The other keys of the section are that "
        f"{registry.kind}'s options:",
        "",
    ]
    for name in names:
        cls = registry.get(name)
        out += [f"### `{key}.name: {name}`", ""]
        summary = _summary(cls.__doc__)
        if summary:
            out += [summary, ""]
        fields = cls.Params.model_fields
        if fields:
            out += [*_table(key, fields), ""]
            for sub_key, sub in fields.items():
                out += _item_section(f"{key}.{sub_key}", sub)
        else:
            out += ["No options.", ""]
    return out


def _model_section(path: str, model: type[BaseModel], optional: bool = False) -> list[str]:
    out = [f"{'#' * min(2 + path.count('.'), 4)} `{path}`", ""]
    summary = _summary(model.__doc__)
    if summary and not summary.startswith("Options of "):
        out += [summary, ""]
    if optional:
        out += [f"`{path}` is `null` (off) by default; set, it takes these keys:", ""]
    out += [*_table(path, model.model_fields), ""]
    for key, field in model.model_fields.items():
        sub = _section_model(field)
        if sub is not None:
            out += _model_section(f"{path}.{key}", sub, optional=_is_optional(field.annotation))
        else:
            out += _item_section(f"{path}.{key}", field)
    return out


def _item_section(path: str, field: FieldInfo) -> list[str]:
    """The keys of each item of a list of models (EvoPress ``stages``)."""
    item = _list_item_model(field.annotation)
    if item is None:
        return []
    summary = _summary(item.__doc__)
    summary = summary[:1].lower() + summary[1:]
    out = [f"Each item of `{path}`" + (f" ({summary.rstrip('.')})" if summary else "") + ":", ""]
    return out + [*_table(f"{path}[]", item.model_fields), ""]


def _table(prefix: str, fields: dict[str, FieldInfo]) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, field in fields.items():
        full = f"{prefix}.{key}" if prefix else key
        rows.append(
            "| "
            + " | ".join(
                (
                    f"`{full}`",
                    _cell(_type_name(field.annotation)),
                    _default(field),
                    _description(full, field),
                )
            )
            + " |"
        )
    return rows


def _description(path: str, field: FieldInfo) -> str:
    parts = []
    if field.description:
        # Attribute docstrings are sentences; the cell joins clauses with "; ".
        parts.append(_markdown(" ".join(field.description.split()).rstrip(".")))
    allowed = _literal_values(field.annotation)
    if allowed is None and path == "data.corpus":
        from evocomp.evaluators.data import CORPORA

        allowed = CORPORA.names()
    if allowed:
        parts.append("one of " + ", ".join(f"`{_yaml(v)}`" for v in allowed))
    bounds = list(_bounds(field))
    if bounds:
        parts.append(", ".join(bounds))
    return _cell("; ".join(parts))


_NUMERIC_BOUNDS = ((Ge, "ge", "≥"), (Gt, "gt", ">"), (Le, "le", "≤"), (Lt, "lt", "<"))


def _bounds(field: FieldInfo) -> Iterator[str]:
    for meta in field.metadata:
        for kind, attr, sign in _NUMERIC_BOUNDS:
            if isinstance(meta, kind):
                yield f"{sign} {getattr(meta, attr)}"
        if isinstance(meta, MinLen):
            yield f"at least {meta.min_length} item{'s' * (meta.min_length != 1)}"
        elif isinstance(meta, MaxLen):
            yield f"at most {meta.max_length} items"


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    return _cell(f"`{_yaml(value)}`")


def _yaml(value: Any) -> str:
    """A value as inline YAML (deterministic, short)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


def _type_name(ann: Any) -> str:
    if ann is type(None):
        return "null"
    if ann is Any:
        return "any"
    origin = get_origin(ann)
    if origin is Literal:
        return "choice"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(ann))
    if origin in (list, tuple, set):
        args = get_args(ann)
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(ann, type):
        if issubclass(ann, BaseModel):
            return "section"
        return {"str": "str", "int": "int", "float": "float", "bool": "bool"}.get(
            ann.__name__, ann.__name__
        )
    return str(ann)


def _literal_values(ann: Any) -> list[Any] | None:
    if get_origin(ann) is Literal:
        return list(get_args(ann))
    if get_origin(ann) in (Union, types.UnionType):
        for arg in get_args(ann):
            values = _literal_values(arg)
            if values:
                return values
    return None


def _section_model(field: FieldInfo) -> type[BaseModel] | None:
    """The model of a nested section (``model``, ``final_eval.downstream``), if any."""
    for ann in (field.annotation, *get_args(field.annotation)):
        if isinstance(ann, type) and issubclass(ann, BaseModel) and get_origin(ann) is None:
            from evocomp.config import ComponentSpec

            if ann is not ComponentSpec:
                return ann
    return None


def _is_optional(ann: Any) -> bool:
    return get_origin(ann) in (Union, types.UnionType) and type(None) in get_args(ann)


def _list_item_model(ann: Any) -> type[BaseModel] | None:
    if get_origin(ann) in (list, tuple):
        args = get_args(ann)
        if args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            return args[0]
    return None


def _summary(doc: str | None) -> str:
    """The first paragraph of a docstring, as one line of Markdown."""
    if not doc:
        return ""
    first = inspect.cleandoc(doc).split("\n\n")[0]
    return _markdown(" ".join(line.strip() for line in first.splitlines()))


def _markdown(text: str) -> str:
    """reST inline markup to Markdown: ``code`` and :role:`target` become `code`;
    ``<`` and ``>`` outside code are escaped (``<name>`` is not an HTML tag)."""
    text = re.sub(r":[a-z]+:`~([^`]+)`", lambda m: f"`{m[1].rsplit('.', 1)[-1]}`", text)
    text = re.sub(r":[a-z]+:`([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    pieces = text.split("`")
    for i in range(0, len(pieces), 2):  # outside code spans
        pieces[i] = pieces[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(pieces)


def _cell(text: str) -> str:
    """Safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


if __name__ == "__main__":
    sys.stdout.write(config_reference())
