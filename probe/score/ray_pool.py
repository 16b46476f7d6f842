"""CPU-bound metrics (faces, skin tone, OCR) on Ray actors across a cluster: `--executor ray`'s `CpuPool`.

The same tasks as the local process pool (`probe.score.cpu_pool`): a chunk of decoded images per task (PIL
images pickle as raw pixels, so a node never needs the run folder), scores, per-image failures and face boxes
back. Each actor builds its metrics once (one CPU each, libraries on one thread). A Ray future that fails (an
actor lost with its node) breaks the pool and the pass finishes in-process, as with a broken process pool.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

from probe.score.cpu_pool import CpuPool, PooledMetric, Result, Task, _score_task, _start_worker
from probe.score.protocol import ImageItem, ScoringContext

log = logging.getLogger(__name__)

Shipped = list[tuple[ImageItem, Any]]
"""Images without their pixels, each with the object-store reference of its pixels (None: not decoded)."""


class Shipper:
    """Decoded images put in Ray's object store once, whichever actors read them (CPU and metric actors).

    A chunk's images go to the CPU actors and to the metric actors in different splits; each decoded image is
    `ray.put` once and both send only its reference. The last `keep` references are held (a few chunks), so the
    store frees an image once no task and no recent chunk needs it.
    """

    def __init__(self, keep: int = 256) -> None:
        self._refs: OrderedDict[int, tuple[Any, Any]] = OrderedDict()  # id(pixels) -> (pixels, ref)
        self._keep = keep
        self._lock = threading.Lock()  # the streaming scorer's thread and the final pass's

    def ship(self, images: Sequence[ImageItem]) -> Shipped:
        import ray

        shipped: Shipped = []
        with self._lock:
            for image in images:
                if image.pixels is None:
                    shipped.append((image, None))
                    continue
                entry = self._refs.get(id(image.pixels))
                if entry is None or entry[0] is not image.pixels:
                    entry = (image.pixels, ray.put(image.pixels))
                    self._refs[id(image.pixels)] = entry
                    while len(self._refs) > self._keep:
                        self._refs.popitem(last=False)
                else:
                    self._refs.move_to_end(id(image.pixels))
                shipped.append((replace(image, pixels=None), entry[1]))
        return shipped


def kill_actors(actors: list[Any], what: str) -> None:
    """End these actors for good (no restart); one already gone with its node is skipped."""
    import ray

    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone with its node
            log.debug("%s actor already gone", what, exc_info=True)


def landed(shipped: Shipped) -> list[ImageItem]:
    """On an actor: the shipped images with their pixels fetched (each distinct reference once)."""
    import ray

    refs = {ref.hex(): ref for _, ref in shipped if ref is not None}
    pixels = dict(zip(refs, ray.get(list(refs.values())), strict=True)) if refs else {}
    return [image if ref is None else replace(image, pixels=pixels[ref.hex()]) for image, ref in shipped]


class CpuActor:
    """One scoring actor: the pass's CPU metrics, built once."""

    def __init__(self, metrics: list[PooledMetric], base_dir: Any, cache_root: Any) -> None:
        _start_worker(metrics, base_dir, cache_root)

    def score(self, task: list[tuple[str, Shipped]]) -> Result:
        return _score_task([(label, landed(shipped)) for label, shipped in task])


def cluster_cpu_workers() -> int:
    """The cluster's CPUs minus one (for the driver), at least one."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)


class RayCpuPool(CpuPool):
    """CPU metrics on `workers` Ray actors (default: the cluster's CPUs minus one), started on first use."""

    def __init__(self, metrics: list[PooledMetric], ctx: ScoringContext, workers: int | None = None,
                 shipper: Shipper | None = None) -> None:
        super().__init__(metrics, ctx, cluster_cpu_workers() if workers is None else workers)
        self.shipper = shipper or Shipper()
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
        shipped = [(label, self.shipper.ship(images)) for label, images in task]
        future: Future[Result] = actor.score.remote(shipped).future()
        return future

    def close(self, wait: bool = True) -> None:
        if not wait:
            self.broken = True
        kill_actors(self._actors, "CPU")
        self._actors = []
