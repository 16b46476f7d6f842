"""The dispatch loop of a many-worker executor: batches to workers, results back, worker deaths survived.

Kept apart from Ray (`probe.generate.ray_executor` is its one backend) so its rules are tested fast with a
fake backend, and because Ray's own retries cannot do this: an actor's queued calls fail at once while it
restarts, and an actor of a lost node never restarts (ray issues #44719, and the throughput issue's notes).
The driver therefore owns every retry:

- a call that fails for a *system* reason (the worker died or is unreachable) is sent again to a live worker,
  and the dead worker is replaced while the replacement budget lasts;
- a batch that has failed that way twice is split into single jobs; a single job that kills its worker twice
  is recorded failed ("worker died"), so one poison prompt cannot stop a study;
- an *application* error from a call (a pipeline that raises outside the per-job fallback) splits the batch
  into single jobs, and a single job's error is recorded as its failure, as the local executor does;
- results can arrive twice (Ray is at-least-once): each key is yielded once, the first time;
- a watchdog fails what is left when no worker is alive and none can be started, or nothing has finished
  for `stall_seconds`.

Workers get at most `depth` calls each, preferably batches of the pipeline they last ran, then of one no
other worker holds (a model switch reloads a pipeline: seconds to minutes).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from probe.generate.executors import JobOutcome
from probe.planning.job import Job

log = logging.getLogger(__name__)

W = TypeVar("W")  # a worker handle
C = TypeVar("C")  # a call in flight

WORKER_DIED = "worker died"


class SystemFailure(Exception):
    """A call was lost with its worker (killed, out of memory, node gone): the batch may be sent again."""


class Backend(Protocol[W, C]):
    """What the dispatch loop needs from a cluster; `probe.generate.ray_executor.RayBackend` is the real one."""

    def start_worker(self) -> W:
        """A new worker, ready for calls (fingerprint checked); raises when none can be started."""
        ...

    def submit(self, worker: W, batch: Sequence[Job]) -> C:
        """Send one batch to a worker; returns the call, which `wait` reports on."""
        ...

    def wait(self, calls: Sequence[C], timeout: float) -> list[tuple[C, list[JobOutcome] | BaseException]]:
        """The calls that finished (at least one unless `timeout` passed), each with its outcomes or error;
        a `SystemFailure` error means the worker was lost."""
        ...

    def stop_worker(self, worker: W) -> None:
        """Let a worker go (it died, or the run is over)."""
        ...


@dataclass
class _Entry:
    """A batch waiting or in flight, with how many times a worker died running it."""

    jobs: list[Job]
    deaths: int = 0


@dataclass
class _Worker(Generic[W, C]):
    handle: W
    calls: dict[Any, _Entry] = field(default_factory=dict)
    holds: tuple[object, ...] | None = None  # the pipeline it last ran
    alive: bool = True


class Dispatcher(Generic[W, C]):
    """Runs batches on a backend's workers; yields each batch's outcomes once (see the module docstring)."""

    def __init__(self, backend: Backend[W, C], workers: int, depth: int = 2, replacements: int | None = None,
                 stall_seconds: float = 900.0, tick: float = 1.0) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.backend = backend
        self.size = workers
        self.depth = depth
        self.replacements = 2 * workers if replacements is None else replacements
        self.stall_seconds = stall_seconds
        self.tick = tick
        self.workers: list[_Worker[W, C]] = []
        self.deaths = 0  # worker deaths seen (for the note and the tests)
        self.recovered_at: list[float] = []  # time.monotonic() when a batch that lost its worker was yielded
        # Replacements start in a thread: on a cluster that lost a node, a new actor may wait minutes for room,
        # and the live workers must not wait with it.
        self._starter: ThreadPoolExecutor | None = None
        self._starting: list[Future[W]] = []

    def start(self) -> None:
        """Start the workers (the backend checks each one); raises when not one can be started."""
        while len(self.workers) < self.size:
            self.workers.append(_Worker(self.backend.start_worker()))

    def close(self) -> None:
        for worker in self.workers:
            self.backend.stop_worker(worker.handle)
        self.workers.clear()
        for future in self._starting:  # a replacement still starting is stopped once it is up
            if not future.cancel():
                future.add_done_callback(self._stop_started)
        self._starting.clear()
        if self._starter is not None:
            self._starter.shutdown(wait=False)
            self._starter = None

    def _stop_started(self, future: Future[W]) -> None:
        if future.exception() is None:
            self.backend.stop_worker(future.result())

    def run(self, batches: Sequence[Sequence[Job]]) -> Iterator[list[JobOutcome]]:
        """Outcomes per finished batch (a split batch yields per job), every planned key exactly once."""
        if not self.workers:
            self.start()
        queue = deque(_Entry(list(batch)) for batch in batches if batch)
        owner: dict[Any, _Worker[W, C]] = {}
        yielded: set[str] = set()
        last_progress = time.monotonic()
        while queue or owner:
            self._fill(queue, owner)
            if not owner and self._starting:  # every worker is lost; replacements are on their way
                wait_for(self._starting, timeout=max(self.tick, 0.01), return_when=FIRST_COMPLETED)
                if time.monotonic() - last_progress > self.stall_seconds:
                    yield from self._give_up(queue, owner, yielded,
                                             f"no worker could start for {self.stall_seconds:.0f} s")
                    return
                continue
            if not owner:  # work waits and no worker could take it
                yield from self._give_up(queue, owner, yielded, "no worker is alive and none could be started")
                return
            finished = self.backend.wait(list(owner), self.tick)
            if not finished:
                if time.monotonic() - last_progress > self.stall_seconds:
                    yield from self._give_up(queue, owner, yielded,
                                             f"no batch finished for {self.stall_seconds:.0f} s")
                    return
                continue
            last_progress = time.monotonic()
            for call, result in finished:
                worker = owner.pop(call)
                entry = worker.calls.pop(call)
                outcomes = self._settle(worker, entry, result, queue)
                fresh = []
                for outcome in outcomes:  # at-least-once: a key is yielded the first time only
                    if outcome.key not in yielded:
                        yielded.add(outcome.key)
                        fresh.append(outcome)
                if fresh:
                    if entry.deaths:
                        self.recovered_at.append(time.monotonic())
                    yield fresh

    def _fill(self, queue: deque[_Entry], owner: dict[Any, _Worker[W, C]]) -> None:
        """Give each live worker batches up to `depth`, preferring the pipeline it holds."""
        self._replace_dead()
        progress = True
        while queue and progress:
            progress = False
            for worker in self.workers:
                if not worker.alive or len(worker.calls) >= self.depth or not queue:
                    continue
                held = {w.holds for w in self.workers if w.alive and w is not worker}
                entry = _take(queue, worker.holds, held)
                try:
                    call = self.backend.submit(worker.handle, entry.jobs)
                except SystemFailure:
                    queue.appendleft(entry)
                    self._lose(worker)
                    continue
                worker.calls[call] = entry
                worker.holds = entry.jobs[0].pipeline_key
                owner[call] = worker
                progress = True

    def _settle(self, worker: _Worker[W, C], entry: _Entry, result: list[JobOutcome] | BaseException,
                queue: deque[_Entry]) -> list[JobOutcome]:
        """What a finished call means: its outcomes, or the retries its failure calls for (queued)."""
        if not isinstance(result, BaseException):
            asked = {job.key for job in entry.jobs}
            return [o for o in result if o.key in asked]
        if isinstance(result, SystemFailure):
            self._lose(worker)
            entry.deaths += 1
            if entry.deaths < 2:
                queue.appendleft(entry)
                return []
            if len(entry.jobs) == 1:
                job = entry.jobs[0]
                log.warning("job %s killed its worker twice; recorded failed", job.key[:12])
                return [JobOutcome(key=job.key, error=f"{WORKER_DIED} twice running this job: {result}")]
            log.warning("a batch of %d lost its worker twice: its jobs are sent one by one", len(entry.jobs))
            queue.extendleft(_Entry([job]) for job in reversed(entry.jobs))
            return []
        if len(entry.jobs) > 1:  # an application error: each job alone, so one bad job fails alone
            queue.extendleft(_Entry([job]) for job in reversed(entry.jobs))
            return []
        return [JobOutcome.failure(entry.jobs[0].key, result)]

    def _lose(self, worker: _Worker[W, C]) -> None:
        if worker.alive:
            worker.alive = False
            self.deaths += 1
            log.warning("a generation worker was lost (%d so far); its batches are sent to live workers",
                        self.deaths)
            self.backend.stop_worker(worker.handle)

    def _replace_dead(self) -> None:
        """Adopt the replacements that have started; start one (in a thread) for each dead worker with no calls
        left, while the replacement budget lasts."""
        for future in [f for f in self._starting if f.done()]:
            self._starting.remove(future)
            try:
                self.workers.append(_Worker(future.result()))
            except Exception as exc:  # noqa: BLE001 - no node can take it: the others go on, the watchdog decides
                log.warning("could not start a replacement worker: %s", exc)
        kept = []
        for worker in self.workers:
            if worker.alive or worker.calls:
                kept.append(worker)
            elif self.replacements > 0:
                self.replacements -= 1
                if self._starter is None:
                    self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="probe-worker-start")
                self._starting.append(self._starter.submit(self.backend.start_worker))
        self.workers = kept

    def _give_up(self, queue: deque[_Entry], owner: dict[Any, _Worker[W, C]], yielded: set[str],
                 why: str) -> Iterator[list[JobOutcome]]:
        jobs = [job for entry in queue for job in entry.jobs]
        jobs += [job for worker in self.workers for entry in worker.calls.values() for job in entry.jobs]
        failed = [JobOutcome(key=job.key, error=f"{WORKER_DIED}: {why}") for job in jobs if job.key not in yielded]
        queue.clear()
        owner.clear()
        if failed:
            log.error("%s: %d job(s) recorded failed; run the same command again to resume", why, len(failed))
            yielded.update(o.key for o in failed)
            yield failed


def _take(queue: deque[_Entry], holds: tuple[object, ...] | None, others: set[tuple[object, ...] | None]) -> _Entry:
    """The next batch for a worker: of the pipeline it `holds`, else of one no other worker holds (so each
    pipeline is loaded by as few workers as can keep busy), else the first."""
    for wanted in (lambda key: key == holds, lambda key: key not in others):
        for index, entry in enumerate(queue):
            if wanted(entry.jobs[0].pipeline_key):
                del queue[index]
                return entry
    return queue.popleft()
