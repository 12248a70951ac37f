"""Reading results: Pareto fronts over evaluations."""

from __future__ import annotations

import pandas as pd

from evocomp.search.base import pareto_front as _front


def pareto_front(df: pd.DataFrame, *, cost: str = "cost", quality: str = "fitness") -> pd.DataFrame:
    """The rows of ``df`` that no other row beats on both ``cost`` and ``quality``
    (both lower is better; rows tied on both are all kept), sorted by cost."""
    points = zip(range(len(df)), df[quality], df[cost], strict=True)
    rows = [i for i, _, _ in _front(points)]
    return df.iloc[rows].reset_index(drop=True)
