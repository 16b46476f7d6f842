"""CPU-bound metrics (faces, skin tone, OCR) in worker processes, one per core, beside the device metrics.

Why processes and not threads: Haar cascades, the skin-tone pipeline and OCR each spend much of their time in
Python or hold the GIL between native calls, so threads would mostly take turns. A worker builds its metrics
once (the pool's initializer); a task is one chunk of already decoded images (PIL images pickle as raw pixels:
a memory copy, cheaper than decoding the PNG a second time) and comes back as scores, per-image failures and
the chunk's face detections, which the parent adds to its own context so that perceived_gender (CLIP, on the
run's device) uses them instead of detecting every face again. Only metrics that can be built again from their
name in a fresh process go to the pool (`rebuildable`); a metric registered in a notebook stays in-process.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import spawn
from multiprocessing.context import SpawnContext, SpawnProcess
from pathlib import Path
from typing import Any

from probe.score.attempt import Failed, attempt
from probe.score.protocol import ImageItem, ImageMetric, Score, ScoringContext, build_metric, rebuildable

log = logging.getLogger(__name__)

#: A run with fewer images for CPU metrics than this scores them in-process unless told otherwise: starting
#: workers (an interpreter and the metric's libraries each, about 2 s) would cost more than it saves.
POOL_MIN_IMAGES = 32

Task = list[tuple[str, list[ImageItem]]]
"""(metric label, decoded images) for one chunk: every CPU metric's share of it."""

Result = tuple[dict[str, tuple[list[Score], list[Failed]]], dict[str, dict[str, Any]]]
"""Per label, the scores and failures; then the chunk's face detections (probe.score.metrics.faces.take_faces)."""


class _SpawnProcess(SpawnProcess):
    """A spawned worker that does not run the parent's main script again.

    multiprocessing's spawn imports the parent's `__main__` file in every child (as `__mp_main__`), so a
    user's script that calls `run_suite` without an `if __name__ == "__main__":` guard would start the run
    again in each worker. The workers only need probe's own modules, so the main-module entries are left out
    of what the child is told to prepare (no library offers this switch; the stdlib reads the data here).
    """

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        with _PREPARING:
            original = spawn.get_preparation_data

            def without_main(name: str) -> dict[str, Any]:
                data: dict[str, Any] = original(name)
                data.pop("init_main_from_path", None)
                data.pop("init_main_from_name", None)
                return data

            spawn.get_preparation_data = without_main  # type: ignore[assignment]
            try:
                return SpawnProcess._Popen(process_obj)
            finally:
                spawn.get_preparation_data = original  # type: ignore[assignment]


class _SpawnContext(SpawnContext):
    Process = _SpawnProcess  # type: ignore[assignment]


_PREPARING = threading.Lock()


def machine_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class PooledMetric:
    """What a worker needs to build one metric: its label in the pass, catalog name and suite args."""

    label: str
    name: str
    args: dict[str, Any]


def cpu_bound(metric: object) -> bool:
    """Whether a metric's catalog record (its `info`) says it is pure CPU work (faces, skin tone, OCR)."""
    return bool(getattr(getattr(metric, "info", None), "cpu_bound", False))


def poolable(name: str, metric: object) -> bool:
    """Whether a metric may run in a worker: CPU-bound by its catalog record and buildable by name there."""
    return cpu_bound(metric) and rebuildable(name)


class CpuPool:
    """A lazily started pool of `workers` processes holding the pass's CPU metrics; `workers=0` never starts."""

    def __init__(self, metrics: list[PooledMetric], ctx: ScoringContext, workers: int | None = None) -> None:
        self.metrics = {m.label: m for m in metrics}
        self.base_dir = ctx.base_dir
        self.cache_root = ctx.features.cache_root
        self.workers = machine_cores() if workers is None else max(0, workers)
        self._pool: ProcessPoolExecutor | None = None
        self.broken = False

    def usable(self, labels: set[str]) -> bool:
        """Whether a pass should send these metrics to the workers (all of them pooled, the pool working)."""
        return bool(labels) and labels <= set(self.metrics) and self.workers > 0 and not self.broken

    def start(self) -> None:
        """Start the workers now (their interpreters and metrics take seconds), so that they are ready by the
        time the first images are: the scorer beside generation calls this while the pipeline loads."""
        if self.workers > 0 and self.metrics and not self.broken:
            self.submit([])

    def submit(self, task: Task) -> Future[Result]:
        if self._pool is None:
            # spawn, not fork: the parent runs torch and generation threads, which a forked child would inherit
            # in whatever state they were in.
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=_SpawnContext(),
                initializer=_start_worker, initargs=(list(self.metrics.values()), self.base_dir, self.cache_root))
            log.info("scoring CPU metrics in %d worker processes", self.workers)
        return self._pool.submit(_score_task, task)

    def close(self, wait: bool = True) -> None:
        """Stop the workers: what they have not started is cancelled; `wait` for the tasks in hand, or (after an
        interrupt) end the workers at once rather than let a chunk of OCR hold the exit for a minute."""
        if self._pool is not None:
            if not wait:
                self.broken = True  # what the workers had is abandoned on purpose: not a failure to report
                # ProcessPoolExecutor has no public way to end running tasks before Python 3.14's
                # terminate_workers(); its process table is the only handle on them.
                for process in list(getattr(self._pool, "_processes", {}).values()):
                    process.terminate()
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None


#: The worker process's metrics and context, built once by `_start_worker`.
_WORKER: dict[str, Any] = {}


def _start_worker(metrics: list[PooledMetric], base_dir: Path, cache_root: Path) -> None:
    """Build the metrics once per worker, each library on one thread (the other workers have the other cores)."""
    import signal

    import cv2

    from probe.store.features import FeatureCache

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the workers
    cv2.setNumThreads(1)
    ctx = ScoringContext(features=FeatureCache(cache_root), device="cpu", base_dir=base_dir, cpu_threads=1)
    _WORKER["ctx"] = ctx
    _WORKER["metrics"] = {m.label: build_metric(m.name, m.args) for m in metrics}


def _score_task(task: Task) -> Result:
    from probe.score.metrics.faces import take_faces

    ctx: ScoringContext = _WORKER["ctx"]
    results: dict[str, tuple[list[Score], list[Failed]]] = {}
    keys: set[str] = set()
    for label, images in task:
        metric: ImageMetric = _WORKER["metrics"][label]
        results[label] = attempt(metric, images, ctx)
        keys.update(image.key for image in images)
    return results, take_faces(ctx, keys)
