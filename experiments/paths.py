"""Where evocomp keeps what it computes once and reuses: converted models,
variant databases, dense reference outputs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$EVOCOMP_CACHE``, else ``~/.cache/evocomp``."""
    root = os.environ.get("EVOCOMP_CACHE") or Path.home() / ".cache" / "evocomp"
    return Path(root).expanduser()
