"""The run directory's tables as data: scores.parquet's columns and reader, score ids, and loading a run's
manifest, jobs and scores from files alone (what analysis, reports and gates read; no model, no metric code)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from probe.errors import UsageError
from probe.store.atomic import write_parquet_atomic
from probe.store.reading import read_json, read_table

if TYPE_CHECKING:
    from probe.store.score_cache import ScoreCache

log = logging.getLogger(__name__)

#: Version of the run folder's tables. 1: a metric's label in `metric` (before metric identity was data);
#: 2: `metric`, `args`, `series` and `config_id` as separate columns, set rows with jackknife CIs;
#: 3: typed, no JSON strings: a set row's group as `var_<name>` columns (as in jobs.parquet), its jackknife
#: standard error and degrees of freedom as `se` / `df`, and each metric's detail (`extra`) as a struct.
#: Readers upgrade older folders on read, so every run folder ever written still loads; a newer one is refused.
SCHEMA_VERSION = 3


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
#: Fixed columns of scores.parquet; a set row's group adds one `var_<name>` column per group_by variable.
SCORE_COLUMNS = ["metric", "args", "series", "config_id", "score_id", "key", "value", "low", "high", "se", "df",
                 "label", "text", "probe", "model", "steps", "strength", "reference", "set_hash", "n", "n_reference",
                 "extra"]


def read_scores(run_dir: Path, *, repair: bool = False) -> pd.DataFrame:
    """scores.parquet, upgraded on read from older schemas (a label in `metric`; JSON `group` and `extra`).

    A file that is not readable parquet is an error naming it; with `repair` (the run driver, which can
    score again) it is moved aside as `scores.parquet.corrupt-<time>` and an empty table returned instead.
    """
    path = run_dir / SCORES
    if not path.is_file():
        return pd.DataFrame(columns=SCORE_COLUMNS)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        if not repair:
            raise UsageError(f"{path} is not a readable table ({exc}); `probe run` on its suite scores it again") from None
        aside = path.with_name(f"{SCORES}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, aside)
        log.warning("%s was unreadable (%s): moved to %s; its scores are taken from the cache or computed again",
                    path, exc, aside.name)
        return pd.DataFrame(columns=SCORE_COLUMNS)
    frame = table.drop_columns([c for c in ("extra",) if c in table.column_names]).to_pandas()
    # extra through Arrow's own Python conversion: ints stay ints and lists stay lists (pandas would give
    # floats and numpy arrays)
    frame["extra"] = table.column("extra").to_pylist() if "extra" in table.column_names else None
    missing = frame["series"].isna() if "series" in frame.columns else pd.Series(True, index=frame.index)
    if missing.any():
        labels = frame["metric"].astype(str)
        frame["series"] = frame["series"].where(~missing, labels) if "series" in frame.columns else labels
        frame["metric"] = frame["metric"].where(~missing, labels.str.split("[", n=1).str[0])
        frame["args"] = frame["args"].astype(object).fillna("") if "args" in frame.columns else ""
    frame = expand_groups(frame)
    frame["extra"] = [detail_of(value) for value in frame["extra"]] if "extra" in frame else None
    for column, field in (("se", "ci_se"), ("df", "ci_df")):  # schema 2 kept them inside extra
        recorded = pd.Series([(e or {}).get(field) for e in frame["extra"]], index=frame.index, dtype="float64")
        frame[column] = frame[column].fillna(recorded) if column in frame else recorded
    return frame.reindex(columns=[*SCORE_COLUMNS, *group_columns(frame)])


def group_columns(frame: pd.DataFrame) -> list[str]:
    """The `var_<name>` columns of a table: the prompt variables a row is grouped by, sorted."""
    return sorted(c for c in frame.columns if str(c).startswith("var_"))


def group_of(row: Any) -> dict[str, Any]:
    """A row's group as {var_<name>: value} (only the variables it is grouped by; {} for an ungrouped row)."""
    items = row.items() if hasattr(row, "items") else row._asdict().items()
    return {str(k): v for k, v in items if str(k).startswith("var_") and not _missing(v)}


