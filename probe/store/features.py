"""Feature cache: embeddings stored per (extractor id, image key or text), computed once, reused by all metrics.

A CLIP image embedding computed for clip_score is found again by cmmd, FD-on-CLIP and the zero-shot
probes. The extractor id names the model, revision and preprocessing, so changing any of them never
returns a stale vector. Entries are .npy files written atomically under `<cache>/features/`.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from probe.store.atomic import atomic_write_bytes, default_cache_dir


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
        path = self._path(extractor, item)
        if not path.is_file():
            return None
        return np.load(path, allow_pickle=False)

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
        missing: list[int] = []
        wanted: set[str] = set()
        for index, item in enumerate(items):
            if item in found or item in wanted:
                continue
            vector = self.get(extractor, item)
            if vector is None:
                missing.append(index)
                wanted.add(item)
            else:
                found[item] = vector
        self.hits += len(found)
        self.misses += len(missing)
        if missing:
            vectors = np.asarray(compute(missing))
            for index, vector in zip(missing, vectors, strict=True):
                self.put(extractor, items[index], vector)
                found[items[index]] = vector
        return np.stack([found[item] for item in items]) if items else np.zeros((0, 0))
