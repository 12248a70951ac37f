"""The package's layers import downward only, so each can be read, tested and
reused without the ones above it:

    foundation   evocomp.errors, evocomp.registry, evocomp.paths (import nothing of ours)
    spaces       pure Python: no torch, no model
    supernet     models, units, compressors, database, swapping      } siblings:
    evaluators   data, dense references, KL / ppl / lm-eval          } never each other
    search       optimizers (spaces + fitness values) and executors
    evocomp      the application: config, runner, CLI, analysis, sweeps
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOUNDATION = {"evocomp.errors", "evocomp.registry", "evocomp.paths"}
LAYERS = {"spaces": 1, "supernet": 2, "evaluators": 2, "search": 3}
"""Subpackage (folder) -> layer; the application (``experiments/``) is above them all."""


def _imports(path: Path) -> set[str]:
    """Every ``evocomp`` module ``path`` imports, at any depth (functions and
    ``TYPE_CHECKING`` blocks too: a lazy import is still a dependency)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("evocomp")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("evocomp"):
            found.add(node.module)
            # `from evocomp import analysis` imports a module, not a name
            if node.module == "evocomp":
                found |= {f"evocomp.{a.name}" for a in node.names}
    return found


def _layer(module: str) -> int | None:
    """The layer of an ``evocomp`` module (0: foundation, 4: application)."""
    if module in FOUNDATION:
        return 0
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS[parts[1]]
    return 4


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_layers_import_downward_only(package: str) -> None:
    layer = LAYERS[package]
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for module in sorted(_imports(path)):
            other = _layer(module)
            sibling = other == layer and module.split(".")[1] != package
            if other is None or other > layer or sibling:
                wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


@pytest.mark.parametrize("module", sorted(FOUNDATION))
def test_foundation_imports_nothing_of_ours(module: str) -> None:
    path = ROOT / "experiments" / f"{module.split('.')[1]}.py"
    assert _imports(path) <= FOUNDATION - {module}


@pytest.mark.parametrize(
    ("package", "above"),
    [
        ("spaces", ("evocomp.supernet", "evocomp.evaluators", "evocomp.search")),
        # Optimizers see spaces and fitness values only; executors import torch
        # lazily, in the Ray worker that sets its thread count.
        ("search", ("evocomp.supernet", "evocomp.evaluators", "evocomp.runner")),
    ],
)
def test_imports_without_torch(package: str, above: tuple[str, ...]) -> None:
    """The pure layer and the optimizers load no torch, nor any layer above them."""
    code = (
        f"import sys, evocomp.{package}; "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith("
        f"('torch.', *{above!r}))); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
