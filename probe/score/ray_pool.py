"""CPU-bound metrics (faces, skin tone, OCR) on Ray actors across a cluster: `--executor ray`'s `CpuPool`.

The same tasks as the local process pool (`probe.score.cpu_pool`): a chunk of decoded images per task (PIL
images pickle as raw pixels, so a node never needs the run folder), scores, per-image failures and face boxes
back. Each actor builds its metrics once (one CPU each, libraries on one thread). A Ray future that fails (an
actor lost with its node) breaks the pool and the pass finishes in-process, as with a broken process pool.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Any

from probe.score.cpu_pool import CpuPool, PooledMetric, Result, Task, _score_task, _start_worker
from probe.score.protocol import ScoringContext

log = logging.getLogger(__name__)


class CpuActor:
    """One scoring actor: the pass's CPU metrics, built once."""

    def __init__(self, metrics: list[PooledMetric], base_dir: Any, cache_root: Any) -> None:
        _start_worker(metrics, base_dir, cache_root)

    def score(self, task: Task) -> Result:
        return _score_task(task)


def cluster_cpu_workers() -> int:
    """The cluster's CPUs minus one (for the driver), at least one."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)


class RayCpuPool(CpuPool):
    """CPU metrics on `workers` Ray actors (default: the cluster's CPUs minus one), started on first use."""

    def __init__(self, metrics: list[PooledMetric], ctx: ScoringContext, workers: int | None = None) -> None:
        super().__init__(metrics, ctx, cluster_cpu_workers() if workers is None else workers)
        self._actors: list[Any] = []
        self._turn = 0

    def submit(self, task: Task) -> Future[Result]:
        import ray

        if not self._actors:
            actor = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(CpuActor)
            metrics = list(self.metrics.values())
            self._actors = [actor.remote(metrics, self.base_dir, self.cache_root) for _ in range(self.workers)]
            log.info("scoring CPU metrics on %d Ray actors", self.workers)
        actor = self._actors[self._turn % len(self._actors)]
        self._turn += 1
        future: Future[Result] = actor.score.remote(task).future()
        return future

    def close(self, wait: bool = True) -> None:
        import ray

        if not wait:
            self.broken = True
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone with its node
                log.debug("CPU actor already gone", exc_info=True)
        self._actors = []
