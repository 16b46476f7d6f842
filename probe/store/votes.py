"""Human preference studies and their votes: one SQLite file per run folder (`ratings.sqlite`).

SQLite because people's answers are data nobody can regenerate: every vote is one row, committed (WAL journal,
`synchronous=FULL`) before the server acknowledges it, so a killed server or a power cut loses no acknowledged
vote, and many request threads can write at once (each write is its own `BEGIN IMMEDIATE` transaction; waiting
writers queue on `busy_timeout`). A rater answers each (pair, question) once: the UNIQUE key makes a repeated
POST (a double click, a retry after a lost response) return the stored vote instead of adding a second one.

Tables: `studies` (what is compared, the seed that orders tasks and sides), `pairs` (two image keys and their
paths inside the run folder; `kind` = pair | attention), `raters` (a secret token per rater; votes name the rater,
never the token), `shown` (when a task was first shown and which image was on the left), `votes`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from probe.errors import ProbeError, UsageError

FILE = "ratings.sqlite"
SCHEMA_VERSION = 1
CHOICES = ("left", "right")
VOTE_COLUMNS = ["study", "pair", "kind", "rater", "question", "choice", "chosen", "left", "a_key", "b_key", "prompt",
                "shown_at", "answered_at", "source"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    id TEXT PRIMARY KEY, created_at TEXT NOT NULL, subject TEXT NOT NULL, baseline TEXT NOT NULL,
    questions TEXT NOT NULL, seed INTEGER NOT NULL, open INTEGER NOT NULL, secret TEXT NOT NULL,
    definition TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (
    study TEXT NOT NULL REFERENCES studies (id), pair INTEGER NOT NULL, kind TEXT NOT NULL, prompt TEXT NOT NULL,
    a_key TEXT NOT NULL, b_key TEXT NOT NULL, a_path TEXT NOT NULL, b_path TEXT NOT NULL, item TEXT NOT NULL,
    PRIMARY KEY (study, pair));
CREATE TABLE IF NOT EXISTS raters (
    token TEXT PRIMARY KEY, study TEXT NOT NULL REFERENCES studies (id), rater TEXT NOT NULL,
    created_at TEXT NOT NULL, UNIQUE (study, rater));
CREATE TABLE IF NOT EXISTS shown (
    study TEXT NOT NULL, rater TEXT NOT NULL, pair INTEGER NOT NULL, question TEXT NOT NULL,
    left_key TEXT NOT NULL, shown_at TEXT NOT NULL, PRIMARY KEY (study, rater, pair, question));
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY, study TEXT NOT NULL, pair INTEGER NOT NULL, rater TEXT NOT NULL,
    question TEXT NOT NULL, choice TEXT NOT NULL CHECK (choice IN ('left', 'right')), chosen_key TEXT NOT NULL,
    left_key TEXT NOT NULL, shown_at TEXT, answered_at TEXT NOT NULL, source TEXT NOT NULL,
    UNIQUE (study, pair, rater, question), FOREIGN KEY (study, pair) REFERENCES pairs (study, pair));
"""


