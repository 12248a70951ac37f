"""evocomp: search-based compression optimizer for large language models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from evocomp.analysis import Run, Runs, load_run, load_runs

# The analysis API needs torch, pandas and the registries; importing it on first
# use keeps `import evocomp` (and so every `evocomp` command's start) fast.
_LAZY = {"load_run", "load_runs", "Run", "Runs"}

__all__ = ["Run", "Runs", "__version__", "load_run", "load_runs"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from evocomp import analysis

        return getattr(analysis, name)
    raise AttributeError(f"module 'evocomp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
