"""Feature cache: embeddings stored per (extractor id, image key or text), computed once, reused by all metrics.

A CLIP image embedding computed for clip_score is found again by cmmd, FD-on-CLIP and the zero-shot
probes. The extractor id names the model, revision and preprocessing, so changing any of them never
returns a stale vector.

Kept in SQLite (`<cache>/features.sqlite`, write-ahead log), like the score cache, rather than one `.npy`
file per (extractor, image): a batch of vectors is one transaction (one fsync, not one per image and
extractor), a lookup of a chunk is one query, and two processes can share the cache. A vector that does not
decode as a finite float vector is moved aside (`<cache>/quarantine/features/`) and computed again; a
database SQLite cannot open is moved aside whole. Vectors an older probe left as `.npy` files under
`<cache>/features/` are moved into the database when next asked for.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from probe.store.atomic import default_cache_dir, open_or_set_aside

log = logging.getLogger(__name__)

DATABASE = "features.sqlite"
LEGACY_FOLDER = "features"  # one .npy per (extractor, item), as probe wrote them before the database
_QUERY_CHUNK = 500  # items per SELECT ... IN (...): below SQLite's host-parameter limit everywhere
_SCHEMA = """
CREATE TABLE IF NOT EXISTS features (
    extractor TEXT NOT NULL,
    item TEXT NOT NULL,
    dtype TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (extractor, item)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS features_by_item ON features (item);
"""


def text_id(text: str) -> str:
    """Stable id of a text (prompt) for the cache."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class FeatureCache:
    """Vectors by (extractor id, item id), in one SQLite file under the cache root."""

    def __init__(self, root: Path | None = None) -> None:
        self.cache_root = Path(root) if root is not None else default_cache_dir()
        self.path = self.cache_root / DATABASE
        self.hits = 0
        self.misses = 0
        self._db: sqlite3.Connection | None = None
        self._legacy = False  # whether vectors of the old per-file layout may still be found
        self._lock = threading.Lock()  # the streaming scorer's thread and the main thread share one connection

    # -- connection --------------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = open_or_set_aside(self.path, _open, "feature cache")
            self._legacy = (self.cache_root / LEGACY_FOLDER).is_dir()
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __getstate__(self) -> dict[str, object]:  # a context sent to a worker process opens its own connection
        state = dict(self.__dict__)
        state["_db"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- reading and writing -----------------------------------------------------------------------------------
    def get(self, extractor: str, item: str) -> np.ndarray | None:
        """The cached vector, or None; an entry that does not decode as a finite float vector is moved aside."""
        return self.get_many(extractor, [item]).get(item)

    def get_many(self, extractor: str, items: Iterable[str]) -> dict[str, np.ndarray]:
        """The cached vectors of those `items` that have one, in as few queries as the item count allows."""
        wanted = list(dict.fromkeys(items))
        found: dict[str, np.ndarray] = {}
        bad: list[tuple[str, str, bytes, str]] = []
        with self._lock:
            db = self._connect()
            for start in range(0, len(wanted), _QUERY_CHUNK):
                part = wanted[start:start + _QUERY_CHUNK]
                marks = ",".join("?" * len(part))
                query = f"SELECT item, dtype, data FROM features WHERE extractor = ? AND item IN ({marks})"
                for item, dtype, data in db.execute(query, (extractor, *part)):
                    vector, why = _decode(dtype, data)
                    if vector is None:
                        bad.append((item, dtype, bytes(data), why))
                    else:
                        found[item] = vector
            if bad:
                self._quarantine(db, extractor, bad)
            if self._legacy:
                found.update(self._adopt_legacy(db, extractor, [item for item in wanted if item not in found]))
        return found

    def put(self, extractor: str, item: str, vector: np.ndarray) -> None:
        self.put_many(extractor, [(item, vector)])

    def put_many(self, extractor: str, entries: Iterable[tuple[str, np.ndarray]]) -> None:
        """Store vectors in one transaction: a batch costs one commit, whatever its size."""
        records = [(extractor, item, *_encode(vector)) for item, vector in entries]
        if not records:
            return
        with self._lock:
            db = self._connect()
            with db:
                db.executemany("INSERT OR REPLACE INTO features (extractor, item, dtype, data) VALUES (?, ?, ?, ?)",
                               records)

    def forget(self, items: Iterable[str]) -> None:
        """Drop every extractor's vectors of these items (image keys whose image was found bad)."""
        items = list(items)
        if not items:
            return
        with self._lock:
            db = self._connect()
            with db:
                db.executemany("DELETE FROM features WHERE item = ?", [(item,) for item in items])

    def _quarantine(self, db: sqlite3.Connection, extractor: str, bad: list[tuple[str, str, bytes, str]]) -> None:
        """Move unreadable vectors out of the database into files a person can inspect; they are made again."""
        folder = self.cache_root / "quarantine" / "features"
        folder.mkdir(parents=True, exist_ok=True)
        for item, dtype, data, why in bad:
            (folder / f"{_safe(extractor)}-{item}.{_safe(dtype)}.bin").write_bytes(data)
            log.warning("feature cache entry %s of %s is bad (%s): moved to %s and computed again",
                        item[:16], extractor, why, folder)
        with db:
            db.executemany("DELETE FROM features WHERE extractor = ? AND item = ?",
                           [(extractor, item) for item, *_ in bad])

    def _drop(self, extractor: str, items: list[str], why: str) -> None:
        with self._lock:
            db = self._connect()
            rows = [(item, dtype, bytes(data), why) for item in items
                    for dtype, data in db.execute("SELECT dtype, data FROM features WHERE extractor = ? AND item = ?",
                                                  (extractor, item))]
            if rows:
                self._quarantine(db, extractor, rows)

    def get_or_compute(
        self,
        extractor: str,
        items: Sequence[str],
        compute: Callable[[list[int]], np.ndarray],
    ) -> np.ndarray:
        """Rows for `items` in order; `compute(indices)` is called once for the missing ones only.

        Args:
            extractor: id of the feature extractor (model, revision, preprocessing).
            items: item ids (image keys or `text_id`s); duplicates are computed once.
            compute: given indices into `items`, returns their vectors as an (n, d) array.
        """
        first: dict[str, int] = {}  # each distinct item's first index
        for index, item in enumerate(items):
            first.setdefault(item, index)
        found = self.get_many(extractor, first)
        missing = [index for item, index in first.items() if item not in found]
        vectors = np.asarray(compute(missing)) if missing else None
        if vectors is not None:
            width = vectors.shape[1:]
        else:
            width = Counter(v.shape for v in found.values()).most_common(1)[0][0] if found else ()
        stale = [item for item, vector in found.items() if vector.shape != width]
        if stale:  # a vector of another width under this extractor (a hand-edited cache): made again
            self._drop(extractor, stale, f"shape {found[stale[0]].shape}, expected {width}")
            for item in stale:
                found.pop(item)
            again = [first[item] for item in stale]
            more = np.asarray(compute(again))
            vectors = more if vectors is None else np.concatenate([vectors, more])
            missing += again
        self.hits += len(found)
        self.misses += len(missing)
        if vectors is not None:
            new = [(items[index], vector) for index, vector in zip(missing, vectors, strict=True)]
            self.put_many(extractor, new)
            found.update(new)
        return np.stack([found[item] for item in items]) if items else np.zeros((0, 0))

    # -- vectors an older probe wrote as files -----------------------------------------------------------------
    def _legacy_path(self, extractor: str, item: str) -> Path:
        """Where probe before the database kept this vector (`<cache>/features/<id>-<digest>/<ab>/<item>.npy`)."""
        digest = hashlib.sha256(extractor.encode()).hexdigest()[:12]
        return self.cache_root / LEGACY_FOLDER / f"{_safe(extractor)}-{digest}" / item[:2] / f"{item}.npy"

    def _adopt_legacy(self, db: sqlite3.Connection, extractor: str, items: list[str]) -> dict[str, np.ndarray]:
        """Vectors of `items` still in the old per-file layout: moved into the database, their files removed.

        The old folder names cannot be turned back into extractor ids, so vectors are adopted when asked for
        under their exact id, not imported wholesale; only cache misses pay a file lookup, and only while the
        old folder exists. Files no one asks for again stay; removing `<cache>/features/` loses nothing else.
        """
        adopted: dict[str, np.ndarray] = {}
        for item in items:
            path = self._legacy_path(extractor, item)
            if not path.is_file():
                continue
            try:
                vector = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError):
                vector = None
            if vector is not None and vector.ndim == 1 and vector.dtype.kind == "f" and np.isfinite(vector).all():
                adopted[item] = vector
        if adopted:
            with db:
                db.executemany("INSERT OR IGNORE INTO features (extractor, item, dtype, data) VALUES (?, ?, ?, ?)",
                               [(extractor, item, *_encode(vector)) for item, vector in adopted.items()])
            for item in items:
                self._legacy_path(extractor, item).unlink(missing_ok=True)
        return adopted


def _open(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=60, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a process kill; a cache may lose
    db.executescript(_SCHEMA)  # its last commits to a power cut, and those vectors are simply computed again
    db.execute("SELECT count(*) FROM features").fetchone()  # a damaged file fails here, not mid-run
    return db


def _encode(vector: np.ndarray) -> tuple[str, bytes]:
    array = np.ascontiguousarray(vector)
    return array.dtype.str, array.tobytes()


def _decode(dtype: str, data: bytes) -> tuple[np.ndarray | None, str]:
    try:
        kind = np.dtype(dtype)
        vector = np.frombuffer(data, dtype=kind).copy()
    except (TypeError, ValueError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if kind.kind != "f" or not np.isfinite(vector).all() or vector.size == 0:
        return None, f"dtype {dtype}, {vector.size} values"
    return vector, ""


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:80]
