"""Per-image scores shared by all runs: (metric config id, score id) -> score rows, computed once, ever.

A score id names the image and what it is scored against (prompt, target text): see tables.score_id.

Kept in SQLite (`<cache>/scores.sqlite`, write-ahead log) rather than appended text files: each image's rows
(ocr writes ocr_exact, ocr_cer, ... for one image) are one record written in one transaction, so a kill can
never leave an image half-scored, two processes can write at once, and no torn line exists to be misread.
A record that does not parse is dropped with a warning and its image scored again; a database file that
SQLite cannot open is moved aside (`scores.sqlite.corrupt-<time>`) and a fresh one started.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from probe.store.atomic import open_or_set_aside

log = logging.getLogger(__name__)

DATABASE = "scores.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    config_id TEXT NOT NULL,
    score_id TEXT NOT NULL,
    key TEXT NOT NULL,
    rows TEXT NOT NULL,
    PRIMARY KEY (config_id, score_id)
);
CREATE INDEX IF NOT EXISTS scores_by_key ON scores (key);
"""


class ScoreCache:
    """Score rows by metric configuration and score id."""

    def __init__(self, cache_root: Path) -> None:
        self.path = Path(cache_root) / DATABASE
        self._db: sqlite3.Connection | None = None
        self._loaded: dict[str, dict[str, list[dict[str, Any]]]] = {}

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = open_or_set_aside(self.path, _open, "score cache")
        return self._db

    def rows(self, config_id: str) -> dict[str, list[dict[str, Any]]]:
        """Cached rows of one configuration, by score id (records that do not parse are dropped)."""
        if config_id not in self._loaded:
            db = self._connect()
            found: dict[str, list[dict[str, Any]]] = {}
            bad = []
            for score_id, text in db.execute("SELECT score_id, rows FROM scores WHERE config_id = ?", (config_id,)):
                parsed = _parse(text, score_id)
                if parsed is None:
                    bad.append(score_id)
                else:
                    found[score_id] = parsed
            if bad:
                log.warning("score cache: %d unreadable record(s) of configuration %s dropped; scored again",
                            len(bad), config_id)
                with db:
                    db.executemany("DELETE FROM scores WHERE config_id = ? AND score_id = ?",
                                   [(config_id, sid) for sid in bad])
            self._loaded[config_id] = found
        return self._loaded[config_id]

    def add(self, config_id: str, rows: list[dict[str, Any]]) -> None:
        """Record rows (each with a `score_id` and `key`): one record per score id, in one transaction."""
        by_id: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_id.setdefault(row["score_id"], []).append(row)
        if not by_id:
            return
        db = self._connect()
        with db:
            db.executemany("INSERT OR REPLACE INTO scores (config_id, score_id, key, rows) VALUES (?, ?, ?, ?)",
                           [(config_id, sid, str(group[0]["key"]), json.dumps(group, default=str))
                            for sid, group in by_id.items()])
        if config_id in self._loaded:
            self._loaded[config_id].update(by_id)

    def forget_keys(self, keys: Iterable[str]) -> int:
        """Drop every configuration's rows for these image keys (their image was bad); returns how many."""
        keys = list(keys)
        if not keys:
            return 0
        db = self._connect()
        with db:
            removed = sum(db.execute("DELETE FROM scores WHERE key = ?", (key,)).rowcount for key in keys)
        self._loaded.clear()
        return removed

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _open(path: Path) -> sqlite3.Connection:
    # The connection is made on one thread and may be used on another (a run scores in a background thread
    # while it generates, then finishes on the main thread); the uses never overlap, so no lock is needed.
    db = sqlite3.connect(path, timeout=60, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(_SCHEMA)
    db.execute("SELECT count(*) FROM scores").fetchone()  # a damaged file fails here, not mid-run
    return db


def _parse(text: str, score_id: str) -> list[dict[str, Any]] | None:
    """A record's rows, or None when it is not a non-empty list of rows for this score id."""
    try:
        rows = json.loads(text)
    except (TypeError, ValueError):
        return None
    if not isinstance(rows, list) or not rows:
        return None
    if not all(isinstance(r, dict) and r.get("score_id") == score_id and "metric" in r for r in rows):
        return None
    return rows
