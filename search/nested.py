"""Searches that run other searches (coarse-to-fine, chain): the option that names
an inner search, the checks that it can be nested, and the loop that runs it on a
window of the space."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import replace
from typing import Any

from pydantic import ConfigDict, ValidationError, model_validator

from evocomp.errors import EvocompError, choices
from evocomp.registry import StrictModel
from evocomp.search.base import OPTIMIZERS, Optimizer, Request
from evocomp.spaces.base import Genome
from evocomp.spaces.window import Window


class InnerSearch(StrictModel):
    """A nested search: ``{name: <optimizer>, <its options>...}``."""

    model_config = ConfigDict(extra="allow")
    name: str = "evopress"

    @model_validator(mode="after")
    def _known(self) -> InnerSearch:
        self.params()  # unknown names and bad options fail when the config is read
        return self

    def params(self) -> StrictModel:
        """The inner optimizer's validated options."""
        allowed = [n for n in OPTIMIZERS.names() if not OPTIMIZERS.get(n).composite]
        if self.name not in allowed:
            raise ValueError(f"unknown inner optimizer {self.name!r}; allowed: {choices(allowed)}")
        cls = OPTIMIZERS.get(self.name)
        try:
            return cls.Params(**(self.model_extra or {}))
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                for e in err.errors()
            )
            raise ValueError(f"bad options for inner optimizer {self.name!r}: {problems}") from None

    def build(self, window: Window, *, seed: int) -> Optimizer[Any]:
        """The inner optimizer, searching ``window``."""
        return OPTIMIZERS.get(self.name)(window, self.params(), seed=seed)


def check_nestable(inner: Optimizer[Any], option: str, outer: str) -> None:
    """Refuse an inner optimizer that trades cost against quality (its genomes would
    leave the budget the outer search keeps) or that measures the dense model first
    (nested searches get no measurement)."""
    if not inner.budgeted:
        raise EvocompError(
            f"{option}={inner.name!r} trades cost against quality; "
            f"{outer} nests only optimizers that keep the budget"
        )
    if inner.measurement() is not None:
        raise EvocompError(
            f"{option}={inner.name!r} measures the model first (start_from); "
            f"{outer} cannot nest it"
        )


def run_inner(inner: Optimizer[Any]) -> Generator[list[Request], list[float], Genome | None]:
    """Run ``inner`` (built by :meth:`InnerSearch.build`) to its end, its requests
    lifted to genomes of its window's space (what the trial store, the database and
    the model see); returns its best genome, lifted (``None`` if it found none)."""
    window = inner.space
    assert isinstance(window, Window), "inner searches run on a Window (InnerSearch.build)"
    inner.prepare(None)
    while requests := inner.ask():
        scores = yield [replace(r, genome=window.lift(r.genome)) for r in requests]
        inner.tell(scores)
    return None if inner.best_genome is None else window.lift(inner.best_genome)
