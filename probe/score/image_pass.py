"""The per-image metrics of one probe in one pass: each image decoded once and handed to every metric that needs it.

Images go in chunks of `CHUNK`. A chunk is decoded by a thread pool (PIL releases the GIL while it inflates),
its share of CPU-bound metrics (faces, skin tone, OCR) goes to the worker processes of a `CpuPool` when one is
given, and the other metrics (CLIP on the run's device) score it here while the workers are busy with it and
with the next chunk. The CPU metrics run before the others, so the face boxes they found (sent back by the
workers) are there when perceived_gender needs them. Each chunk's rows are handed to the sink at once: an
interrupted pass keeps every chunk it finished.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from probe.score.attempt import Failed, attempt
from probe.score.cpu_pool import CpuPool, Result, cpu_bound, machine_cores, poolable
from probe.score.labels import canonical_args, failure_record, metric_label
from probe.score.metrics.faces import add_faces
from probe.score.protocol import ImageItem, ImageMetric, Score, ScoringContext
from probe.store.tables import score_ids

if TYPE_CHECKING:
    from probe.score.ray_device import RayDevicePool
    from probe.score.scorer import PreparedMetric, ScoreSink

log = logging.getLogger(__name__)

CHUNK = 64
#: Threads decoding PNGs: decoding is native code without the GIL, so they overlap on every core.
DECODERS = max(2, min(8, machine_cores()))

Chunk = list[tuple[str, ImageItem]]
Remote = dict[str, tuple[list[Score], list[Failed], set[str]]]
"""Per metric label: the scores and failures computed elsewhere (workers, actors) and the keys they cover."""


@dataclass
class _Wanted:
    """One metric's work in the pass: the score ids it still lacks, and whether the CPU workers do them."""

    item: PreparedMetric
    label: str
    todo: set[str]
    cpu_bound: bool
    pooled: bool = False
    on_device: bool = False
    """Scored on the Ray metric actors (`RayDevicePool`) rather than in this process."""


def score_images(prepared: list[PreparedMetric], rows: pd.DataFrame, run_dir: Path, ctx: ScoringContext,
                 sink: ScoreSink, progress: Any, failures: list[dict[str, str]], pool: CpuPool | None = None,
                 stop: Callable[[], bool] | None = None,
                 device: RayDevicePool | None = None) -> dict[str, tuple[int, int]]:
    """Score `rows` (one probe's) with its per-image metrics; (computed, reused) per metric label. `device`:
    the metrics it holds are scored on its Ray metric actors, each chunk once its CPU metrics are back."""
    items = scored_items(rows, run_dir)
    wanted, counts = _wanted(prepared, items, sink)
    union = [(sid, image) for sid, image in items.items() if any(sid in w.todo for w in wanted)]
    if not union:
        return counts
    if pool is not None:
        cpu = [w for w in wanted if poolable(w.item.spec.name, w.item.metric)]
        if pool.usable({w.label for w in cpu}):
            for w in cpu:
                w.pooled = True
    for w in wanted:
        w.on_device = device is not None and not w.pooled and device.usable({w.label})
    remote_wanted = [w for w in wanted if w.on_device]
    if progress is not None:
        progress.group(f"score {', '.join(w.label for w in wanted)} ({prepared[0].probe})", len(union))
    with ThreadPoolExecutor(DECODERS, thread_name_prefix="probe-decode") as decoders:
        chunks = _decoded(rounds(union), wanted, pool, decoders)
        try:
            for chunk, images, futures in chunks:
                remote = _collect(futures, ctx, pool)
                if futures and pool is not None and pool.broken and stop is not None and stop():
                    break  # interrupted: the workers were ended with the chunk; the next pass does it
                if remote_wanted and device is not None and not device.broken:
                    _on_device(device, remote_wanted, chunk, images, ctx, remote)
                new_rows: list[dict[str, Any]] = []
                for w in wanted:
                    new_rows += _metric_rows(w, chunk, images, remote.get(w.label), ctx, rows, failures)
                sink.add(new_rows)
                if progress is not None:
                    progress.advance(len(chunk))
                if stop is not None and stop():
                    break
        finally:
            chunks.close()  # cancels what the workers have not started
    return counts


