"""One way to split a table into groups: the analysis tables, bias tables and gates all iterate with it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pandas as pd


def groups(frame: pd.DataFrame, by: Sequence[str]) -> Iterator[tuple[dict[str, Any], pd.DataFrame]]:
    """(coordinates, rows) for each group of `by`, sorted.

    Missing values form their own group and come back as None (NaN != NaN would make them unfindable),
    step counts as ints; `by=[]` pools every row into one group (none for an empty frame).
    """
    if not by:
        if len(frame):
            yield {}, frame
        return
    for values, rows in frame.groupby(list(by), dropna=False, sort=True):
        values = values if isinstance(values, tuple) else (values,)
        coords = {k: (None if _missing(v) else v) for k, v in zip(by, values, strict=True)}
        steps = coords.get("steps")
        if steps is not None:
            coords["steps"] = int(steps)
        yield coords, rows


def _missing(value: Any) -> bool:
    return value is None or (not isinstance(value, str) and bool(pd.isna(value)))
