"""The run's single writer: it links reused images (after checking them), and stores, links and logs each
batch an executor returns. Nothing else writes the image store, the run folder's images or the progress log.

A batch is logged only once its PNGs are durable (atomic, fsynced), so a kill at any moment loses nothing
that was logged and makes nothing twice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from probe.errors import ProbeError
from probe.generate.executors import Executor, JobOutcome, plan_batches
from probe.planning.job import Job
from probe.run.folder import RunDir
from probe.run.records import JobResult
from probe.store.images import ImageStore, link_or_copy, verify_png

log = logging.getLogger(__name__)

#: Threads writing a batch's PNGs: fsync waits on the disk, not the CPU, so a few overlap well.
WRITERS = max(2, min(8, os.cpu_count() or 1))


def pending_jobs(jobs: Sequence[Job], results: dict[str, JobResult], store: ImageStore, run: RunDir) -> list[Job]:
    """One job per key still to generate; keys already in the store are linked and logged as cached.

    What is reused is checked first (`verify_png`: whole, CRCs right, its own key): a bad image in the run
    folder or the store is moved aside, its scores and features are forgotten, and it is generated again.
    """
    todo: dict[str, Job] = {}
    cached: list[JobResult] = []
    bad: set[str] = set()
    for job in jobs:
        key = job.key
        if key in todo or key in bad:
            if key in bad:
                todo[key] = job
            continue
        here = run.image_path(key)
        if key in results and results[key].status != "failed" and here.is_file():
            if verify_png(here, key) is None:
                continue
            here.unlink()  # a hard link to the store's file, or a copy: either way not to be trusted
        if store.has(key):
            problem = store.verify(key)
            if problem is None:
                link_or_copy(store.path(key), here)
                if key not in results or results[key].status == "failed":
                    cached.append(JobResult(key=key, status="cached"))
                    results[key] = cached[-1]
                continue
            store.quarantine(key, problem)
            bad.add(key)
        elif key in results and results[key].status != "failed":
            bad.add(key)  # logged as made, but its image is gone or bad: its scores must not be reused either
        todo[key] = job
    run.append_results(cached)
    if bad:
        _forget(bad, {job.probe for job in jobs if job.key in bad}, store, run)
    return list(todo.values())


def _forget(keys: set[str], probes: set[str], store: ImageStore, run: RunDir) -> None:
    """Scores and features of images found bad: in the run's scores.parquet and the cross-run caches."""
    from probe.store.features import FeatureCache
    from probe.store.score_cache import ScoreCache
    from probe.store.tables import ScoresTable

    features, scores = FeatureCache(store.root), ScoreCache(store.root)
    features.forget(keys)
    scores.forget_keys(keys)
    features.close()
    scores.close()
    ScoresTable(run.path).forget(keys, probes)
    log.warning("%d image(s) were bad and are generated again; their scores and features are recomputed", len(keys))


def generate_all(todo: Sequence[Job], init_images: dict[str, bytes], store: ImageStore, run: RunDir,
                 executor: Executor, batch_size: int, progress: Any,
                 on_durable: Callable[[list[JobResult]], None] | None = None) -> None:
    """Hand the executor every batch; store, link and log each batch's outcomes as they come (single writer).

    A batch's PNGs are written by `WRITERS` threads at once (the fsyncs overlap), and the batch is logged
    only when all of them are durable, in the order the executor returned the batches; then `on_durable` gets
    its results (the scorer working beside generation).
    """
    pending = {job.key for job in todo}
    outcomes = executor.run(plan_batches(todo, batch_size), init_images, progress)
    try:
        with ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="probe-write") as writers:
            for batch in outcomes:
                stored = _store_batch(batch, pending, store, run, writers)
                run.append_results(stored)  # after its PNGs are durable
                if on_durable is not None:
                    on_durable(stored)
                progress.advance(len(batch))
    finally:
        close = getattr(outcomes, "close", None)  # stop a generator-based executor (and its workers) now
        if close is not None:
            close()
    if pending:  # an executor that skipped jobs: say so now, not as an unexplained "not generated" later
        log.warning("the executor returned no outcome for %d job(s); they are recorded as failed", len(pending))
        run.append_results([JobResult(key=key, status="failed", error="executor returned no outcome")
                            for key in sorted(pending)])


def _store_batch(outcomes: Sequence[JobOutcome], pending: set[str], store: ImageStore, run: RunDir,
                 writers: ThreadPoolExecutor) -> list[JobResult]:
    """Write a batch's PNG bytes into the store (atomic, fsynced), link them into the run folder; its results.

    Every key is checked first: only a key the driver asked for, once, so an executor that repeats or invents
    a key cannot double or mislabel an image. The bytes are stored as they came (the executor encoded them).
    """
    keys = [outcome.key for outcome in outcomes]
    unexpected = [key for key in keys if key not in pending]
    if unexpected or len(set(keys)) != len(keys):
        raise RuntimeError(f"executor returned {len(keys)} outcomes with keys not asked for or repeated: "
                           f"{[key[:12] for key in unexpected] or 'a repeated key'}")
    pending.difference_update(keys)
    written = list(writers.map(lambda outcome: _store_one(outcome, store, run), outcomes))
    results = [r for r in written if isinstance(r, JobResult)]
    problems = [r for r in written if not isinstance(r, JobResult)]
    if problems:  # disk full, read-only cache: stop cleanly; what was written is logged and kept
        run.append_results(results)
        raise problems[0]
    return results


def _store_one(outcome: JobOutcome, store: ImageStore, run: RunDir) -> JobResult | ProbeError:
    """One outcome stored and linked: its result, or the ProbeError that must stop the run (raised by the caller,
    after the batch's other results are logged)."""
    if outcome.png is None:
        return JobResult(key=outcome.key, status="failed", error=outcome.error)
    try:
        stored = store.put_bytes(outcome.key, outcome.png)
    except ValueError as exc:  # bytes that are not a PNG: that job fails, the batch's others are kept
        return JobResult(key=outcome.key, status="failed", error=f"ValueError: {exc}")
    except OSError as exc:
        return ProbeError(f"cannot write {outcome.key[:12]} into the image cache ({exc}); fix that and run the "
                          "same command again to resume")
    try:
        link_or_copy(stored, run.image_path(outcome.key))
    except OSError as exc:
        return ProbeError(f"cannot write into the run folder {run.path} ({exc}); fix that and run the same "
                          "command again to resume")
    return JobResult(key=outcome.key, status="generated", seconds=outcome.seconds, device=outcome.device)


