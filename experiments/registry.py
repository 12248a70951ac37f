"""Name -> class registries so that configs can name spaces, compressors,
evaluators and optimizers, and plug-ins can add their own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from evocomp.errors import EvocompError, choices

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of components of one kind (e.g. ``"compressor"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@COMPRESSORS.register("wanda")``."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """Look a component up; an unknown name lists the allowed ones."""
        try:
            return self._items[name]
        except KeyError:
            raise EvocompError(
                f"unknown {self.kind} {name!r}; allowed: {choices(self._items)}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
