"""`--executor ray`: generation on Ray Core actors, one per GPU (or k CPUs), driven by `probe.generate.dispatch`.

Ray is imported only here, and only when this executor is chosen (`pip install probe[ray]`). Each actor
holds one pipeline at a time (loaded on its first batch of that pipeline), encodes its PNGs itself and
returns them as bytes; the driver writes them (the single writer, `probe.run.writer`). Actors are made with
`max_restarts=0, max_task_retries=0`: Ray's own retries would replay calls in another order and fail queued
calls fast while an actor restarts, so the dispatcher re-sends lost batches and replaces dead actors itself.

On start each actor reports its fingerprint: probe's version, GENERATION_VERSION and the torch, diffusers and
transformers versions, which decide pixels but are not in the image keys; an actor whose fingerprint differs
from the driver's is refused, with the difference named. Its device name is recorded per job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from probe.errors import ProbeError, UsageError
from probe.generate.dispatch import Dispatcher, SystemFailure
from probe.generate.executors import (
    BatchFit,
    GroupProgress,
    InitImages,
    JobOutcome,
    decode_init_images,
    device_name,
    encode_made,
    generate_batch,
    release_memory,
)
from probe.planning.job import GENERATION_VERSION, Job

log = logging.getLogger(__name__)

#: What must be equal on the driver and every worker (the device name may differ, with a warning).
MATCHED = ("probe", "generation_version", "torch", "diffusers", "transformers")
START_TIMEOUT_S = 300.0  # an actor the cluster cannot place (no free GPU) is given up after this


def fingerprint(device: str) -> dict[str, str]:
    """The libraries that decide a generated image's pixels, and the device that made it."""
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {"probe": version("probe"), "generation_version": GENERATION_VERSION, "torch": version("torch"),
            "diffusers": version("diffusers"), "transformers": version("transformers"),
            "device": device_name(device)}


def mismatch(expected: dict[str, str], found: dict[str, str]) -> list[str]:
    """The fingerprint fields that differ, as 'diffusers 0.30.0 (driver: 0.31.0)'."""
    return [f"{name} {found.get(name)} (driver: {expected.get(name)})" for name in MATCHED
            if found.get(name) != expected.get(name)]


