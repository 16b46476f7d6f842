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


# --- out of memory ---------------------------------------------------------------------------------------------


class _Jobs:
    """Stand-ins with what generation reads of a Job: its key and init image."""

    @staticmethod
    def make(n: int):
        from types import SimpleNamespace

        return [SimpleNamespace(key=f"{i:064x}", init_image=None, init_image_sha256=None) for i in range(n)]


class _Tight:
    """A pipeline that runs out of memory above `fits` images per call (CUDA's message), and can be told to
    fail one job with another error."""

    def __init__(self, fits: int, bad: str | None = None) -> None:
        self.fits, self.bad, self.calls = fits, bad, []

    def generate(self, jobs, init_images=None):
        from PIL import Image

        self.calls.append(len(jobs))
        if len(jobs) > self.fits:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any(job.key == self.bad for job in jobs):
            raise ValueError("this prompt breaks the model")
        return [Image.new("RGB", (8, 8)) for _ in jobs]


def test_out_of_memory_halves_the_batch_clears_the_cache_and_keeps_the_size(monkeypatch):
    from accelerate.utils import memory

    from probe.generate.executors import BatchFit, generate_batch

    cleared = []
    monkeypatch.setattr(memory, "clear_device_cache", lambda garbage_collection=False: cleared.append(1))
    pipe, fit = _Tight(fits=2), BatchFit()
    jobs = _Jobs.make(8)
    first = generate_batch(pipe, jobs[:4], {}, fit)
    assert [type(image).__name__ for _, image, _ in first] == ["Image"] * 4
    assert pipe.calls == [4, 2, 2] and fit.size == 2 and cleared  # halved once, the cache cleared between
    pipe.calls.clear()
    second = generate_batch(pipe, jobs[4:], {}, fit)
    assert pipe.calls == [2, 2] and len(second) == 4  # the size that fit is used at once for the next batch


def test_a_job_that_fits_nowhere_fails_alone_and_other_errors_still_fail_one_job(monkeypatch):
    from accelerate.utils import memory

    from probe.generate.executors import BatchFit, encode_made, generate_batch

    monkeypatch.setattr(memory, "clear_device_cache", lambda garbage_collection=False: None)
    jobs = _Jobs.make(4)
    outcomes = encode_made(generate_batch(_Tight(fits=0), jobs, {}, BatchFit()))
    assert all(o.error and "out of memory" in o.error for o in outcomes)
    outcomes = encode_made(generate_batch(_Tight(fits=4, bad=jobs[1].key), jobs, {}, BatchFit()))
    assert [o.error is None for o in outcomes] == [True, False, True, True]
    assert "this prompt breaks the model" in outcomes[1].error


def test_a_retry_runs_after_the_failed_attempts_frames_are_gone():
    """The first attempt's locals (its tensors, on a GPU) must be collectable before the retry starts."""
    import gc
    import weakref

    from probe.generate.executors import BatchFit, generate_batch

    class Tensor:
        pass

    alive = []

    class Leaky(_Tight):
        def generate(self, jobs, init_images=None):
            if len(jobs) > self.fits:
                big = Tensor()
                alive.append(weakref.ref(big))
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            gc.collect()
            assert all(ref() is None for ref in alive), "the failed attempt's tensor is still alive"
            return super().generate(jobs, init_images)

    made = generate_batch(Leaky(fits=1), _Jobs.make(2), {}, BatchFit())
    assert len(made) == 2 and alive
