"""Scoring beside generation: per-image metrics score each batch once its PNGs are durable, set metrics score
a group once all of its images (and its reference's) are.

The writer hands each logged batch to `StreamingScorer.offer`; a background thread takes what has arrived
(waiting for `MIN_IMAGES` so CLIP batches are not tiny) and runs the same scoring pass the end of the run runs,
on those images only, into the same score table. So on a GPU the device metrics fill the gaps between pipeline
calls, the CPU metrics run in their worker processes, and when generation ends only the last batches and the
last groups are left to score. Generation never waits for scoring: `offer` only adds keys to a set.

The run's final pass (probe.run.driver.score_and_aggregate) still runs over everything: it reuses every row
this thread wrote and does what it did not (the last images, groups completed at the end, anything that failed
here). Failures met here are not recorded: the final pass meets them again and records them once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from probe.planning.job import Job
from probe.run.folder import RunDir
from probe.run.records import JobResult

if TYPE_CHECKING:
    from probe.run.driver import Scoring
    from probe.store.tables import ScoresTable

log = logging.getLogger(__name__)

#: New durable images a pass waits for (unless generation pauses for `MAX_WAIT` seconds, or ends).
MIN_IMAGES = 16
MAX_WAIT = 2.0


class StreamingScorer:
    """A thread scoring durable images while the run generates; `close()` stops it between chunks."""

    def __init__(self, run: RunDir, jobs: Sequence[Job], scoring: Scoring, sink: ScoresTable,
                 ready: set[str], progress: Any) -> None:
        self._run = run
        self._scoring = scoring
        self._sink = sink
        self._progress = progress
        self._planned = run.jobs_frame(jobs, None)
        self._groups: dict[tuple[object, ...], set[str]] = {}  # probe x model x steps x strength -> keys
        for job in jobs:
            self._groups.setdefault((job.probe, job.model, job.steps, job.strength), set()).add(job.key)
        self._sets = [p for p in scoring.prepared if _is_set(p)]
        self._images = [p for p in scoring.prepared if not _is_set(p)]
        self._ready: set[str] = set()
        self._fresh: set[str] = set(ready)  # images there before this run generated anything are scored first
        self._complete: set[tuple[object, ...]] = set()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="probe-score-stream", daemon=True)
        self._thread.start()
        if scoring.pool is not None:
            scoring.pool.start()  # worker start-up overlaps the pipeline's loading

    def offer(self, results: Sequence[JobResult]) -> None:
        """A batch is durable and logged: its images may be scored."""
        keys = {r.key for r in results if r.status != "failed"}
        if keys:
            with self._cond:
                self._fresh |= keys
                self._cond.notify()

    def close(self, wait: bool = True) -> None:
        """Stop after the chunk in hand (what it finished is kept); wait for the thread, or (on an interrupt,
        when a chunk of OCR in the workers could take a minute) give it a few seconds, then leave it: it is a
        daemon thread and every chunk it hands over is written atomically."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(None if wait else 5.0)

    def _stopping(self) -> bool:
        return self._closing

    def _take(self) -> tuple[set[str], set[str]] | None:
        """(new keys, all ready keys) once enough new images are there; None when closing."""
        with self._cond:
            since = time.monotonic()
            while not self._closing:
                waited = time.monotonic() - since
                if len(self._fresh) >= MIN_IMAGES or (self._fresh and waited >= MAX_WAIT):
                    break
                self._cond.wait(timeout=max(0.05, MAX_WAIT - waited))
            if self._closing:
                return None
            fresh, self._fresh = self._fresh, set()
            self._ready |= fresh
            return fresh, set(self._ready)

    def _loop(self) -> None:
        if self._scoring.ctx.device == "cpu":
            import torch

            # Thread-local (OpenMP's per-thread setting): generation keeps its threads. Two OpenMP teams of all
            # the cores, one per thread, spin against each other: measured 2x slower on 2 cores than either alone.
            torch.set_num_threads(1)
        try:
            while (taken := self._take()) is not None:
                self._score(*taken)
        except Exception as exc:  # noqa: BLE001 - the final pass scores whatever this thread could not
            if self._closing:  # the run is stopping (Ctrl-C): what failed here is the interruption itself
                log.debug("streaming scorer stopped while closing", exc_info=True)
                return
            log.warning("scoring beside generation stopped (%s: %s); the rest is scored after generation",
                        type(exc).__name__, exc)
            log.debug("streaming scorer failed", exc_info=True)

    def _score(self, fresh: set[str], ready: set[str]) -> None:
        from probe.score.scorer import score_run

        ctx = self._scoring.ctx
        if self._images:
            rows = self._planned[self._planned["key"].isin(fresh)]
            score_run(self._run.path, rows, self._images, ctx, self._progress, sink=self._sink,
                      pool=self._scoring.pool, kinds=frozenset({"image"}), stop=self._stopping,
                      device=self._scoring.device_pool)
        newly = {g for g, keys in self._groups.items() if g not in self._complete and keys <= ready}
        if newly and self._sets and not self._closing:
            self._complete |= newly
            score_run(self._run.path, self._planned, self._sets, ctx, self._progress, sink=self._sink,
                      pool=self._scoring.pool, kinds=frozenset({"set"}), ready=ready, stop=self._stopping,
                      device=self._scoring.device_pool)


def _is_set(prepared: Any) -> bool:
    from probe.score.protocol import SetMetric

    return isinstance(prepared.metric, SetMetric)