class GenerationWorker:
    """One generation actor: a pipeline at a time, batches in, `JobOutcome`s (PNG bytes) out."""

    def __init__(self, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.adapter: Any = None
        self.pipeline: tuple[object, ...] | None = None
        self.fit = BatchFit()

    def fingerprint(self) -> dict[str, str]:
        return fingerprint(self.device)

    def pid(self) -> int:
        """This actor's process id (the tests kill it to prove a death is survived)."""
        return os.getpid()

    def generate(self, batch: Sequence[Job], init_images: InitImages) -> list[JobOutcome]:
        from probe.generate.adapter import PipelineAdapter

        key = batch[0].pipeline_key
        if key != self.pipeline:
            self.adapter = self.pipeline = None
            release_memory()  # one pipeline resident: the last is gone before the next loads
            self.adapter = PipelineAdapter.for_job(batch[0], self.device)
            self.pipeline, self.fit = key, BatchFit()
        made = generate_batch(self.adapter, batch, decode_init_images(init_images, batch), self.fit)
        name = device_name(self.device)
        return [outcome.model_copy(update={"device": name}) for outcome in encode_made(made)]


@dataclass
class _Actor:
    handle: Any
    fingerprint: dict[str, str]


class RayBackend:
    """The dispatcher's backend on Ray Core: actors started and checked, calls sent and awaited."""

    def __init__(self, actor_class: Any, resources: dict[str, float], threads: int, init_ref: Any,
                 expected: dict[str, str], start_timeout: float = START_TIMEOUT_S) -> None:
        self.actor_class = actor_class
        self.resources = resources
        self.threads = threads
        self.init_ref = init_ref
        self.expected = expected
        self.start_timeout = start_timeout
        self.started: list[_Actor] = []

    def start_worker(self) -> _Actor:
        import ray

        handle = self.actor_class.options(max_restarts=0, max_task_retries=0, **self.resources).remote(self.threads)
        try:
            found = ray.get(handle.fingerprint.remote(), timeout=self.start_timeout)
        except ray.exceptions.GetTimeoutError:
            ray.kill(handle)
            raise ProbeError(f"no Ray worker with {self.resources} could start within {self.start_timeout:.0f} s: "
                             "the cluster has no free resources of that kind (see `ray status`)") from None
        differences = mismatch(self.expected, found)
        if differences:
            ray.kill(handle)
            raise ProbeError(f"refused a Ray worker on {found.get('device')}: its {', '.join(differences)}. Keys do "
                             "not name library versions, so every node must run the driver's versions: install "
                             "the same probe, torch, diffusers and transformers there")
        actor = _Actor(handle, found)
        self.started.append(actor)
        return actor

    def submit(self, worker: _Actor, batch: Sequence[Job]) -> Any:
        return worker.handle.generate.remote(list(batch), self.init_ref)

    def wait(self, calls: Sequence[Any], timeout: float) -> list[tuple[Any, list[JobOutcome] | BaseException]]:
        import ray

        ready, rest = ray.wait(list(calls), num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        finished: list[tuple[Any, list[JobOutcome] | BaseException]] = []
        for ref in ready:
            try:
                finished.append((ref, ray.get(ref)))
            except ray.exceptions.RayTaskError as exc:  # the call raised: an application error
                finished.append((ref, _cause(exc)))
            except ray.exceptions.RayError as exc:  # the actor died, its node was lost, its object was lost
                finished.append((ref, SystemFailure(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")))
        return finished

    def stop_worker(self, worker: _Actor) -> None:
        import ray

        try:
            ray.kill(worker.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            log.debug("actor already gone", exc_info=True)


def _cause(exc: Any) -> BaseException:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else RuntimeError(str(exc).splitlines()[0])


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail at once, naming the fix, when nothing accepts connections at the cluster's HOST:PORT."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address!r}: use HOST:PORT (the head's `ray start --head --port PORT`) or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ProbeError(f"cannot reach the Ray cluster at {address} ({exc}); start it with `ray start --head "
                         f"--port {port}` on {host}, or check the address and firewall") from None


def _node_problems(jobs: Sequence[Job]) -> list[str]:
    """Run on one node: what it lacks to load each pipeline (probe.generate.loading.job_problems)."""
    from probe.generate.loading import job_problems

    problems: list[str] = []
    for job in jobs:
        problems += [p for p in job_problems(job) if p not in problems]
    return problems


#: The part of a GPU a generation worker asks Ray for: more than half (so one worker per GPU), leaving the rest
#: for the metric actor that scores beside it (probe.score.ray_device.METRIC_GPU_SHARE, the complement).
GENERATION_GPU_SHARE = 0.75


class RayExecutor:
    """Runs batches on Ray actors; `connect()` first (the driver plans for `device`, the cluster's)."""

    def __init__(self, address: str | None = None, workers: int | None = None, actor_class: Any = None,
                 start_timeout: float = START_TIMEOUT_S, stall_seconds: float = 900.0) -> None:
        self.address = address
        self.requested = workers
        self.actor_class = actor_class
        self.start_timeout = start_timeout
        self.stall_seconds = stall_seconds
        self.device = "cpu"
        self.workers = 0
        self.dispatcher: Dispatcher[Any, Any] | None = None
        self.backend: RayBackend | None = None
        self.deaths = 0  # workers lost in closed runs (the live dispatcher counts its own)
        self.recovered_at: list[float] = []  # when batches that lost their worker were yielded (Dispatcher)
        self._started_ray = False

    def connect(self) -> RayExecutor:
        """Start a local Ray (no `--address`) or join a cluster; decide the device and worker count from it."""
        try:
            import ray
        except ImportError:
            raise UsageError("--executor ray needs Ray: pip install 'probe[ray]'") from None
        if not ray.is_initialized():
            if self.address and self.address != "auto":
                _check_reachable(self.address)  # ray.init retries an address nobody listens on for minutes
            try:
                if self.address:
                    ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
                else:  # "local": never join a stale cluster left in Ray's temp folder
                    ray.init(address="local", include_dashboard=False, log_to_driver=False,
                             logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ProbeError(f"cannot reach the Ray cluster at {self.address or 'local'}: {exc}. Start it with "
                                 "`ray start --head --port PORT`; a cluster with token authentication (Ray's default) needs the "
                                 "same RAY_AUTH_TOKEN (and RAY_AUTH_MODE=token) here") from exc
            self._started_ray = True
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        self.device = "cuda" if gpus else "cpu"
        self.workers = self.requested or (gpus if gpus else max(1, cpus // 2))
        if self.requested and gpus and self.requested > gpus:
            self.close()
            raise UsageError(f"--workers {self.requested}: the cluster has {gpus} GPU(s), one worker each")
        return self

    def _resources(self) -> tuple[dict[str, float], int]:
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 1))
        if self.device == "cuda":
            return {"num_gpus": GENERATION_GPU_SHARE, "num_cpus": 1}, 1
        threads = max(1, cpus // self.workers)
        return {"num_cpus": threads}, threads

    def start(self) -> Dispatcher[Any, Any]:
        """Start and check the workers: a refused or unplaceable worker stops the run before any run folder."""
        import ray

        if self.workers == 0:
            self.connect()
        if self.dispatcher is None:
            actor_class = ray.remote(self.actor_class or GenerationWorker)
            resources, threads = self._resources()
            self.backend = backend = RayBackend(actor_class, resources, threads, None, expected=fingerprint("cpu"),
                                                start_timeout=self.start_timeout)
            dispatcher = Dispatcher(backend, self.workers, depth=2, replacements=max(8, 4 * self.workers),
                                    stall_seconds=self.stall_seconds)
            try:
                dispatcher.start()
            except BaseException:
                dispatcher.close()
                raise
            self.dispatcher = dispatcher
            names = sorted({actor.fingerprint["device"] for actor in backend.started})
            if len(names) > 1:
                log.warning("this run mixes devices (%s): per-image seconds differ between them, and so may the "
                            "last bits of pixels", ", ".join(names))
        return self.dispatcher

    def run(self, batches: Sequence[Sequence[Job]], init_images: InitImages,
            progress: GroupProgress | None = None) -> Iterator[list[JobOutcome]]:
        import ray

        jobs = sum(len(batch) for batch in batches)
        if not jobs:
            return iter(())
        dispatcher = self.start()
        assert self.backend is not None
        self.backend.init_ref = ray.put(dict(init_images))  # sent to the object store once, read by every call
        if progress is not None:
            progress.group(f"{self.workers} Ray worker(s) on {self.device}", jobs)
        return dispatcher.run(batches)

    def preflight(self, jobs: Sequence[Job]) -> list[str]:
        """What each node lacks to load these jobs' pipelines (a task per node, before any run folder exists)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if self.workers == 0:
            self.connect()
        firsts = list({job.pipeline_key: job for job in jobs}.values())
        if not firsts:
            return []
        check = ray.remote(num_cpus=0)(_node_problems)
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        calls = [(node.get("NodeManagerAddress", "?"),
                  check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                  .remote(firsts)) for node in nodes]
        problems: list[str] = []
        for address, call in calls:
            for problem in ray.get(call, timeout=self.start_timeout):
                problems.append(f"on node {address}: {problem}")
        return problems

    def describe(self) -> dict[str, object]:
        """What the manifest records about where the images were made."""
        devices = sorted({a.fingerprint["device"] for a in self.backend.started}) if self.backend else []
        return {"executor": "ray", "address": self.address or "local", "workers": self.workers,
                "generation_device": self.device, "worker_devices": devices}

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for tests and for people who want to watch them)."""
        import ray

        if self.dispatcher is None:
            return []
        return [ray.get(w.handle.handle.pid.remote()) for w in self.dispatcher.workers if w.alive]

    def release(self) -> None:
        """Stop the generation workers (their resources go to scoring); Ray itself stays up until `close`."""
        if self.dispatcher is not None:
            self.deaths += self.dispatcher.deaths
            self.recovered_at += self.dispatcher.recovered_at
            self.dispatcher.close()
            self.dispatcher = None

    def close(self) -> None:
        """Stop the workers and, if this executor started Ray, Ray itself."""
        self.release()
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False