def _wanted(prepared: list[PreparedMetric], items: dict[str, ImageItem],
            sink: ScoreSink) -> tuple[list[_Wanted], dict[str, tuple[int, int]]]:
    """What each metric still lacks (neither in the run's scores nor in the cross-run cache), CPU metrics first."""
    existing = sink.frame
    wanted: list[_Wanted] = []
    counts: dict[str, tuple[int, int]] = {}
    for item in prepared:
        label = metric_label(item.spec.name, item.spec.args)
        have = set(existing.loc[existing["config_id"] == item.config_id, "score_id"])  # one id, one configuration
        outputs = frozenset(getattr(getattr(item.metric, "info", None), "outputs", None) or ())
        missing = [sid for sid in items if sid not in have]
        cached = sink.reuse(item.config_id, missing, outputs)
        todo = {sid for sid in missing if sid not in cached}
        counts[label] = (len(todo), len(items) - len(todo))
        if todo:
            wanted.append(_Wanted(item, label, todo, cpu_bound(item.metric)))
    wanted.sort(key=lambda w: not w.cpu_bound)  # stable: faces before perceived_gender, else the suite's order
    return wanted, counts


def _decoded(chunks: list[Chunk], wanted: list[_Wanted], pool: CpuPool | None,
             decoders: ThreadPoolExecutor) -> Generator[tuple[Chunk, list[ImageItem], list[Future[Result]]], None, None]:
    """Each chunk decoded, its CPU share sent to the workers, yielded one chunk behind so the workers always
    have the next chunk while this thread scores the current one."""
    pooled = [w for w in wanted if w.pooled]
    window: deque[tuple[Chunk, list[ImageItem], list[Future[Result]]]] = deque()
    try:
        for chunk in chunks:
            images = list(decoders.map(ImageItem.decoded, [image for _, image in chunk]))
            futures = _submit(pool, pooled, chunk, images) if pooled and pool is not None else []
            window.append((chunk, images, futures))
            if len(window) > 1:
                yield window.popleft()
        while window:
            yield window.popleft()
    finally:
        for _, _, futures in window:
            for future in futures:
                future.cancel()


