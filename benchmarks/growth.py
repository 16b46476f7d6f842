"""Per-image bookkeeping as a run grows: does a chunk cost the same at 100k rows as at 1k?

Two stores are grown: the scores table (with its score cache) and the feature cache (CLIP-L/14-sized
768-float vectors, one chunk of 64 looked up and written per call, as the CLIP backend does).

    python benchmarks/growth.py                       # 1k, 10k and 100k rows, and the old rewrite at each size
    python benchmarks/growth.py --sizes 1000 10000 --old-chunks 0 --repeats 1

One `ScoresTable` (with a `ScoreCache`, as the run driver builds it) is fed 64-row chunks shaped like the
scorer's per-image rows (`_image_row`: clip_score, a `truncated` flag in `extra`) until it holds the largest
size; a row's time at size n is that of the chunks written while the table grew from n/2 to n rows (median,
and mean with the slow ones), so all sizes come from one growth. The growth is repeated `--repeats` times on
fresh folders and the best of each figure kept (fsync times on this machine are noisy). The old approach
(the whole scores.parquet rewritten after every chunk) is timed for `--old-chunks` chunks on a table already
holding n rows; the same score cache takes its rows, so the two differ only in the table's writes. The
one-off costs at the largest size (the `frame` the scorer reads once per pass, reading the parts back on
resume, the final compaction) are printed after. Every write is fsynced: the figures depend on the disk
(`--dir` picks where).
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from probe.store.atomic import atomic_write_bytes, write_parquet_atomic
from probe.store.features import FeatureCache
from probe.store.score_cache import ScoreCache
from probe.store.tables import SCORE_COLUMNS, ScoresTable, compact_scores, detail_of, read_scores, scores_to_arrow

CHUNK = 64  # probe.score.scorer.CHUNK


def rows(start: int, count: int, config: str = "3f2a9c0d1e4b5a6c") -> list[dict[str, Any]]:
    """Per-image rows as scorer._image_row writes them for clip_score (hex ids of the real widths)."""
    return [{"metric": "clip_score", "args": "", "series": "clip_score", "config_id": config,
             "score_id": f"{i:032x}", "key": f"{i:064x}", "value": 0.25 + (i % 97) / 1000, "label": None,
             "text": None, "extra": {"truncated": i % 11 == 0}} for i in range(start, start + count)]


def grow(folder: Path, sizes: list[int]) -> tuple[dict[int, list[float]], ScoreCache, dict[str, float]]:
    """Chunk times (seconds per row) of the part-appending table, by size window, and the one-off costs."""
    cache = ScoreCache(folder / "cache")
    table = ScoresTable(folder / "run", cache)
    windows: dict[int, list[float]] = {n: [] for n in sizes}
    written = 0
    while written < max(sizes):
        chunk = rows(written, CHUNK)
        started = time.perf_counter()
        table.add(chunk)
        seconds = (time.perf_counter() - started) / CHUNK
        written += CHUNK
        for n in sizes:
            if n // 2 < written <= n:
                windows[n].append(seconds)
    once = {}
    started = time.perf_counter()
    assert len(table.frame) == written
    once["frame, read once per metric pass"] = time.perf_counter() - started
    started = time.perf_counter()
    assert len(read_scores(folder / "run")) == written
    once[f"read_scores over {written // CHUNK} parts (resume, report)"] = time.perf_counter() - started
    started = time.perf_counter()
    compact_scores(folder / "run")
    once["compaction into scores.parquet"] = time.perf_counter() - started
    return windows, cache, once


def grow_features(folder: Path, sizes: list[int], width: int = 768) -> dict[int, list[float]]:
    """Seconds per vector of FeatureCache.get_or_compute on 64 new images, by size window (compute is free)."""
    cache = FeatureCache(folder / "features-cache")
    vectors = np.random.default_rng(0).standard_normal((CHUNK, width)).astype("float32")
    windows: dict[int, list[float]] = {n: [] for n in sizes}
    written = 0
    while written < max(sizes):
        items = [f"{i:064x}" for i in range(written, written + CHUNK)]
        started = time.perf_counter()
        cache.get_or_compute("open_clip:ViT-L-14|openai|image", items, lambda indices: vectors[: len(indices)])
        seconds = (time.perf_counter() - started) / CHUNK
        written += CHUNK
        for n in sizes:
            if n // 2 < written <= n:
                windows[n].append(seconds)
    cache.close()
    return windows


def old_feature_files(folder: Path, chunks: int, width: int = 768) -> list[float]:
    """Seconds per vector of the old layout: one .npy per (extractor, image), each written atomically (fsynced)."""
    vector = np.random.default_rng(0).standard_normal(width).astype("float32")
    times = []
    for chunk in range(chunks):
        started = time.perf_counter()
        for i in range(CHUNK):
            key = f"{chunk * CHUNK + i:064x}"
            buffer = io.BytesIO()
            np.save(buffer, vector, allow_pickle=False)
            atomic_write_bytes(folder / "old-features" / key[:2] / f"{key}.npy", buffer.getvalue())
        times.append((time.perf_counter() - started) / CHUNK)
    return times


def old_rewrite(folder: Path, n: int, chunks: int, cache: ScoreCache) -> list[float]:
    """Seconds per row of the old ScoresTable.add at n rows: concat the frame, rewrite the whole file, cache."""
    frame = pd.DataFrame(rows(0, n), columns=SCORE_COLUMNS)
    path = folder / f"old-{n}" / "scores.parquet"
    write_parquet_atomic(scores_to_arrow(frame), path)
    times = []
    for i in range(chunks):
        chunk = rows(n + i * CHUNK, CHUNK, config="old")
        started = time.perf_counter()
        new = pd.DataFrame(chunk, columns=SCORE_COLUMNS)
        new["extra"] = [detail_of(v) for v in new["extra"]]
        frame = pd.concat([frame, new], ignore_index=True)
        write_parquet_atomic(scores_to_arrow(frame), path)
        cache.add("old", chunk)
        times.append((time.perf_counter() - started) / CHUNK)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--old-chunks", type=int, default=3, help="chunks the old rewrite is timed for (0: skip it)")
    parser.add_argument("--repeats", type=int, default=3, help="growths on fresh folders; the best figures are kept")
    parser.add_argument("--dir", type=Path, default=None, help="where the run folder goes (default: a temp folder)")
    args = parser.parse_args()
    sizes = sorted(args.sizes)
    medians: dict[int, list[float]] = {n: [] for n in sizes}
    means: dict[int, list[float]] = {n: [] for n in sizes}
    feature_medians: dict[int, list[float]] = {n: [] for n in sizes}
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            folder = Path(tmp)
            windows, cache, once = grow(folder, sizes)
            for n in sizes:
                medians[n].append(statistics.median(windows[n]))
                means[n].append(statistics.mean(windows[n]))
            if repeat == args.repeats - 1:  # the old rewrite once, on the last growth's cache
                old = {n: old_rewrite(folder, n, args.old_chunks, cache) for n in sizes} if args.old_chunks else {}
                old_files = old_feature_files(folder, max(args.old_chunks, 1))
            cache.close()
            features = grow_features(folder, sizes)
            for n in sizes:
                feature_medians[n].append(statistics.median(features[n]))
    us = 1e6
    print(f"per-row bookkeeping, ScoresTable.add of {CHUNK}-row chunks (fsynced parts + score cache)\n")
    print("| rows | chunks timed | parts: median | parts: mean | old rewrite: median |")
    print("|---|---|---|---|---|")
    for n in sizes:
        before = f"{statistics.median(old[n]) * us:.0f} µs" if n in old else "-"
        print(f"| {n:,} | {len(windows[n])} x {args.repeats} | {min(medians[n]) * us:.0f} µs | {min(means[n]) * us:.0f} µs "
              f"| {before} |")
    low, high = sizes[0], sizes[-1]
    ratio = min(medians[high]) / min(medians[low])
    mean_ratio = min(means[high]) / min(means[low])
    print(f"\nper-row time {high:,} / {low:,} rows: {ratio:.2f} (median), {mean_ratio:.2f} (mean); target <= 1.5")
    if old:
        print(f"old rewrite {high:,} / {low:,} rows: {statistics.median(old[high]) / statistics.median(old[low]):.1f}")
    print("\nper-vector bookkeeping, FeatureCache.get_or_compute of 64 new 768-float vectors (one SQLite commit)\n")
    print("| vectors | median |")
    print("|---|---|")
    for n in sizes:
        print(f"| {n:,} | {min(feature_medians[n]) * us:.0f} µs |")
    feature_ratio = min(feature_medians[high]) / min(feature_medians[low])
    print(f"\nper-vector time {high:,} / {low:,} vectors: {feature_ratio:.2f} (median); target <= 1.5")
    print(f"old layout (one fsynced .npy per vector): {statistics.median(old_files) * us:.0f} µs per vector, "
          f"{statistics.median(old_files) / min(feature_medians[high]):.0f}x the database at {high:,}")
    print(f"\none-off costs at {high:,} rows (last growth):")
    for what, seconds in once.items():
        print(f"  {what}: {seconds:.2f} s")


if __name__ == "__main__":
    main()
