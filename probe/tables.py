"""Small helpers for the run directory's parquet tables."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd


def write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write `frame` to `path` through a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def score_id(key: str, prompt: str, text: str | None) -> str:
    """Identity of a per-image score: the image plus what it is scored against (prompt, target text).

    The image key covers the pixels only; two probes can ask for the same image with another target text
    (or `probe score` can list one file under two prompts), and their scores must not be shared.
    """
    joined = "\0".join((key, prompt, "" if text is None else text))
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:32]


def score_ids(frame: pd.DataFrame) -> pd.Series:
    """`score_id` for every row of a jobs frame."""
    texts = frame["text"] if "text" in frame.columns else pd.Series(None, index=frame.index)
    return pd.Series([score_id(k, p, None if pd.isna(t) else t) for k, p, t in zip(frame["key"], frame["prompt"], texts,
                                                                                  strict=True)], index=frame.index)