def _submit(pool: CpuPool, pooled: list[_Wanted], chunk: Chunk, images: list[ImageItem]) -> list[Future[Result]]:
    """The chunk's CPU work split in one task per worker, each task holding all CPU metrics of its images (so a
    worker detects a face once for faces and skin tone)."""
    step = -(-len(chunk) // pool.workers)
    futures = []
    for start in range(0, len(chunk), step):
        part = list(zip(chunk[start:start + step], images[start:start + step], strict=True))
        task = [(w.label, [image for (sid, _), image in part if sid in w.todo]) for w in pooled]
        task = [(label, share) for label, share in task if share]
        if task:
            futures.append(pool.submit(task))
    return futures


def _collect(futures: list[Future[Result]], ctx: ScoringContext,
             pool: CpuPool | None) -> Remote:
    """The workers' results per label (scores, failures, keys covered); their faces added to `ctx`. A pool that
    broke (a worker killed) is given up: what it did not return is scored in this process."""
    remote: Remote = {}
    for future in futures:
        try:
            results, faces = future.result()
        except Exception as exc:  # noqa: BLE001 - BrokenProcessPool, a pickling error: finish in-process
            if pool is not None and not pool.broken:
                log.warning("CPU scoring workers failed (%s: %s); scoring the rest in this process",
                            type(exc).__name__, exc)
                pool.broken = True
            continue
        add_faces(ctx, faces)
        _add(remote, results)
    return remote


def _add(remote: Remote, results: dict[str, tuple[list[Score], list[Failed]]]) -> None:
    for label, (scores, failed) in results.items():
        got = remote.setdefault(label, ([], [], set()))
        got[0].extend(scores)
        got[1].extend(failed)
        got[2].update({s.key for s in scores if s.key} | {key for key, _ in failed})


def _on_device(device: RayDevicePool, wanted: list[_Wanted], chunk: Chunk, images: list[ImageItem],
               ctx: ScoringContext, remote: Remote) -> None:
    """The chunk's device metrics on the metric actors, one share per actor with the faces already found, added to
    `remote`; their vectors stored in this process's feature cache. An actor lost (its node gone) leaves the rest to
    this process."""
    from probe.score.metrics.faces import copy_faces

    step = -(-len(chunk) // device.workers)
    parts, faces = [], []
    for start in range(0, len(chunk), step):
        part = list(zip(chunk[start:start + step], images[start:start + step], strict=True))
        task = [(w.label, [image for (sid, _), image in part if sid in w.todo]) for w in wanted]
        task = [(label, share) for label, share in task if share]
        if task:
            parts.append(task)
            faces.append(copy_faces(ctx, {image.key for _, image in part}))
    for future in device.score(parts, faces):
        try:
            results, features = future.result()
        except Exception as exc:  # noqa: BLE001 - a lost actor: this process scores what it did not return
            if not device.broken:
                log.warning("metric actors failed (%s: %s); scoring the rest in this process", type(exc).__name__, exc)
                device.broken = True
            continue
        device.store(features)
        _add(remote, results)


def _metric_rows(w: _Wanted, chunk: Chunk, images: list[ImageItem],
                 remote: tuple[list[Score], list[Failed], set[str]] | None, ctx: ScoringContext,
                 rows: pd.DataFrame, failures: list[dict[str, str]]) -> list[dict[str, Any]]:
    """One metric's rows for the chunk: the workers' results, and the rest scored here."""
    share = [(sid, image) for (sid, _), image in zip(chunk, images, strict=True) if sid in w.todo]
    if not share:
        return []
    scores, failed, covered = remote if remote is not None else ([], [], set())
    here = [image for _, image in share if image.key not in covered]
    if here:
        metric = w.item.metric
        assert isinstance(metric, ImageMetric)
        more, bad = attempt(metric, here, ctx)
        scores, failed = [*scores, *more], [*failed, *bad]
    for key, error in failed:
        failures.append(failure_record(w.label, w.item.probe, rows[rows["key"] == key], error))
    by_key = {image.key: sid for sid, image in share}
    return [image_row(s, w.item, by_key[s.key]) for s in scores if s.key in by_key]


def scored_items(rows: pd.DataFrame, run_dir: Path) -> dict[str, ImageItem]:
    """One ImageItem per distinct score id (image + prompt + target text)."""
    unique = rows.assign(score_id=score_ids(rows)).drop_duplicates("score_id")
    return {r.score_id: ImageItem(key=r.key, path=run_dir / r.image, prompt=r.prompt,
                                  text=None if pd.isna(r.text) else r.text) for r in unique.itertuples()}


def rounds(todo: Chunk) -> list[Chunk]:
    """Chunks in which every image key appears once, so each returned Score maps back to one score id."""
    chunks: list[Chunk] = []
    open_chunks: list[tuple[Chunk, set[str]]] = []  # chunks not yet full, with their keys
    for sid, item in todo:
        for chunk, keys in open_chunks:
            if item.key not in keys:
                chunk.append((sid, item))
                keys.add(item.key)
                break
        else:
            chunk, keys = [(sid, item)], {item.key}
            chunks.append(chunk)
            open_chunks.append((chunk, keys))
        open_chunks = [(c, k) for c, k in open_chunks if len(c) < CHUNK]
    return chunks


def image_row(score: Score, item: PreparedMetric, sid: str) -> dict[str, Any]:
    """A scores.parquet row; a metric writing several rows (ocr) keeps their names as `metric`, one config."""
    return {"metric": score.metric, "args": canonical_args(item.spec.args),
            "series": metric_label(score.metric, item.spec.args), "config_id": item.config_id, "score_id": sid,
            "key": score.key, "value": score.value, "label": score.label, "text": score.text,
            "extra": dict(score.extra) if score.extra else None}
