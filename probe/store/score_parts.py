"""scores.parquet's write-ahead parts: the files behind `ScoresTable`, kept apart from what the rows mean.

Rewriting the whole scores.parquet after every chunk costs O(n) per chunk and O(n²) for a run, so the run
driver appends instead: each write is one new part, `scores.parts/<seq>.parquet` (atomic and fsynced, so a
kill leaves whole parts only), and when the scoring pass ends the parts are folded into scores.parquet in
one atomic write and removed. A part may also drop rows written before it (a set row replaced, the rows of
a bad image forgotten): it names them by position, `(seq, row)` with seq 0 for scores.parquet itself, in
its metadata, so the drop lands in the same atomic write as the rows that replace them.

scores.parquet records the last part folded into it (`probe.parts_through`): a kill between writing it and
removing the parts leaves parts a reader skips, so no row is ever counted twice. Nothing here knows the
columns; probe.store.tables turns what is read into rows.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from probe.errors import UsageError
from probe.store.atomic import aside_path, write_parquet_atomic

log = logging.getLogger(__name__)

SCORES = "scores.parquet"
PARTS = "scores.parts"
_THROUGH = b"probe.parts_through"
_DROPS = b"probe.drops"
_SHIFT = 32  # an origin packs (seq, row) in one int64: seq << 32 | row


def origins(seq: int, rows: int) -> np.ndarray:
    """The origins of a part's (or, seq 0, scores.parquet's) rows: what a later part names to drop them."""
    return (np.int64(seq) << _SHIFT) + np.arange(rows, dtype=np.int64)


@dataclass(frozen=True)
class Part:
    """One readable file: its sequence number (0 for scores.parquet), its rows, the origins it drops."""

    seq: int
    table: pa.Table
    drops: np.ndarray


@dataclass(frozen=True)
class Stored:
    """What a run folder holds: scores.parquet (if any) then the parts not yet folded into it, in order."""

    base: Part | None
    parts: list[Part]
    last: int
    """The highest sequence number in use (folded or not): the next part is `last + 1`."""


def part_path(run_dir: Path, seq: int) -> Path:
    return run_dir / PARTS / f"{seq:08d}.parquet"


def _listed(run_dir: Path) -> list[tuple[int, Path]]:
    folder = run_dir / PARTS
    if not folder.is_dir():
        return []
    found = [(int(p.stem), p) for p in folder.iterdir() if p.suffix == ".parquet" and p.stem.isdigit()]
    return sorted(found)


def read_stored(run_dir: Path, *, repair: bool = False) -> Stored:
    """scores.parquet and its unfolded parts, each whole; an unreadable file is refused or (`repair`) set aside.

    Parts are listed before scores.parquet is read: a compaction in between leaves a scores.parquet that
    covers them (skipped), and one after it removes a listed part, which restarts the read.
    """
    for _ in range(5):
        listed = _listed(run_dir)
        try:
            return _read_listed(run_dir, listed, repair)
        except FileNotFoundError:
            continue  # folded and removed by a compaction while this read ran: read the new state
    raise UsageError(f"{run_dir / PARTS} kept changing while it was read; is another probe writing this run?")


def _read_listed(run_dir: Path, listed: list[tuple[int, Path]], repair: bool) -> Stored:
    base_table = _read(run_dir / SCORES, repair) if (run_dir / SCORES).is_file() else None
    base = None if base_table is None else Part(0, base_table, np.empty(0, np.int64))
    through = 0 if base_table is None else _through(base_table)
    parts = []
    for seq, path in listed:
        if seq <= through:
            continue  # folded into scores.parquet by a compaction killed before it removed the part
        table = _read(path, repair)
        drops = None if table is None else _drops(table)
        if table is not None and drops is None:
            _unreadable(path, "its list of dropped rows does not parse", repair)
        elif table is not None and drops is not None:
            parts.append(Part(seq, table, drops))
    return Stored(base, parts, max([through, *(seq for seq, _ in listed)]))


def _read(path: Path, repair: bool) -> pa.Table | None:
    """A whole table, or (`repair`) None once an unreadable file is moved aside as `<name>.corrupt-<time>`."""
    try:
        with pq.ParquetFile(path) as handle:
            return handle.read()
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        _unreadable(path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__, repair)
        return None


def _unreadable(path: Path, problem: str, repair: bool) -> None:
    """Refuse a torn or damaged file in one line, or (the run driver, which can score again) move it aside."""
    if not repair:
        raise UsageError(f"{path} is not a readable table ({problem}); `probe run` on its suite scores it again")
    aside = aside_path(path)
    os.replace(path, aside)
    log.warning("%s was unreadable (%s): moved to %s; its scores are taken from the cache or computed again",
                path, problem, aside.name)


def _through(table: pa.Table) -> int:
    value = (table.schema.metadata or {}).get(_THROUGH, b"0")
    return int(value) if value.isdigit() else 0


def _drops(table: pa.Table) -> np.ndarray | None:
    """The origins a part drops (none for most parts), or None when its list does not parse."""
    text = (table.schema.metadata or {}).get(_DROPS)
    if not text:
        return np.empty(0, np.int64)
    try:
        return np.array([(int(seq) << _SHIFT) + int(row) for seq, row in json.loads(text)], dtype=np.int64)
    except (TypeError, ValueError):
        return None


def _with(table: pa.Table, key: bytes, value: str) -> pa.Table:
    return table.replace_schema_metadata({**(table.schema.metadata or {}), key: value.encode()})


def write_part(run_dir: Path, seq: int, table: pa.Table, drops: np.ndarray) -> None:
    """One durable part: `table`'s rows, and the origins of earlier rows it drops, in one atomic write."""
    if len(drops):
        pairs = [[int(o) >> _SHIFT, int(o) & ((1 << _SHIFT) - 1)] for o in drops]
        table = _with(table, _DROPS, json.dumps(pairs, separators=(",", ":")))
    write_parquet_atomic(table, part_path(run_dir, seq))


def write_compacted(run_dir: Path, table: pa.Table, through: int) -> None:
    """scores.parquet holding every row up to part `through`, then the parts it folds in are removed.

    The order is what makes a kill harmless: scores.parquet first (atomic, naming `through`), so parts left
    behind are skipped by readers; then the parts (`remove_folded`).
    """
    write_parquet_atomic(_with(table, _THROUGH, str(through)), run_dir / SCORES)
    remove_folded(run_dir, through)


def remove_folded(run_dir: Path, through: int) -> None:
    """Remove the parts scores.parquet holds (up to `through`) and stray temporary files of cut-short writes."""
    folder = run_dir / PARTS
    if not folder.is_dir():
        return
    for seq, path in _listed(run_dir):
        if seq <= through:
            path.unlink(missing_ok=True)
    for stray in folder.glob(".*.tmp"):
        stray.unlink(missing_ok=True)
    try:
        folder.rmdir()  # kept when it holds a part set aside as corrupt, for a person to look at
    except OSError:
        pass
