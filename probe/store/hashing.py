"""The one way probe hashes a file's contents: sha256, streamed, remembered on disk while the file is unchanged.

Model folders, LoRA files, the Inception weights and the shipped datasets are all hashed through here, so a
multi-GB file is read once, not once per run or per check.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from probe.store.atomic import atomic_write_bytes, default_cache_dir

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_DIGEST = re.compile(r"[0-9a-f]{64}")


def _stream_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _memo_file(resolved: Path, stat: os.stat_result) -> Path:
    """Where the hash of this exact file state is remembered. ctime is in the key (beyond size, mtime and
    inode) because an in-place rewrite can restore the old mtime (`os.utime`), but never the ctime; the price
    is one re-hash after a `touch` or chmod, never a wrong hash."""
    state = f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\0{stat.st_ino}\0{stat.st_dev}"
    name = hashlib.sha256(state.encode()).hexdigest()
    return default_cache_dir() / "file-sha256" / name[:2] / name


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, streamed, remembered in `$PROBE_CACHE/file-sha256/` while the file is unchanged."""
    resolved = path.resolve()
    memo = _memo_file(resolved, resolved.stat())
    try:
        known = memo.read_text(encoding="ascii").strip()
        if _DIGEST.fullmatch(known):
            return known
    except (OSError, UnicodeDecodeError):
        pass  # not hashed yet in this state (or an unreadable memo): hash it
    digest = _stream_sha256(resolved)
    try:
        atomic_write_bytes(memo, digest.encode("ascii"), durable=False)  # a lost memo only costs a re-hash
    except OSError as error:  # a read-only cache only costs a re-hash next time
        logger.debug("cannot remember the hash of %s: %s", resolved, error)
    return digest
