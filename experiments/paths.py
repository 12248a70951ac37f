"""Where evocomp keeps what it computes once and reuses: converted models,
variant databases, dense reference outputs."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """``$EVOCOMP_CACHE``, else ``~/.cache/evocomp``."""
    root = os.environ.get("EVOCOMP_CACHE") or Path.home() / ".cache" / "evocomp"
    return Path(root).expanduser()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing), across
    processes on this filesystem: builders of one cache entry take turns, so
    concurrent searches never write over each other's temporary files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
