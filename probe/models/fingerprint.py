"""Pin what a model reference points at, so Job keys change when the weights do.

A hub id with a revision is pinned already. For a local folder (or LoRA file) the key gets a fingerprint of
its files (names, sizes, modification times): retraining in place then invalidates cached images. A hub id
without a revision is pinned to the commit of the snapshot in the local cache, so a later `probe models pull`
that brings a newer `main` is a different key. No network, no torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from probe.models.registry import TINY_ID


def looks_like_path(reference: str) -> bool:
    """A model reference that names a local folder or file rather than a hub id."""
    return reference.startswith((".", "/", "~")) or Path(reference).expanduser().exists()


def local_fingerprint(path: Path) -> str:
    """'local-<hash>' over the relative names, sizes and mtimes of the files under `path` (or of the file)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    for file in files:
        stat = file.stat()
        name = file.name if file == path else file.relative_to(path).as_posix()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return "local-" + digest.hexdigest()[:16]


def cached_commit(repo_id: str, filename: str) -> str | None:
    """The commit of the locally cached snapshot holding `filename`, if any (never asks the network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    if isinstance(found, str):
        parts = Path(found).parts
        if "snapshots" in parts:
            return parts[parts.index("snapshots") + 1]
    return None


def pin(reference: str | None, revision: str | None, base: Path, filename: str) -> tuple[str | None, str | None]:
    """(reference, revision) as the key should see them: local paths made absolute and fingerprinted."""
    if reference is None or reference == TINY_ID:
        return reference, revision
    if looks_like_path(reference):
        path = Path(reference).expanduser()
        path = path if path.is_absolute() else (base / path).resolve()
        return str(path), local_fingerprint(path) if path.exists() else revision
    if revision is None:
        return reference, cached_commit(reference, filename)
    return reference, revision
