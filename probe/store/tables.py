"""The run directory's tables as data: scores.parquet's columns and reader, score ids, and loading a run's
manifest, jobs and scores from files alone (what analysis, reports and gates read; no model, no metric code)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from probe.errors import UsageError
from probe.store.reading import read_json, read_table
from probe.store.score_parts import Stored, origins, part_path, read_stored, remove_folded, write_compacted, write_part

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


#: Fixed columns of scores.parquet; a set row's group adds one `var_<name>` column per group_by variable.
SCORE_COLUMNS = ["metric", "args", "series", "config_id", "score_id", "key", "value", "low", "high", "se", "df",
                 "label", "text", "probe", "model", "steps", "strength", "reference", "set_hash", "n", "n_reference",
                 "extra"]


def read_scores(run_dir: Path, *, repair: bool = False) -> pd.DataFrame:
    """Every score row of a run folder: scores.parquet and the parts written since (a run killed mid-scoring,
    or one being scored now), upgraded on read from older schemas (a label in `metric`; JSON `group`, `extra`).

    A file that is not readable parquet is an error naming it; with `repair` (the run driver, which can
    score again) it is moved aside as `<name>.corrupt-<time>` and its rows are taken as missing.
    """
    return _merged(read_stored(Path(run_dir), repair=repair))[0]


def compact_scores(run_dir: Path, *, repair: bool = False) -> pd.DataFrame:
    """Fold the parts into scores.parquet (one atomic write; the parts are removed after it) and return every
    row: the end of a scoring pass, so a finished run folder holds one table. Without parts it only reads.

    For when the pass's `ScoresTable` is done: a table that goes on writing would name rows by their old
    places in later drops (its own `compact` reads the new places back)."""
    return _compacted(Path(run_dir), repair)[0]


def _compacted(run_dir: Path, repair: bool) -> tuple[pd.DataFrame, np.ndarray, int]:
    stored = read_stored(run_dir, repair=repair)
    frame, origin = _merged(stored)
    if stored.parts:
        write_compacted(run_dir, scores_to_arrow(frame), stored.last)
        origin = origins(0, len(frame))
    else:
        remove_folded(run_dir, stored.last)  # parts a compaction killed before removing them: all folded in
    return frame, origin, stored.last


def _merged(stored: Stored) -> tuple[pd.DataFrame, np.ndarray]:
    """scores.parquet's rows then each part's, less the rows a part drops; with each row's origin (which a
    later part names to drop it). Concatenated as Arrow, so n rows in k parts convert to pandas once."""
    sources = ([stored.base] if stored.base is not None else []) + stored.parts
    if not sources:
        return pd.DataFrame(columns=SCORE_COLUMNS), np.empty(0, np.int64)
    if len(sources) == 1:
        return _frame_of(sources[0].table), origins(sources[0].seq, sources[0].table.num_rows)
    tables = [(_current(p.table) if p.seq == 0 else p.table).replace_schema_metadata(None) for p in sources]
    origin = np.concatenate([origins(p.seq, t.num_rows) for p, t in zip(sources, tables, strict=True)])
    dropped = np.concatenate([p.drops for p in sources])
    try:
        table = pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):  # a detail key's type differs
        table = scores_to_arrow(pd.concat([_frame_of(t) for t in tables if t.num_rows], ignore_index=True))
    if len(dropped):
        keep = ~np.isin(origin, dropped)
        table, origin = table.filter(pa.array(keep)), origin[keep]
    return _frame_of(table), origin


def _current(table: pa.Table) -> pa.Table:
    """A scores.parquet of an older schema as schema 3, so it concatenates with the parts written since."""
    extra = table.schema.field("extra").type if "extra" in table.column_names else pa.null()
    if "series" in table.column_names and "group" not in table.column_names and (
            pa.types.is_struct(extra) or pa.types.is_null(extra)):
        return table
    return scores_to_arrow(_frame_of(table))


def _frame_of(table: pa.Table) -> pd.DataFrame:
    """One table's rows as scores.parquet's frame, upgraded from older schemas."""
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
    """The `extra` column as an Arrow struct (the union of the keys metrics write, null where a row has none),
    from values as `detail_of` gives them (every frame's `extra` is normalised when it is built or read).

    A key that two metrics fill with different kinds of value (text and a number, say, from a plugin) cannot
    share one struct field; that key alone is stored as JSON text, and a warning says which.
    """
    rows = [v if isinstance(v, dict) and v else None for v in values]  # already detail_of's dicts: no 2nd pass
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
    """A run folder's scores as the driver writes them: each write is one new durable part
    (probe.store.score_parts), so nothing scored is lost, no reader sees half a file, and a write costs what
    it adds, not the size of the table; `compact` folds the parts into scores.parquet when the pass ends.

    `frame` (what the scorer checks for done work) is concatenated only when read after new rows came, so a
    chunk's bookkeeping stays flat as the table grows. With a `ScoreCache`, per-image rows are also kept
    across runs: `reuse` copies rows another run computed under the same configuration, and `add` records
    new ones, so the scoring pass never touches a file.
    """

    def __init__(self, run_dir: Path, cache: ScoreCache | None = None) -> None:
        self.run_dir = run_dir
        self.cache = cache
        stored = read_stored(Path(run_dir), repair=True)
        self._frame, self._origin = _merged(stored)
        self._next = stored.last + 1
        self._new: list[tuple[pd.DataFrame, np.ndarray]] = []  # written, not yet concatenated into _frame

    @property
    def frame(self) -> pd.DataFrame:
        """Every row written so far (read from the folder, then added), one frame indexed 0..n-1."""
        if self._new:
            frames = [f for f in (self._frame, *(f for f, _ in self._new)) if not f.empty]
            if frames:
                self._frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
            self._origin = np.concatenate([self._origin, *(o for _, o in self._new)])
            self._new = []
        return self._frame

    def forget(self, keys: set[str], probes: set[str]) -> None:
        """Drop the rows of these image keys and the set rows of the probes they belong to (their image was bad)."""
        frame = self.frame
        stale = frame["key"].isin(keys) | (frame["key"].isna() & frame["probe"].isin(probes))
        if stale.any():
            self._write([], stale)

    def reuse(self, config_id: str, wanted: list[str], outputs: frozenset[str] = frozenset()) -> set[str]:
        """Add the cached rows of these score ids under one configuration; returns the ids that were cached.

        A record is used only when it holds a row for every output the metric writes (`outputs`, e.g. ocr's
        four), so an image is never counted as scored on part of its rows.
        """
        if self.cache is None or not wanted:
            return set()
        cached = self.cache.rows(config_id)
        found = [sid for sid in wanted if sid in cached and outputs <= {r["metric"] for r in cached[sid]}]
        rows = [row for sid in found for row in cached[sid]]
        if rows:
            self._write(rows)
        return set(found)

    def add(self, rows: list[dict[str, Any]], replace: pd.Series | None = None) -> None:
        """Append rows; `replace` (a mask over `frame`) drops stale rows in the same atomic write."""
        if not rows:
            return
        self._write(rows, replace)
        if self.cache is not None:
            for cid in dict.fromkeys(r["config_id"] for r in rows if r.get("key") is not None):
                self.cache.add(cid, [r for r in rows if r["config_id"] == cid and r.get("key") is not None])

    def compact(self) -> pd.DataFrame:
        """Fold the parts into scores.parquet (see `compact_scores`) and return every row; writes may go on."""
        self._frame, self._origin, last = _compacted(Path(self.run_dir), False)
        self._new, self._next = [], max(self._next, last + 1)
        return self._frame

    def _write(self, rows: list[dict[str, Any]], replace: pd.Series | None = None) -> None:
        """One part: the new rows and the origins of the rows `replace` drops; memory follows the disk."""
        groups = sorted({k for r in rows for k in r if k.startswith("var_")})
        new = pd.DataFrame(rows, columns=[*SCORE_COLUMNS, *groups])
        new["extra"] = [detail_of(v) for v in new["extra"]]  # cached rows of older probes hold JSON text
        drops = np.empty(0, np.int64)
        keep: np.ndarray | None = None
        if replace is not None and replace.any():
            frame = self.frame
            keep = ~replace.reindex(frame.index, fill_value=False).to_numpy(dtype=bool)
            drops = self._origin[~keep]
        if not rows and not len(drops):
            return
        seq = self._next
        while part_path(Path(self.run_dir), seq).exists():  # another table wrote here since: never overwrite it
            seq += 1
        write_part(Path(self.run_dir), seq, scores_to_arrow(new), drops)
        self._next = seq + 1
        if keep is not None:
            self._frame, self._origin = self._frame[keep].reset_index(drop=True), self._origin[keep]
        if rows:
            self._new.append((new, origins(seq, len(new))))