def group_label(group: dict[str, Any]) -> str:
    """A group for people: 'occupation=a nurse, place=indoors' ('' for none)."""
    return ", ".join(f"{k.removeprefix('var_')}={v}" for k, v in sorted(group.items()))


def expand_groups(frame: pd.DataFrame) -> pd.DataFrame:
    """Tables of schema ≤ 2 held a set row's group as a JSON string in `group`; it becomes `var_*` columns."""
    if "group" not in frame.columns:
        return frame
    groups = [json.loads(g) if isinstance(g, str) and g else {} for g in frame["group"]]
    frame = frame.drop(columns="group")
    for name in sorted({k for g in groups for k in g}):
        values = pd.Series([g.get(name) for g in groups], index=frame.index, dtype=object)
        frame[name] = frame[name].where(frame[name].notna(), values) if name in frame else values
    return frame


def detail_of(value: Any) -> dict[str, Any] | None:
    """A row's `extra` as a dict (None for none): schema 2 stored JSON text; a struct read back from parquet
    carries every key any metric wrote, so the keys this row did not write (null) are dropped again."""
    if isinstance(value, str):
        value = json.loads(value) if value else None
    if not isinstance(value, dict):
        return None
    kept = {k: _plain(v) for k, v in value.items() if not _missing(v)}
    return kept or None


