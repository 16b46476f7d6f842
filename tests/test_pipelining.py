"""Generation beside encoding (probe.generate.pipelining): order kept, memory bounded, errors and stops
reach the other side, and the driver writes a batch's PNGs in parallel threads before logging it."""

from __future__ import annotations

import threading
import time

import pytest

from probe.generate.pipelining import pipelined


def _encode(made):
    time.sleep(0.01 * (len(made) % 3))  # uneven work: later batches may finish first
    return [(item, threading.current_thread().name) for item in made]


def test_batches_come_back_in_order_encoded_in_pool_threads():
    produced = ([i, i + 100] for i in range(20))
    out = list(pipelined(produced, workers=3, depth=4, encode=_encode))
    assert [[item for item, _ in batch] for batch in out] == [[i, i + 100] for i in range(20)]
    assert {name for batch in out for _, name in batch} <= {f"probe-encode_{i}" for i in range(3)}


def test_the_producer_runs_ahead_by_at_most_depth_batches():
    made = []

    def produce():
        for i in range(50):
            made.append(i)
            yield [i]

    stream = pipelined(produce(), workers=1, depth=3, encode=lambda m: m)
    first = next(stream)
    time.sleep(0.3)
    assert first == [0] and len(made) <= 1 + 3 + 1  # one taken, `depth` queued, one waiting to be put
    stream.close()


def test_an_error_in_the_producer_is_raised_to_the_consumer_after_what_it_made():
    def produce():
        yield [1]
        raise RuntimeError("the pipeline will not load")

    stream = pipelined(produce(), workers=2, depth=2, encode=lambda m: m)
    assert next(stream) == [1]
    with pytest.raises(RuntimeError, match="will not load"):
        next(stream)


def test_closing_the_stream_stops_the_producer_and_runs_its_cleanup():
    cleaned = threading.Event()

    def produce():
        try:
            for i in range(10_000):
                yield [i]
        finally:
            cleaned.set()

    stream = pipelined(produce(), workers=2, depth=2, encode=lambda m: m)
    assert next(stream) == [0]
    stream.close()
    assert cleaned.wait(5)
    assert not any(t.name == "probe-generate" and t.is_alive() for t in threading.enumerate())


def test_the_driver_writes_a_batchs_pngs_in_parallel_and_logs_it_after(tmp_path, monkeypatch):
    from PIL import Image

    from probe.generate.executors import JobOutcome
    from probe.run import writer
    from probe.run.folder import RunDir
    from probe.store.images import ImageStore, encode_png

    store, run = ImageStore(tmp_path / "cache"), RunDir(tmp_path / "run")
    run.path.mkdir()
    keys = [f"{i:02d}" + "a" * 62 for i in range(6)]
    outcomes = [JobOutcome(key=k, png=encode_png(k, Image.new("RGB", (8, 8))), seconds=0.1) for k in keys]
    active, peak = [0], [0]
    lock = threading.Lock()
    put = ImageStore.put_bytes

    def slow_put(self, key, png):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        try:
            return put(self, key, png)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(ImageStore, "put_bytes", slow_put)
    with writer.ThreadPoolExecutor(max_workers=3) as pool:
        results = writer._store_batch(outcomes, set(keys), store, run, pool)
    assert [r.key for r in results] == keys and all(r.status == "generated" for r in results)
    assert peak[0] >= 2  # the fsyncs overlapped
    assert all(run.image_path(k).is_file() for k in keys)