def now() -> str:
    """UTC time with milliseconds, ISO 8601 (sorts as text)."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


@dataclass(frozen=True)
class Study:
    id: str
    subject: str
    baseline: str
    questions: tuple[str, ...]
    seed: int
    open: bool
    secret: str
    definition: dict[str, Any]


@dataclass(frozen=True)
class Pair:
    pair: int
    kind: str
    prompt: str
    a_key: str
    b_key: str
    a_path: str
    b_path: str


class VoteStore:
    """The run folder's ratings database. Cheap to construct: each call opens its own connection, so request
    threads never share one."""

    def __init__(self, run_dir: Path, *, create: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / FILE
        if not create and not self.path.is_file():
            raise UsageError(f"{self.run_dir} has no rating studies ({FILE} is missing); start one with "
                             f"`probe rate {self.run_dir} --compare SUBJECT BASELINE`")
        if create:
            with self.connect() as db:
                db.executescript(SCHEMA)
                db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        self._check_version()

    def _check_version(self) -> None:
        with self.connect() as db:
            row = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        if row is None or int(row[0]) > SCHEMA_VERSION:
            raise ProbeError(f"{self.path}: ratings schema {row[0] if row else '?'} is newer than this probe "
                             f"understands ({SCHEMA_VERSION}); upgrade probe")

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in autocommit mode (transactions are explicit), WAL, full sync, waiting on locks."""
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        with closing(db):
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            yield db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: the write lock is taken up front, so a transaction never fails halfway
        on a lock, and nothing of it is kept unless all of it is."""
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # studies --------------------------------------------------------------------------------------------------
    def add_study(self, study: Study, pairs: list[Pair], items: list[dict[str, Any]]) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO studies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (study.id, now(), study.subject, study.baseline, json.dumps(list(study.questions)),
                        study.seed, int(study.open), study.secret, json.dumps(study.definition, sort_keys=True)))
            db.executemany("INSERT INTO pairs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [(study.id, p.pair, p.kind, p.prompt, p.a_key, p.b_key, p.a_path, p.b_path,
                             json.dumps(item, sort_keys=True, default=str)) for p, item in zip(pairs, items, strict=True)])

    def studies(self) -> list[Study]:
        with self.connect() as db:
            rows = db.execute("SELECT id, subject, baseline, questions, seed, open, secret, definition FROM studies "
                              "ORDER BY created_at, id").fetchall()
        return [Study(r[0], r[1], r[2], tuple(json.loads(r[3])), int(r[4]), bool(r[5]), r[6], json.loads(r[7]))
                for r in rows]

    def study(self, study_id: str) -> Study:
        for study in self.studies():
            if study.id == study_id:
                return study
        from probe.errors import suggest

        raise UsageError(f"{self.path}: no study {study_id!r}" + suggest(study_id, [s.id for s in self.studies()]))

    def pairs(self, study_id: str) -> list[Pair]:
        with self.connect() as db:
            rows = db.execute("SELECT pair, kind, prompt, a_key, b_key, a_path, b_path FROM pairs WHERE study = ? "
                              "ORDER BY pair", (study_id,)).fetchall()
        return [Pair(int(r[0]), r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]

    # raters -----------------------------------------------------------------------------------------------------
    def add_rater(self, study_id: str, rater: str, token: str) -> str:
        """The rater's token: `token` for a new rater, the stored one for a rater already in the study."""
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO raters VALUES (?, ?, ?, ?)", (token, study_id, rater, now()))
            row = db.execute("SELECT token FROM raters WHERE study = ? AND rater = ?", (study_id, rater)).fetchone()
        return str(row[0])

    def raters(self, study_id: str) -> list[tuple[str, str]]:
        """(rater, token) in the order they were added."""
        with self.connect() as db:
            return [(r[0], r[1]) for r in db.execute(
                "SELECT rater, token FROM raters WHERE study = ? ORDER BY created_at, rowid", (study_id,))]

    def rater_of(self, token: str) -> tuple[str, str] | None:
        """(study, rater) of a token, or None."""
        with self.connect() as db:
            row = db.execute("SELECT study, rater FROM raters WHERE token = ?", (token,)).fetchone()
        return (row[0], row[1]) if row else None

    # tasks and votes --------------------------------------------------------------------------------------------
    def answered(self, study_id: str, rater: str) -> set[tuple[int, str]]:
        with self.connect() as db:
            return {(int(r[0]), r[1]) for r in db.execute(
                "SELECT pair, question FROM votes WHERE study = ? AND rater = ?", (study_id, rater))}

    def show(self, study_id: str, rater: str, pair: int, question: str, left_key: str) -> None:
        """Record when a task was first shown (kept on later showings: a reload does not reset the clock)."""
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO shown VALUES (?, ?, ?, ?, ?, ?)",
                       (study_id, rater, pair, question, left_key, now()))

    def shown(self, study_id: str, rater: str, pair: int, question: str) -> tuple[str, str] | None:
        """(left image key, shown at) of a task that was shown to the rater, or None."""
        with self.connect() as db:
            row = db.execute("SELECT left_key, shown_at FROM shown WHERE study = ? AND rater = ? AND pair = ? AND "
                             "question = ?", (study_id, rater, pair, question)).fetchone()
        return (row[0], row[1]) if row else None

    def vote(self, study_id: str, rater: str, pair: Pair, question: str, choice: str, left_key: str,
             shown_at: str | None, source: str = "app", answered_at: str | None = None) -> bool:
        """Store one vote and commit it; False when this rater had already answered this task (nothing added)."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}")
        chosen = left_key if choice == "left" else (pair.b_key if left_key == pair.a_key else pair.a_key)
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO votes (study, pair, rater, question, choice, chosen_key, left_key, shown_at, "
                "answered_at, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (study, pair, rater, question) DO NOTHING",
                (study_id, pair.pair, rater, question, choice, chosen, left_key, shown_at, answered_at or now(),
                 source))
            return cursor.rowcount == 1

    def insert_many(self, rows: list[tuple[Any, ...]]) -> int:
        """Votes from elsewhere (already validated), all in one transaction; returns how many were new."""
        with self.transaction() as db:
            before = db.execute("SELECT count(*) FROM votes").fetchone()[0]
            db.executemany(
                "INSERT INTO votes (study, pair, rater, question, choice, chosen_key, left_key, shown_at, "
                "answered_at, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (study, pair, rater, question) DO NOTHING", rows)
            after = db.execute("SELECT count(*) FROM votes").fetchone()[0]
        return int(after - before)

    def votes(self, study_id: str | None = None) -> pd.DataFrame:
        """Every vote (one row each) with its pair's keys, kind and prompt; `chosen` is the chosen image's key."""
        query = ("SELECT v.study, v.pair, p.kind, v.rater, v.question, v.choice, v.chosen_key, v.left_key, p.a_key, "
                 "p.b_key, p.prompt, v.shown_at, v.answered_at, v.source FROM votes v JOIN pairs p "
                 "ON p.study = v.study AND p.pair = v.pair" + (" WHERE v.study = ?" if study_id else "") +
                 " ORDER BY v.id")
        with self.connect() as db:
            rows = db.execute(query, (study_id,) if study_id else ()).fetchall()
        return pd.DataFrame(rows, columns=VOTE_COLUMNS)


def open_store(run_dir: Path) -> VoteStore | None:
    """The run's ratings database, or None when it has none (reports of runs without studies)."""
    return VoteStore(run_dir) if (Path(run_dir) / FILE).is_file() else None
