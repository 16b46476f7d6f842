"""One definition of pairing: which images of two models (or two runs) answer the same request.

Aggregates' paired deltas, bias share deltas, `probe.compare`, baselines and `probe check` all pair through
`ITEM`, so they can never disagree about what a pair is. A pair must share the probe, the prompt, the target
text (a text probe may ask for OPEN and CLOSED on one prompt), the template variables, the seed, and for
img2img the strength and init image. Missing values match missing values (txt2img rows have no strength).
An image without a seed (scored with `probe score` from a table with no seed column) is its own item and is
never paired: nothing says which other image it corresponds to.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

ITEM = ["probe", "prompt", "text", "variables", "seed", "strength", "init_image"]
"""The coordinates that make two images of different models or runs one pair."""


def item_columns(frame: pd.DataFrame) -> list[str]:
    """`ITEM` columns present in `frame` (tables of older runs may lack `text` or `variables`)."""
    return [c for c in ITEM if c in frame.columns]


def pairable(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows that can be paired: those with a seed (see the module docstring)."""
    return frame[frame["seed"].notna()] if "seed" in frame.columns else frame


def pair(left: pd.DataFrame, right: pd.DataFrame, extra: Sequence[str] = (), suffixes: tuple[str, str] = ("", "_b"),
         ) -> pd.DataFrame:
    """Inner join of two per-image frames on the item coordinates plus `extra` (e.g. series, model, steps)."""
    on = [c for c in item_columns(left) if c in right.columns] + list(extra)
    normalised = [_normalise(pairable(f), on) for f in (left, right)]
    return normalised[0].merge(normalised[1], on=on, suffixes=suffixes, how="inner")


def _normalise(frame: pd.DataFrame, on: Sequence[str]) -> pd.DataFrame:
    """Missing keys as one value (None and NaN alike) and numeric keys as floats, so they compare equal."""
    frame = frame.copy()
    for column in on:
        if column in ("seed", "steps", "strength"):
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
        else:
            frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame
