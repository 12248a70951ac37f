"""The configuration reference (docs/configuration.md) is generated from the
pydantic models: it lists every config field and every component option, the
committed file matches the code, and the docs' relative links resolve."""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from evocomp.cli import main
from evocomp.config import COMPONENTS, ComponentSpec, Config
from evocomp.reference import REGENERATE, config_reference

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def reference() -> str:
    return config_reference()


def _nested_model(annotation: object) -> type[BaseModel] | None:
    candidates = [annotation]
    if get_origin(annotation) in (Union, types.UnionType):
        candidates = list(get_args(annotation))
    for ann in candidates:
        if isinstance(ann, type) and issubclass(ann, BaseModel) and ann is not ComponentSpec:
            return ann
    return None


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for key, field in model.model_fields.items():
        if field.annotation is ComponentSpec:
            continue  # checked per component below
        path = f"{prefix}{key}"
        paths.append(path)
        nested = _nested_model(field.annotation)
        if nested is not None:
            paths += _field_paths(nested, f"{path}.")
    return paths


def _component_table(reference: str, section: str, name: str) -> str:
    heading = f"### `{section}.name: {name}`\n"
    assert heading in reference, f"no table for {section} {name!r}"
    return re.split(r"\n#{2,3} ", reference.split(heading, 1)[1], maxsplit=1)[0]


def test_every_config_field_is_in_the_reference(reference):
    paths = _field_paths(Config)
    assert {"name", "model.name", "data.corpus", "final_eval.downstream.tasks"} <= set(paths)
    headings = set(re.findall(r"^#+ `([^`]+)`$", reference, flags=re.M))
    missing = [p for p in paths if f"| `{p}` |" not in reference and p not in headings]
    assert not missing, f"fields missing from the reference: {missing}"


def test_every_component_option_is_in_its_table(reference):
    missing = []
    for section, (registry, default) in COMPONENTS.items():
        assert f"## `{section}`\n" in reference
        assert f"(default `{default}`)" in reference
        for name in registry.names():
            table = _component_table(reference, section, name)
            for key in registry.get(name).Params.model_fields:
                if f"| `{section}.{key}` |" not in table:
                    missing.append(f"{section} {name}: {key}")
    assert not missing, f"component options missing from the reference: {missing}"


def test_the_reference_is_deterministic(reference):
    assert config_reference() == reference
    first = reference.splitlines()[0]
    assert "Generated" in first and REGENERATE in first


def test_committed_configuration_md_matches_the_code(reference):
    committed = (DOCS / "configuration.md").read_text()
    assert committed == reference, (
        "docs/configuration.md is out of date with the config models; regenerate it with "
        f"`{REGENERATE}`"
    )


def test_cli_prints_the_reference(reference, capsys):
    assert main(["configs", "--reference"]) == 0
    assert capsys.readouterr().out == reference


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def test_docs_exist_and_the_readme_stays_short():
    assert (DOCS / "configuration.md").is_file() and (DOCS / "README.md").is_file()
    readme = (ROOT / "README.md").read_text().splitlines()
    assert readme[:6] == ["# evocomp", "", "```bash", readme[3], readme[4], "```"]
    assert readme[3].startswith("make demo") and readme[4].startswith("make test")
    assert len(readme) <= 200


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_files(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # links in code are not links
    broken = []
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # URLs and anchors within the page
        file, _, anchor = target.partition("#")
        linked = path.parent / file
        if not linked.exists() or (
            anchor and linked.suffix == ".md" and anchor not in _anchors(linked)
        ):
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files or headings: {broken}"


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
