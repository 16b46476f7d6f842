"""Device metrics on Ray metric actors: `--executor ray`'s scoring on the cluster's GPUs.

Which metrics: every rebuildable metric that is not CPU-bound (clip_score, perceived_gender, and the
embeddings behind cmmd, fid and kid). One actor per GPU of the cluster (one on a CPU cluster) builds them once
and takes a share of its GPU (`METRIC_GPU_SHARE`) beside that GPU's generation worker, so images are scored
while the run still generates, as on one machine.

The driver stays the single writer: an actor's feature cache lives in its memory (`RecordingFeatures`) and
every vector it computes comes back with the scores, for the driver to store in its own feature cache. Set
metrics therefore run on the driver: their images' embeddings are computed on the actors first (`fetch`, only
for the images the driver's cache lacks), then the metric's value and jackknife interval come from the cached
vectors, exactly the numbers a local run computes from the same vectors.

A metric actor computes the configuration of every metric it holds when it starts; the driver refuses a
cluster whose configuration differs from its own (another CLIP dtype on another device, another library
version in the config), because scores are reused by configuration id and must mean what the id says.
"""

from __future__ import annotations

import logging
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from probe.errors import ProbeError
from probe.score.attempt import Failed, attempt
from probe.score.cpu_pool import PooledMetric, cpu_bound
from probe.score.labels import resolved_config
from probe.score.protocol import ImageItem, ImageMetric, Score, ScoringContext, SetMetric, build_metric, rebuildable
from probe.score.ray_pool import Shipped, Shipper, kill_actors, landed
from probe.store.features import FeatureCache

log = logging.getLogger(__name__)

#: The part of a GPU a metric actor asks Ray for; a generation worker takes the rest (probe.generate.ray_executor),
#: so each GPU holds one of each.
METRIC_GPU_SHARE = 0.25
#: Vectors a metric actor keeps in memory (prompt embeddings, class prompts, images of the pass in hand).
ACTOR_VECTORS = 16384
#: Images per embedding task sent to an actor (`RayDevicePool.fetch`).
FETCH_CHUNK = 64

Features = dict[str, list[tuple[str, np.ndarray]]]
"""Vectors an actor computed, per extractor id: what the driver stores in its feature cache."""

DeviceTask = tuple[list[tuple[str, Shipped]], dict[str, dict[str, Any]]]
"""(metric label, its images) for one part of a chunk; and the chunk's face detections (for perceived_gender)."""

DeviceResult = tuple[dict[str, tuple[list[Score], list[Failed]]], Features]


class RecordingFeatures(FeatureCache):
    """A feature cache in memory that remembers what it computed, for the driver's cache (never a file)."""

    def __init__(self, keep: int = ACTOR_VECTORS) -> None:
        super().__init__(Path(tempfile.gettempdir()) / "probe-metric-actor")  # never opened: no file is written
        self._vectors: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._new: Features = {}
        self._keep = keep

    def get_many(self, extractor: str, items: Iterable[str]) -> dict[str, np.ndarray]:
        found = {}
        for item in dict.fromkeys(items):
            vector = self._vectors.get((extractor, item))
            if vector is not None:
                self._vectors.move_to_end((extractor, item))
                found[item] = vector
        return found

    def put_many(self, extractor: str, entries: Iterable[tuple[str, np.ndarray]]) -> None:
        for item, vector in entries:
            self._vectors[(extractor, item)] = vector
            self._new.setdefault(extractor, []).append((item, vector))
        while len(self._vectors) > self._keep:
            self._vectors.popitem(last=False)

    def forget(self, items: Iterable[str]) -> None:
        gone = set(items)
        for entry in [entry for entry in self._vectors if entry[1] in gone]:
            del self._vectors[entry]

    def _drop(self, extractor: str, items: list[str], why: str) -> None:
        for item in items:
            self._vectors.pop((extractor, item), None)

    def take_new(self) -> Features:
        """The vectors computed since the last call."""
        new, self._new = self._new, {}
        return new


class _Missing(Exception):  # noqa: N818 - a signal, not an error: which items the driver's cache lacks
    def __init__(self, items: list[str]) -> None:
        super().__init__(f"{len(items)} vectors missing")
        self.items = items


