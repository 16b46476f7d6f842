"""The run directory's tables as data: scores.parquet's columns and reader, score ids, and loading a run's
manifest, jobs and scores from files alone (what analysis, reports and gates read; no model, no metric code)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from probe.errors import UsageError
from probe.store.atomic import write_parquet_atomic

#: Version of the run folder's tables. 1: a metric's label in `metric` (before metric identity was data);
#: 2: `metric`, `args`, `series` and `config_id` as separate columns, set rows with jackknife CIs. Readers
#: upgrade older folders on read, so every run folder ever written still loads; a newer one is refused.
SCHEMA_VERSION = 2


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


SCORES = "scores.parquet"
SCORE_COLUMNS = ["metric", "args", "series", "config_id", "score_id", "key", "value", "low", "high", "label", "text",
                 "probe", "model", "steps", "strength", "group", "reference", "set_hash", "n", "n_reference", "extra"]


def read_scores(run_dir: Path) -> pd.DataFrame:
    """scores.parquet; tables of older runs (a label in `metric`, no `series`) are upgraded on read."""
    path = run_dir / SCORES
    if not path.is_file():
        return pd.DataFrame(columns=SCORE_COLUMNS)
    frame = pd.read_parquet(path)
    missing = frame["series"].isna() if "series" in frame.columns else pd.Series(True, index=frame.index)
    if missing.any():
        labels = frame["metric"].astype(str)
        frame["series"] = frame["series"].where(~missing, labels) if "series" in frame.columns else labels
        frame["metric"] = frame["metric"].where(~missing, labels.str.split("[", n=1).str[0])
        frame["args"] = frame["args"].astype(object).fillna("") if "args" in frame.columns else ""
    return frame


@dataclass(frozen=True)
class RunTables:
    """A run directory's manifest, jobs and scores, read from its files."""

    path: Path
    manifest: dict[str, Any]
    jobs: pd.DataFrame
    scores: pd.DataFrame


def load_run_tables(run_dir: Path) -> RunTables:
    """Read manifest.json, jobs.parquet and scores.parquet (upgraded); FileNotFoundError when it is no run."""
    run_dir = Path(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    check_schema(manifest, run_dir)
    return RunTables(run_dir, manifest, pd.read_parquet(run_dir / "jobs.parquet"), read_scores(run_dir))


def check_schema(manifest: dict[str, Any], run_dir: Path) -> None:
    """Refuse a run folder written by a newer probe (its tables may mean something this version cannot read)."""
    version = int(manifest.get("schema_version") or 1)
    if version > SCHEMA_VERSION:
        raise UsageError(f"{run_dir} was written with run-folder schema {version}; this probe reads up to "
                         f"{SCHEMA_VERSION}: upgrade probe to read it")


def run_models(manifest: dict[str, Any], jobs: pd.DataFrame) -> list[str]:
    """Model labels in suite order (the subject first), then any others seen in the jobs.

    The one definition of a run's models and its subject (`run_models(...)[0]`), shared by the Python API
    and the report (the driver's subject, the suite's first model, is the same label).
    """
    labels = list(manifest.get("presets") or {})
    suite_models = (manifest.get("suite") or {}).get("models") or []
    labels += [m.get("name") or m.get("preset") for m in suite_models if isinstance(m, dict)]
    labels += list(jobs["model"]) if "model" in jobs else []
    return list(dict.fromkeys(str(label) for label in labels if label))


class ScoresTable:
    """A run folder's scores.parquet as the driver writes it: new rows are added and the whole table is
    rewritten atomically after each chunk, so nothing scored is lost and no reader sees half a file."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.frame = read_scores(run_dir)

    def add(self, rows: list[dict[str, Any]], replace: pd.Series | None = None) -> None:
        """Append rows; `replace` (a mask over the current frame) drops stale rows in the same atomic write."""
        if not rows:
            return
        new = pd.DataFrame(rows, columns=SCORE_COLUMNS)
        kept = self.frame if replace is None else self.frame[~replace]
        self.frame = new if kept.empty else pd.concat([kept, new], ignore_index=True)
        write_parquet_atomic(self.frame, self.run_dir / SCORES)
