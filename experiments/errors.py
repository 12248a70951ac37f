"""The one exception type users see: a clear message, exit code 2, no traceback."""

from __future__ import annotations


class EvocompError(Exception):
    """A problem with the user's input or environment that they can fix.

    The CLI prints ``str(error)`` and exits with code 2; anything else is a bug
    and keeps its traceback.
    """


def choices(values: object) -> str:
    """Format allowed values for an error message: ``'a', 'b', 'c'``."""
    return ", ".join(repr(v) for v in sorted(values))  # type: ignore[call-overload]
