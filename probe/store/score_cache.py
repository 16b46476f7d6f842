"""Per-image scores shared by all runs: (metric config id, score id) -> score rows, computed once, ever.

A score id names the image and what it is scored against (prompt, target text): see scoring.score_id.

A metric may write several rows per image (ocr writes ocr_exact, ocr_cer, ...); they are kept together.

Like the image store, so re-running a suite (or another suite over the same images) re-scores nothing.
One append-only JSONL file per metric configuration under `<cache>/scores/<config_id>.jsonl` (named by the
configuration's hash, never by its label, which can be long or hold any character); each append is fsynced,
and a torn last line from a kill is skipped when read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class ScoreCache:
    """Score rows by metric configuration and score id."""

    def __init__(self, cache_root: Path) -> None:
        self.root = Path(cache_root) / "scores"
        self._loaded: dict[str, dict[str, list[dict[str, Any]]]] = {}

    def _path(self, config_id: str) -> Path:
        return self.root / f"{config_id}.jsonl"

    def rows(self, config_id: str) -> dict[str, list[dict[str, Any]]]:
        """Cached rows of one configuration, by score id."""
        name = config_id
        if name not in self._loaded:
            found: dict[str, list[dict[str, Any]]] = {}
            path = self._path(config_id)
            if path.is_file():
                for line in path.read_text(encoding="utf-8").splitlines():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    found.setdefault(row["score_id"], [])
                    if row not in found[row["score_id"]]:
                        found[row["score_id"]].append(row)
            self._loaded[name] = found
        return self._loaded[name]

    def add(self, config_id: str, rows: list[dict[str, Any]]) -> None:
        """Append rows (each with a `score_id`) and force them to disk."""
        if not rows:
            return
        path = self._path(config_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r, default=str) + "\n" for r in rows))
            handle.flush()
            os.fsync(handle.fileno())
        loaded = self.rows(config_id)
        for row in rows:
            loaded.setdefault(row["score_id"], []).append(row)