class _LookupOnly(FeatureCache):
    """The driver's feature cache, read only: the first vectors it lacks raise `_Missing` instead of being
    computed, so `fetch` learns which images need a metric actor without running a network on the driver."""

    def __init__(self, cache: FeatureCache) -> None:
        super().__init__(cache.cache_root)
        self._inner = cache

    def get_many(self, extractor: str, items: Iterable[str]) -> dict[str, np.ndarray]:
        return self._inner.get_many(extractor, items)

    def get_or_compute(self, extractor: str, items: Sequence[str], compute: Any) -> np.ndarray:
        found = self._inner.get_many(extractor, items)
        missing = [item for item in dict.fromkeys(items) if item not in found]
        if missing:
            raise _Missing(missing)
        return np.stack([found[item] for item in items]) if items else np.zeros((0, 0))


def scored_configs(metrics: dict[str, ImageMetric | SetMetric], pooled: dict[str, PooledMetric],
                   ctx: ScoringContext) -> dict[str, dict[str, Any]]:
    """Each metric's configuration as probe.score.scorer.prepare_metrics records it."""
    return {label: resolved_config(pooled[label].name, pooled[label].args, metric, ctx)
            for label, metric in metrics.items()}


class DeviceActor:
    """One metric actor: the pass's device metrics built once on its GPU (or CPU), vectors kept in memory."""

    def __init__(self, metrics: list[PooledMetric], clip_model: str, base_dir: Path, all_tiny: bool) -> None:
        import signal

        import ray
        import torch

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        if device == "cpu":
            torch.set_num_threads(1)  # beside generation workers on a CPU cluster: no core of its own
        self.features = RecordingFeatures()
        self.ctx = ScoringContext(features=self.features, device=device, clip_model=clip_model, base_dir=base_dir,
                                  all_tiny=all_tiny, cpu_threads=1)
        self.pooled = {m.label: m for m in metrics}
        self.metrics = {m.label: build_metric(m.name, m.args) for m in metrics}

    def configs(self) -> tuple[str, dict[str, dict[str, Any]]]:
        """This actor's device and its metrics' configurations (models built here, once)."""
        return self.ctx.device, scored_configs(self.metrics, self.pooled, self.ctx)

    def pid(self) -> int:
        import os

        return os.getpid()

    def score(self, task: DeviceTask) -> DeviceResult:
        from probe.score.metrics.faces import add_faces

        parts, faces = task
        add_faces(self.ctx, faces)
        results: dict[str, tuple[list[Score], list[Failed]]] = {}
        for label, shipped in parts:
            metric = self.metrics[label]
            assert isinstance(metric, ImageMetric)
            results[label] = attempt(metric, landed(shipped), self.ctx)
        return results, self.features.take_new()

    def embed(self, label: str, shipped: Shipped) -> Features:
        metric = self.metrics[label]
        assert isinstance(metric, SetMetric)
        metric.embed(landed(shipped), self.ctx)
        return self.features.take_new()


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


