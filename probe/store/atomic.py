"""The one way probe writes a file that others read: a temporary file in the same folder, then a rename.

A reader (another process, a resumed run, a report) sees either the old file or the whole new one, never half
of one; a process killed mid-write leaves at most a stray `.tmp` file. `durable` also fsyncs before the
rename, for data that must survive a power cut (images, tables, logs); derived files that can be remade
(thumbnails, the report page) skip it.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

log = logging.getLogger(__name__)
T = TypeVar("T")


def default_cache_dir() -> Path:
    """`PROBE_CACHE` if set, else the user cache folder (e.g. ~/.cache/probe)."""
    env = os.environ.get("PROBE_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("probe"))


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: mkstemp makes 0600 files; written files get the mode a plain open() would give (0644 under umask 022), so
#: a cache or report folder shared by a team stays readable to it.
FILE_MODE = 0o666 & ~_read_umask()


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write bytes to `path` through a temporary file (a unique name per call, so processes never share one)
    and a rename (fsynced first when `durable`); the file gets the umask's mode, not mkstemp's 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (POSIX keeps directory entries apart from file data)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows): the rename is what it can do
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the file itself is already on disk
    finally:
        os.close(fd)


def write_parquet_atomic(frame: pd.DataFrame | pa.Table, path: Path) -> None:
    """A table (pandas or Arrow) as parquet, written with `atomic_write_bytes`, so readers never see half a file."""
    buffer = io.BytesIO()
    if hasattr(frame, "to_parquet"):  # pandas; checked by duck type so importing this module loads no pandas
        frame.to_parquet(buffer, index=False)
    else:
        import pyarrow.parquet as pq

        pq.write_table(frame, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def aside_path(path: Path) -> Path:
    """Where a damaged file is moved so it is kept for a person to look at and made again:
    `<name>.corrupt-<UTC time>` beside it."""
    return path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")


def open_or_set_aside(path: Path, open_db: Callable[[Path], T], what: str) -> T:
    """`open_db(path)`, or, when SQLite cannot open the file (not a database, damaged beyond its recovery), the
    file and its -wal/-shm moved aside (`aside_path`) with a warning and a fresh database opened instead."""
    import sqlite3

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return open_db(path)
    except sqlite3.DatabaseError as exc:
        aside = aside_path(path)
        log.warning("%s %s is unreadable (%s); moved to %s, its entries are computed again", what, path, exc,
                    aside.name)
        for suffix in ("", "-wal", "-shm"):
            part = path.with_name(path.name + suffix)
            if part.exists():
                part.rename(aside.with_name(aside.name + suffix))
        return open_db(path)


def replace_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` (relative), atomically: a new link under a temporary name, then a rename."""
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