def _plain(value: Any) -> Any:
    """Python values for what parquet hands back as numpy (lists of boxes come back as arrays of arrays)."""
    if isinstance(value, np.ndarray | list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value.item() if isinstance(value, np.generic) else value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def detail_array(values: Any) -> pa.Array:
    """The `extra` column as an Arrow struct (the union of the keys metrics write, null where a row has none).

    A key that two metrics fill with different kinds of value (text and a number, say, from a plugin) cannot
    share one struct field; that key alone is stored as JSON text, and a warning says which.
    """
    rows = [detail_of(v) for v in values]
    try:
        return pa.array(rows) if any(rows) else pa.nulls(len(rows))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    clashing = []
    for key in sorted({k for r in rows if r for k in r}):
        try:
            pa.array([r.get(key) if r else None for r in rows])
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            clashing.append(key)
    log.warning("score detail keys %s hold values of different types; stored as JSON text", clashing)
    return pa.array([{k: (json.dumps(v, default=str) if k in clashing else v) for k, v in r.items()} if r else None
                     for r in rows])


_TEXT = ["metric", "args", "series", "config_id", "score_id", "key", "label", "text", "probe", "model", "reference",
         "set_hash"]


def scores_to_arrow(frame: pd.DataFrame) -> pa.Table:
    """scores.parquet's table: typed fixed columns, the group columns as text, and `extra` as a struct."""
    groups = group_columns(frame)
    frame = frame.reindex(columns=[*SCORE_COLUMNS, *groups])
    schema = pa.schema([(c, pa.string() if c in _TEXT or c in groups else pa.float64())
                        for c in frame.columns if c != "extra"])
    table = pa.Table.from_pandas(frame.drop(columns="extra"), schema=schema, preserve_index=False)
    return table.append_column("extra", detail_array(frame["extra"]))


def read_derived(path: Path) -> pd.DataFrame | None:
    """A table derived from scores (aggregates.parquet, deltas.parquet), or None when it is missing or does
    not read (torn by a kill, a bad copy): the caller recomputes it from the scores, and a warning says so."""
    if not path.is_file():
        return None
    try:
        return pd.read_parquet(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        log.warning("%s does not read (%s); recomputed from the scores", path, str(exc).splitlines()[0][:120])
        return None


@dataclass(frozen=True)
class RunTables:
    """A run directory's manifest, jobs and scores, read from its files."""

    path: Path
    manifest: dict[str, Any]
    jobs: pd.DataFrame
    scores: pd.DataFrame


def load_run_tables(run_dir: Path, what: str = "") -> RunTables:
    """Read manifest.json, jobs.parquet and scores.parquet (upgraded); a UsageError naming the file and what is
    wrong when one is missing, not UTF-8 / JSON, or does not read as a table (torn by a kill, a bad copy).
    `what` names the role in messages ('run', '--baseline')."""
    run_dir = Path(run_dir)
    file = run_dir / "manifest.json"
    if not file.is_file():
        raise UsageError(f"{what + ' ' if what else ''}{run_dir} is not a run directory (no manifest.json)")
    manifest = read_json(file, what)
    if not isinstance(manifest, dict):
        raise UsageError(f"{what + ' ' if what else ''}{file}: not a run manifest (a JSON "
                         f"{type(manifest).__name__}, expected an object)")
    check_schema(manifest, run_dir)
    still_running = " (the run has not finished: status 'running')" if manifest.get("status") == "running" else ""
    jobs = read_table(run_dir / "jobs.parquet", what, pd.read_parquet, still_running)
    return RunTables(run_dir, manifest, jobs, read_scores(run_dir))


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
    rewritten atomically after each chunk, so nothing scored is lost and no reader sees half a file.

    With a `ScoreCache`, per-image rows are also kept across runs: `reuse` copies rows another run computed
    under the same configuration, and `add` records new ones, so the scoring pass never touches a file.
    """

    def __init__(self, run_dir: Path, cache: ScoreCache | None = None) -> None:
        self.run_dir = run_dir
        self.cache = cache
        self.frame = read_scores(run_dir, repair=True)

    def forget(self, keys: set[str], probes: set[str]) -> None:
        """Drop the rows of these image keys and the set rows of the probes they belong to (their image was bad)."""
        frame = self.frame
        stale = frame["key"].isin(keys) | (frame["key"].isna() & frame["probe"].isin(probes))
        if not stale.any():
            return
        self.frame = frame[~stale].reset_index(drop=True)
        write_parquet_atomic(scores_to_arrow(self.frame), self.run_dir / SCORES)

    def reuse(self, config_id: str, wanted: list[str], outputs: frozenset[str] = frozenset()) -> set[str]:
        """Add the cached rows of these score ids under one configuration; returns the ids that were cached.

        A record is used only when it holds a row for every output the metric writes (`outputs`, e.g. ocr's
        four), so an image is never counted as scored on part of its rows.
        """
        if self.cache is None or not wanted:
            return set()
        cached = self.cache.rows(config_id)
        found = [sid for sid in wanted if sid in cached and outputs <= {r["metric"] for r in cached[sid]}]
        self._write([row for sid in found for row in cached[sid]])
        return set(found)

    def add(self, rows: list[dict[str, Any]], replace: pd.Series | None = None) -> None:
        """Append rows; `replace` (a mask over the current frame) drops stale rows in the same atomic write."""
        self._write(rows, replace)
        if self.cache is not None:
            for cid in dict.fromkeys(r["config_id"] for r in rows if r.get("key") is not None):
                self.cache.add(cid, [r for r in rows if r["config_id"] == cid and r.get("key") is not None])

    def _write(self, rows: list[dict[str, Any]], replace: pd.Series | None = None) -> None:
        if not rows:
            return
        groups = sorted({k for r in rows for k in r if k.startswith("var_")})
        new = pd.DataFrame(rows, columns=[*SCORE_COLUMNS, *groups])
        new["extra"] = [detail_of(v) for v in new["extra"]]  # cached rows of older probes hold JSON text
        kept = self.frame if replace is None else self.frame[~replace]
        self.frame = new if kept.empty else pd.concat([kept, new], ignore_index=True)
        write_parquet_atomic(scores_to_arrow(self.frame), self.run_dir / SCORES)
