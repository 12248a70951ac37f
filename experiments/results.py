"""Result tables: Pareto fronts over evaluations, and Markdown renderings."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from evocomp.search.base import pareto_front as _front


def pareto_front(df: pd.DataFrame, *, cost: str = "cost", quality: str = "fitness") -> pd.DataFrame:
    """The rows of ``df`` that no other row beats on both ``cost`` and ``quality``
    (both lower is better; rows tied on both are all kept), sorted by cost."""
    points = zip(range(len(df)), df[quality], df[cost], strict=True)
    rows = [i for i, _, _ in _front(points)]
    return df.iloc[rows].reset_index(drop=True)


def markdown_table(df: pd.DataFrame) -> str:
    """``df`` as a Markdown table (floats to 5 significant digits, missing values blank);
    written here so that no table library is needed."""

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float | np.floating) and math.isnan(v)):
            return ""
        if isinstance(v, float | np.floating):
            return f"{v:.5g}"
        return str(v)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])
