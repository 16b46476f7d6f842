"""Overlap generation with encoding: a producer thread makes batches, a thread pool encodes them, and the
caller receives encoded batches in order, with a bounded number in flight.

Why by hand: concurrent.futures gives the pool, but not an ordered, bounded, stoppable producer/consumer
around a generator whose work (a torch pipeline) must stay on one thread. The producer stops between
batches when the consumer goes away (Ctrl-C, a closed generator), so nothing outlives the run for long.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

Made = TypeVar("Made")
Encoded = TypeVar("Encoded")

_DONE = object()


def pipelined(produce: Iterator[Made], workers: int, depth: int,
              encode: Callable[[Made], Encoded]) -> Iterator[Encoded]:
    """`encode` of each item of `produce`, in its order; `produce` runs in its own thread, `encode` in `workers`
    threads, and at most `depth` items wait between them (the producer blocks beyond that)."""
    pending: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="probe-encode")
    producer = threading.Thread(target=_produce, args=(produce, encode, pool, pending, stop),
                                name="probe-generate", daemon=True)
    producer.start()
    try:
        while True:
            item = pending.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item  # the producer itself failed (e.g. a pipeline that will not load)
            yield item.result()
    finally:
        stop.set()
        while producer.is_alive():  # unblock a producer waiting to put, then let it see `stop`
            try:
                pending.get(timeout=0.05)
            except queue.Empty:
                pass
        pool.shutdown(wait=True, cancel_futures=True)


def _produce(produce: Iterator[Any], encode: Callable[[Any], Any], pool: ThreadPoolExecutor,
             pending: queue.Queue[Any], stop: threading.Event) -> None:
    try:
        for made in produce:
            future: Future[Any] = pool.submit(encode, made)
            if not _put(pending, future, stop):
                return
            if stop.is_set():
                return
        _put(pending, _DONE, stop)
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it in its thread
        _put(pending, exc, stop)
    finally:
        close = getattr(produce, "close", None)
        if close is not None:
            close()  # run the producer generator's cleanup (free the pipeline) in the thread that ran it


def _put(pending: queue.Queue[Any], item: object, stop: threading.Event) -> bool:
    """Put unless the consumer has gone; False when it has."""
    while not stop.is_set():
        try:
            pending.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False
