"""Name -> class registries so that configs can name spaces, compressors,
evaluators, optimizers and executors, and plug-ins can add their own; and the
strict base model every component's options derive from."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from evocomp.errors import EvocompError, choices


class StrictModel(BaseModel):
    """A config section or a component's options: unknown fields are refused, so a
    misspelled option is an error that names it instead of being ignored."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of components of one kind (e.g. ``"compressor"``). With a
    ``base``, each is a subclass of it whose ``Params`` is a :class:`StrictModel`
    (plain registries, such as the corpus loaders, hold any callable)."""

    def __init__(self, kind: str, base: type[Any] | None = None) -> None:
        self.kind = kind
        self.base = base
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@COMPRESSORS.register("wanda")``. Refuses a second component of
        the same name and, with a ``base``, a class that is not one or whose options
        are not a :class:`StrictModel`."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if self.base is not None:
                self._check(name, obj, self.base)
            self._items[name] = obj
            return obj

        return add

    def _check(self, name: str, obj: object, base: type[Any]) -> None:
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise TypeError(f"{self.kind} {name!r} must subclass {base.__name__}")
        params = getattr(obj, "Params", None)
        if not (isinstance(params, type) and issubclass(params, StrictModel)):
            raise TypeError(f"{self.kind} {name!r}: Params must subclass StrictModel")

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
