"""The many-worker dispatch loop on a fake backend: lost batches re-sent, split after two deaths, a poison job
recorded failed, duplicates yielded once, work routed to the worker holding its pipeline, the watchdog."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

from probe.generate.dispatch import WORKER_DIED, Dispatcher, SystemFailure
from probe.generate.executors import JobOutcome, plan_batches
from probe.planning.job import Job
from tests.test_executor import make_job


@dataclass
class FakeWorker:
    name: int
    alive: bool = True
    batches: list[list[str]] = field(default_factory=list)  # the prompts of each batch it was sent


@dataclass(eq=False)  # hashed by identity, like Ray's object refs
class FakeCall:
    worker: FakeWorker
    jobs: list[Job]


class FakeBackend:
    """Workers in this process; `verdict(worker, jobs)` says what a call returns: None (images), an exception,
    or "die" (the worker is lost with every call it holds)."""

    def __init__(self, verdict: Callable[[FakeWorker, list[Job]], object] | None = None,
                 can_start: int = 100, duplicate: bool = False) -> None:
        self.verdict = verdict or (lambda worker, jobs: None)
        self.can_start = can_start
        self.duplicate = duplicate
        self.workers: list[FakeWorker] = []
        self.stopped: list[int] = []

    def start_worker(self) -> FakeWorker:
        if len(self.workers) >= self.can_start:
            raise RuntimeError("no resources")
        worker = FakeWorker(len(self.workers))
        self.workers.append(worker)
        return worker

    def submit(self, worker: FakeWorker, batch: Sequence[Job]) -> FakeCall:
        worker.batches.append([job.prompt for job in batch])
        return FakeCall(worker, list(batch))

    def wait(self, calls: Sequence[FakeCall], timeout: float):
        call = calls[0]  # one at a time, oldest first: deterministic
        verdict = self.verdict(call.worker, call.jobs) if call.worker.alive else "die"
        if verdict == "die":
            call.worker.alive = False
            return [(call, SystemFailure("ActorDiedError: killed"))]
        if isinstance(verdict, BaseException):
            return [(call, verdict)]
        outcomes = [JobOutcome(key=job.key, png=b"png " + job.key.encode()) for job in call.jobs]
        return [(call, outcomes + outcomes[:1] if self.duplicate else outcomes)]

    def stop_worker(self, worker: FakeWorker) -> None:
        self.stopped.append(worker.name)


def _jobs(prompts: list[str], model: str = "tiny") -> list[Job]:
    return [make_job(prompt=p, model=model, seed=i) for i, p in enumerate(prompts)]


def _run(backend: FakeBackend, batches: list[list[Job]], workers: int = 2, **kw) -> tuple[list[list[JobOutcome]],
                                                                                          Dispatcher]:
    dispatcher = Dispatcher(backend, workers, tick=0.0, **kw)
    return list(dispatcher.run(batches)), dispatcher


def _keys(batches: list[list[JobOutcome]]) -> list[str]:
    return [o.key for batch in batches for o in batch]


def test_every_batch_is_yielded_once_spread_over_the_workers():
    jobs = _jobs([f"p{i}" for i in range(12)])
    backend = FakeBackend()
    out, _ = _run(backend, plan_batches(jobs, 4))
    assert sorted(_keys(out)) == sorted(j.key for j in jobs)
    assert all(worker.batches for worker in backend.workers) and len(backend.workers) == 2


def test_a_batch_that_arrives_twice_is_yielded_once():
    jobs = _jobs([f"p{i}" for i in range(8)])
    out, _ = _run(FakeBackend(duplicate=True), plan_batches(jobs, 4))
    assert sorted(_keys(out)) == sorted(j.key for j in jobs)


def test_a_batch_lost_with_its_worker_is_sent_to_a_live_one_and_the_worker_replaced():
    jobs = _jobs([f"p{i}" for i in range(8)])
    died = []

    def verdict(worker: FakeWorker, batch: list[Job]) -> object:
        if worker.name == 0 and not died:
            died.append(batch[0].prompt)
            return "die"
        return None

    backend = FakeBackend(verdict)
    out, dispatcher = _run(backend, plan_batches(jobs, 4))
    assert sorted(_keys(out)) == sorted(j.key for j in jobs) and all(o.png for o in sum(out, []))
    assert dispatcher.deaths == 1 and 0 in backend.stopped and len(backend.workers) == 3  # one replacement
    assert sum(died[0] in b for w in backend.workers[1:] for b in w.batches) == 1  # re-sent once, elsewhere


def test_a_poison_job_is_split_out_and_recorded_failed_while_its_batchmates_are_made():
    jobs = _jobs(["ok0", "poison", "ok1", "ok2", "ok3", "ok4"])
    backend = FakeBackend(lambda worker, batch: "die" if any(j.prompt == "poison" for j in batch) else None)
    out, dispatcher = _run(backend, plan_batches(jobs, 3))
    outcomes = {o.key: o for o in sum(out, [])}
    assert sorted(outcomes) == sorted(j.key for j in jobs)
    poison = next(j for j in jobs if j.prompt == "poison")
    assert outcomes[poison.key].error is not None and WORKER_DIED in outcomes[poison.key].error
    assert all(o.png for k, o in outcomes.items() if k != poison.key)
    assert dispatcher.deaths == 4  # the batch twice, then the job alone twice
    singles = [b for w in backend.workers for b in w.batches if b == ["poison"]]
    assert len(singles) == 2


def test_an_application_error_splits_the_batch_and_fails_only_the_bad_job():
    jobs = _jobs(["a", "bad", "c", "d"])
    backend = FakeBackend(lambda worker, batch: ValueError("no") if any(j.prompt == "bad" for j in batch) else None)
    out, dispatcher = _run(backend, plan_batches(jobs, 4))
    outcomes = {o.key: o for o in sum(out, [])}
    bad = next(j for j in jobs if j.prompt == "bad")
    assert outcomes[bad.key].error == "ValueError: no" and dispatcher.deaths == 0
    assert sum(1 for o in outcomes.values() if o.png) == 3


def test_batches_go_to_the_worker_that_holds_their_pipeline():
    a = _jobs([f"a{i}" for i in range(8)], model="tiny")
    b = [make_job(prompt=f"b{i}", model="other", seed=i, model_id="/models/other") for i in range(8)]
    backend = FakeBackend()
    _run(backend, plan_batches(a + b, 2), depth=1)
    kinds = [{p[0] for batch in w.batches for p in batch} for w in backend.workers]
    assert sorted(map(sorted, kinds)) == [["a"], ["b"]]  # each worker stayed on one pipeline


def test_when_no_worker_can_be_started_the_rest_is_recorded_failed():
    jobs = _jobs([f"p{i}" for i in range(6)])
    backend = FakeBackend(lambda worker, batch: "die", can_start=2)
    out, _ = _run(backend, plan_batches(jobs, 6), replacements=3)
    outcomes = sum(out, [])
    assert sorted(o.key for o in outcomes) == sorted(j.key for j in jobs)
    assert all(o.error and WORKER_DIED in o.error for o in outcomes)


def test_the_watchdog_fails_the_rest_when_nothing_finishes():
    class Silent(FakeBackend):
        def wait(self, calls, timeout):
            return []

    jobs = _jobs([f"p{i}" for i in range(4)])
    out, _ = _run(Silent(), plan_batches(jobs, 2), stall_seconds=0.05)
    outcomes = sum(out, [])
    assert len(outcomes) == 4 and all("no batch finished" in (o.error or "") for o in outcomes)


def test_a_worker_that_cannot_start_at_all_stops_the_run_before_any_call():
    backend = FakeBackend(can_start=0)
    with pytest.raises(RuntimeError, match="no resources"):
        _run(backend, plan_batches(_jobs(["p"]), 1))


def test_live_workers_keep_going_while_a_replacement_waits_for_room():
    """A node lost: its worker's replacement cannot start until the live worker has done more work. A start
    on the dispatch loop's thread would deadlock here; in its own thread it waits while the work goes on."""
    import threading

    jobs = _jobs([f"p{i}" for i in range(12)])
    room = threading.Event()
    done_by_live: list[str] = []
    timed_out: list[bool] = []

    class SlowToReplace(FakeBackend):
        def start_worker(self) -> FakeWorker:
            if len(self.workers) >= 2:  # a replacement: waits until the live worker has made three batches
                timed_out.append(not room.wait(10))
            return super().start_worker()

    def verdict(worker: FakeWorker, batch: list[Job]) -> object:
        if worker.name == 0:
            return "die"
        if worker.name == 1:
            done_by_live.append(batch[0].prompt)
            if len(done_by_live) >= 3:
                room.set()
        return None

    backend = SlowToReplace(verdict)
    out, dispatcher = _run(backend, plan_batches(jobs, 2), replacements=1)
    assert sorted(_keys(out)) == sorted(j.key for j in jobs) and all(o.png for o in sum(out, []))
    assert len(done_by_live) == 6  # the live worker made every batch, the lost ones again included
    deadline = time.monotonic() + 10
    while not timed_out and time.monotonic() < deadline:
        time.sleep(0.01)
    assert timed_out == [False]  # the replacement's start waited beside the work, not in front of it
