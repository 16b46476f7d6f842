"""Feature cache: embeddings stored per (extractor id, image key or text), computed once, reused by all metrics.

A CLIP image embedding computed for clip_score is found again by cmmd, FD-on-CLIP and the zero-shot
probes. The extractor id names the model, revision and preprocessing, so changing any of them never
returns a stale vector. Entries are .npy files written atomically under `<cache>/features/`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from probe.store.atomic import atomic_write_bytes, default_cache_dir

log = logging.getLogger(__name__)


def text_id(text: str) -> str:
    """Stable id of a text (prompt) for the cache."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class FeatureCache:
    """Vectors by (extractor id, item id)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (Path(root) if root is not None else default_cache_dir()) / "features"
        self.hits = 0
        self.misses = 0

    def _path(self, extractor: str, item: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", extractor)[:80]
        digest = hashlib.sha256(extractor.encode()).hexdigest()[:12]
        return self.root / f"{safe}-{digest}" / item[:2] / f"{item}.npy"

    def get(self, extractor: str, item: str) -> np.ndarray | None:
        """The cached vector, or None; an entry that does not load as a finite float vector is moved aside."""
        path = self._path(extractor, item)
        if not path.is_file():
            return None
        try:
            vector = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # truncated, not .npy, or a pickled object
            self._quarantine(path, f"{type(exc).__name__}: {exc}")
            return None
        if vector.ndim != 1 or vector.dtype.kind != "f" or not np.isfinite(vector).all():
            self._quarantine(path, f"shape {vector.shape} dtype {vector.dtype}")
            return None
        return vector

    def _quarantine(self, path: Path, why: str) -> None:
        aside = self.root.parent / "quarantine" / "features" / f"{path.parent.parent.name}-{path.name}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, aside)
        log.warning("feature cache entry %s is bad (%s): moved to %s and computed again", path.name, why, aside)
        return None

    def forget(self, items: Iterable[str]) -> None:
        """Drop every extractor's vectors of these items (image keys whose image was found bad)."""
        items = list(items)
        if not items or not self.root.is_dir():
            return
        for extractor in self.root.iterdir():
            for item in items:
                (extractor / item[:2] / f"{item}.npy").unlink(missing_ok=True)

    def put(self, extractor: str, item: str, vector: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(vector), allow_pickle=False)
        atomic_write_bytes(self._path(extractor, item), buffer.getvalue())

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
        found: dict[str, np.ndarray] = {}
        first: dict[str, int] = {}  # each distinct item's first index
        for index, item in enumerate(items):
            if item not in first:
                first[item] = index
                vector = self.get(extractor, item)
                if vector is not None:
                    found[item] = vector
        missing = [index for item, index in first.items() if item not in found]
        vectors = np.asarray(compute(missing)) if missing else None
        if vectors is not None:
            width = vectors.shape[1:]
        else:
            width = Counter(v.shape for v in found.values()).most_common(1)[0][0] if found else ()
        stale = [item for item, vector in found.items() if vector.shape != width]
        for item in stale:  # a vector of another width under this extractor (a hand-copied cache): made again
            self._quarantine(self._path(extractor, item), f"shape {found.pop(item).shape}, expected {width}")
        if stale:
            again = [first[item] for item in stale]
            more = np.asarray(compute(again))
            vectors = more if vectors is None else np.concatenate([vectors, more])
            missing += again
        self.hits += len(found)
        self.misses += len(missing)
        if vectors is not None:
            for index, vector in zip(missing, vectors, strict=True):
                self.put(extractor, items[index], vector)
                found[items[index]] = vector
        return np.stack([found[item] for item in items]) if items else np.zeros((0, 0))