class RayDevicePool:
    """Device metrics on metric actors (one per GPU of the cluster, one on a CPU cluster), started by `start`."""

    def __init__(self, metrics: list[PooledMetric], ctx: ScoringContext, expected: dict[str, dict[str, Any]],
                 shipper: Shipper, workers: int | None = None) -> None:
        self.metrics = {m.label: m for m in metrics}
        self.ctx = ctx
        self.expected = expected
        self.shipper = shipper
        self.requested = workers
        self.device = ctx.device
        self.broken = False
        self._actors: list[Any] = []
        self._turn = 0

    def usable(self, labels: set[str]) -> bool:
        return bool(labels) and labels <= set(self.metrics) and not self.broken

    def start(self) -> None:
        """Start the actors and check their configurations against the driver's (raises ProbeError on a mismatch)."""
        import ray

        if self._actors or not self.metrics:
            return
        gpus = cluster_gpus()
        workers = self.requested or max(1, gpus)
        resources = {"num_gpus": METRIC_GPU_SHARE, "num_cpus": 0} if gpus else {"num_cpus": 0}
        actor = ray.remote(max_restarts=2, max_task_retries=2, **resources)(DeviceActor)  # scoring is idempotent
        metrics = list(self.metrics.values())
        self._actors = [actor.remote(metrics, self.ctx.clip_model, self.ctx.base_dir, self.ctx.all_tiny)
                        for _ in range(workers)]
        try:
            found = ray.get([a.configs.remote() for a in self._actors], timeout=600)
        except Exception as exc:
            self.close()
            raise ProbeError(f"the metric actors could not start on the Ray cluster: {type(exc).__name__}: {exc}") from exc
        for device, configs in found:
            self.device = device
            problems = _differences(self.expected, configs)
            if problems:
                self.close()
                raise ProbeError(f"the Ray cluster's metric actors ({device}) configure metrics differently from this "
                                 f"driver ({self.ctx.device}): " + "; ".join(problems) + ". Install the same "
                                 "versions of probe and its libraries on every node, and run the driver with the "
                                 "cluster's device (its scores are recorded under the driver's configuration)")
        log.info("scoring device metrics on %d Ray actor(s) on %s", len(self._actors), self.device)

    def _next(self) -> Any:
        actor = self._actors[self._turn % len(self._actors)]
        self._turn += 1
        return actor

    def score(self, parts: list[list[tuple[str, list[ImageItem]]]],
              faces: list[dict[str, dict[str, Any]]]) -> list[Future[DeviceResult]]:
        """One task per part (a share of a chunk: each metric's images), round robin over the actors."""
        self.start()
        futures = []
        for part, part_faces in zip(parts, faces, strict=True):
            task: DeviceTask = ([(label, self.shipper.ship(images)) for label, images in part], part_faces)
            futures.append(self._next().score.remote(task).future())
        return futures

    @property
    def workers(self) -> int:
        """Actors to split a chunk over (as many as will start)."""
        return len(self._actors) or self.requested or max(1, cluster_gpus())

    def fetch(self, label: str, metric: SetMetric, items: Sequence[ImageItem]) -> None:
        """Make sure the driver's feature cache holds `metric`'s vectors of `items`: those it lacks are embedded on
        the actors and stored here. A failure leaves the rest to the driver (a warning says so)."""
        lookup = replace(self.ctx, features=_LookupOnly(self.ctx.features))  # the same loaded models
        try:
            metric.embed(list(items), lookup)
            return
        except _Missing as missing:
            lacking = set(missing.items)
        todo = list({item.key: item for item in items if item.key in lacking}.values())
        if not todo:
            return
        self.start()
        try:
            with ThreadPoolExecutor(4, thread_name_prefix="probe-fetch") as decoders:
                calls = []
                for start in range(0, len(todo), FETCH_CHUNK):
                    images = list(decoders.map(ImageItem.decoded, todo[start:start + FETCH_CHUNK]))
                    calls.append(self._next().embed.remote(label, self.shipper.ship(images)))
                    if len(calls) >= 2 * len(self._actors):
                        self.store(_get(calls.pop(0)))
                for call in calls:
                    self.store(_get(call))
        except Exception as exc:  # noqa: BLE001 - an actor lost with its node: the driver embeds the rest
            self.broken = True
            log.warning("metric actors failed (%s: %s); the rest is scored on this machine", type(exc).__name__, exc)

    def store(self, features: Features) -> None:
        """An actor's vectors, into the driver's feature cache (the driver is the only writer)."""
        for extractor, entries in features.items():
            self.ctx.features.put_many(extractor, entries)

    def actor_pids(self) -> list[int]:
        """Process ids of the metric actors (for tests and for people who want to watch them)."""
        import ray

        return [ray.get(actor.pid.remote()) for actor in self._actors]

    def describe(self) -> dict[str, object]:
        return {"scoring_device": self.device, "metric_actors": len(self._actors)}

    def close(self, wait: bool = True) -> None:
        kill_actors(self._actors, "metric")
        self._actors = []


def _get(call: Any) -> Features:
    import ray

    features: Features = ray.get(call)
    return features


def _differences(expected: dict[str, dict[str, Any]], found: dict[str, dict[str, Any]]) -> list[str]:
    """What differs between two sets of metric configurations, field by field."""
    problems = []
    for label, config in expected.items():
        other = found.get(label, {})
        fields = sorted(k for k in {*config, *other} if config.get(k) != other.get(k))
        if fields:
            shown = ", ".join(f"{k}: {config.get(k)!r} here, {other.get(k)!r} there" for k in fields[:3])
            problems.append(f"{label} ({shown})")
    return problems


def device_poolable(name: str, metric: object) -> bool:
    """Whether a metric goes to the metric actors: rebuildable by name there and not CPU-bound."""
    return not cpu_bound(metric) and rebuildable(name)
