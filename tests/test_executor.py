"""The executor seam: the driver is the single writer of store, run folder and ledger; executors only turn Jobs
into PNG bytes (byte-identical to what `probe run` always stored), falling back to one job at a time."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from PIL import Image, PngImagePlugin

from probe.generate.executors import (
    GroupProgress,
    InitImages,
    JobOutcome,
    LocalExecutor,
    decode_init_images,
    plan_batches,
    run_batch,
)
from probe.planning.job import Job
from probe.planning.planner import plan_jobs
from probe.run.driver import RunOptions, run_suite
from probe.spec.loader import load_suite
from probe.spec.presets import TINY_ID
from probe.store.images import ImageStore, encode_png

SUITE = """
name: seam
models: [tiny]
seeds: 2
probes:
  - name: p
    prompts: [a red apple, bad]
    steps: [1]
  - name: i
    kind: img2img
    prompts: [a watercolor house]
    init_images: [images/*.png]
    steps: [2]
    strength: [0.5]
"""


def make_job(**overrides: Any) -> Job:
    fields: dict[str, Any] = dict(
        probe="p", model="tiny", preset="tiny", model_id=TINY_ID, revision=None,
        scheduler="EulerDiscreteScheduler(trailing)", dtype="float32", device_class="cpu", mode="txt2img",
        prompt="a red apple", seed=0, steps=1, guidance=0.0, width=64, height=64,
    )  # fmt: skip
    fields.update(overrides)
    return Job(**fields)


def legacy_png(key: str, image: Image.Image) -> bytes:
    """How `ImageStore.put` encoded stored images before the fast zlib level: bytes a cache may already hold."""
    info = PngImagePlugin.PngInfo()
    info.add_text("probe-key", key)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def solid(job: Job) -> Image.Image:
    """A stand-in image that depends on the job only (no model)."""
    digest = bytes.fromhex(job.key[:6])
    return Image.new("RGB", (job.width, job.height), tuple(digest))  # type: ignore[arg-type]


@pytest.fixture
def seam_suite(write_suite, tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (80, 48), (200, 120, 40)).save(tmp_path / "images" / "house.png")
    return write_suite(SUITE)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: the tiny model is ~10x faster on a shared 2-core machine (see test_generation)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FakeExecutor:
    """An executor with no model and no file access: each job's PNG is made from its key; 'bad' fails."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.init_images: dict[str, bytes] = {}

    def run(self, batches: Sequence[Sequence[Job]], init_images: InitImages,
            progress: GroupProgress | None = None) -> Iterator[list[JobOutcome]]:
        self.init_images.update({sha: value for sha, value in init_images.items() if isinstance(value, bytes)})
        for batch in batches:
            self.asked += [job.key for job in batch]
            yield [JobOutcome(key=job.key, error="RuntimeError: boom (fake)") if job.prompt == "bad"
                   else JobOutcome(key=job.key, png=encode_png(job.key, solid(job)), seconds=0.25) for job in batch]


class RecordingProgress:
    def __init__(self) -> None:
        self.advanced = 0
        self.groups: list[tuple[str, int]] = []

    def start(self, total: int) -> None: ...
    def group(self, label: str, total: int) -> None:
        self.groups.append((label, total))

    def advance(self, n: int) -> None:
        self.advanced += n

    def finish(self) -> None: ...


def test_driver_writes_exactly_what_the_executor_returns(seam_suite: Path, tmp_path: Path) -> None:
    fake, progress = FakeExecutor(), RecordingProgress()
    options = RunOptions(reports_root=tmp_path / "r", cache_dir=tmp_path / "c", device="cpu", batch_size=4)
    summary = run_suite(seam_suite, options, progress, executor=fake)
    jobs = plan_jobs(load_suite(seam_suite), device="cpu")
    store = ImageStore(tmp_path / "c")
    good = [job for job in jobs if job.prompt != "bad"]
    assert sorted(fake.asked) == sorted(job.key for job in jobs) and progress.advanced == len(jobs)
    for job in good:
        expected = encode_png(job.key, solid(job))
        assert store.path(job.key).read_bytes() == expected
        assert (summary.run_dir / "images" / job.key[:2] / f"{job.key}.png").read_bytes() == expected
    house = (tmp_path / "images" / "house.png").read_bytes()
    assert fake.init_images == {hashlib.sha256(house).hexdigest(): house}  # by content hash, as bytes

    ledger = [json.loads(line) for line in (summary.run_dir / "progress.jsonl").read_text().splitlines()]
    by_key = {line["key"]: line for line in ledger}
    assert len(ledger) == len(by_key) == len(jobs)
    assert all(by_key[job.key] == {"key": job.key, "status": "generated", "seconds": 0.25, "error": None,
                                 "device": None}
               for job in good)
    bad = [job for job in jobs if job.prompt == "bad"]
    assert all(by_key[job.key]["status"] == "failed" and by_key[job.key]["error"] == "RuntimeError: boom (fake)"
               for job in bad)
    assert (summary.counts.generated, summary.counts.failed) == (len(good), len(bad))
    table = pd.read_parquet(summary.run_dir / "jobs.parquet")
    assert set(table[table["status"] == "failed"]["prompt"]) == {"bad"}

    again = FakeExecutor()
    second = run_suite(seam_suite, options, executor=again)
    assert sorted(again.asked) == sorted(job.key for job in bad)  # nothing generated twice
    assert (second.counts.cached, second.counts.failed) == (len(good), len(bad))


def test_driver_refuses_keys_it_did_not_ask_for(seam_suite: Path, tmp_path: Path) -> None:
    class Rogue(FakeExecutor):
        def run(self, batches, init_images, progress=None):  # type: ignore[no-untyped-def]
            yield [JobOutcome(key="0" * 64, png=encode_png("0" * 64, Image.new("RGB", (4, 4))))]

    options = RunOptions(reports_root=tmp_path / "r", cache_dir=tmp_path / "c", device="cpu")
    with pytest.raises(RuntimeError, match="not asked for"):
        run_suite(seam_suite, options, executor=Rogue())
    assert not ImageStore(tmp_path / "c").has("0" * 64)


def test_outcome_has_png_or_error() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        JobOutcome(key="k")
    with pytest.raises(ValueError, match="exactly one"):
        JobOutcome(key="k", png=b"x", error="E: x")
    assert JobOutcome.failure("k", RuntimeError("no")).error == "RuntimeError: no"


def test_store_refuses_bytes_that_are_not_png(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a PNG"):
        ImageStore(tmp_path).put_bytes("k" * 64, b"GIF89a")


class FakeGenerator:
    """An ImageGenerator without a model: solid images; any batch holding a 'bad' job raises."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def generate(self, jobs: Sequence[Job], init_images: Mapping[str, Image.Image] | None = None) -> list[Image.Image]:
        self.calls.append(len(jobs))
        if any(job.prompt == "bad" for job in jobs):
            raise RuntimeError("CUDA out of memory (simulated)")
        return [solid(job) for job in jobs]


def test_failed_batch_falls_back_to_one_job_at_a_time() -> None:
    generator = FakeGenerator()
    batch = [make_job(seed=0), make_job(prompt="bad"), make_job(seed=1)]
    outcomes = run_batch(generator, batch, {})
    assert generator.calls == [3, 1, 1, 1]
    assert [o.key for o in outcomes] == [job.key for job in batch]
    assert outcomes[1].png is None and outcomes[1].error == "RuntimeError: CUDA out of memory (simulated)"
    assert [o.png for o in (outcomes[0], outcomes[2])] == [encode_png(j.key, solid(j)) for j in (batch[0], batch[2])]


def test_local_executor_loads_each_pipeline_once_and_announces_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    from probe.generate import adapter

    loads: list[tuple[object, ...]] = []

    def for_job(job: Job, device: str) -> FakeGenerator:
        loads.append(job.pipeline_key)
        return FakeGenerator()

    monkeypatch.setattr(adapter.PipelineAdapter, "for_job", staticmethod(for_job))
    other = "EulerDiscreteScheduler(leading)"
    jobs = [make_job(seed=s) for s in range(3)] + [make_job(seed=s, scheduler=other) for s in range(2)]
    jobs.append(make_job(seed=9, steps=2))  # same pipeline as the first three, another batch key
    progress = RecordingProgress()
    batches = list(LocalExecutor("cpu").run(plan_batches(jobs, 2), {}, progress))
    assert loads == [jobs[0].pipeline_key, jobs[3].pipeline_key]
    assert progress.groups == [("tiny (tiny)", 4), ("tiny (tiny)", 2)]
    assert [len(b) for b in batches] == [2, 1, 1, 2]


def test_plan_batches_groups_by_batch_key_in_order() -> None:
    jobs = [make_job(seed=0), make_job(seed=0, steps=2), make_job(seed=1), make_job(seed=2), make_job(seed=1, steps=2)]
    assert plan_batches(jobs, 2) == [[jobs[0], jobs[2]], [jobs[3]], [jobs[1], jobs[4]]]
    with pytest.raises(ValueError):
        plan_batches(jobs, 0)


def test_init_images_decode_from_bytes_or_images() -> None:
    image = Image.new("RGBA", (8, 8), (1, 2, 3, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    job = make_job(mode="img2img", strength=0.5, init_image="x.png", init_image_sha256=sha)
    for given in (data, image):
        decoded = decode_init_images({sha: given}, [job, make_job()])
        assert list(decoded) == [sha] and decoded[sha].mode == "RGB" and decoded[sha].getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("batch_size", [4, 1])
def test_local_executor_bytes_equal_probe_run(seam_suite: Path, tmp_path: Path, one_thread: None,
                                              batch_size: int) -> None:
    """Same key -> same bytes: LocalExecutor gives exactly what `probe run` stored, batched and one at a time.

    Compared at the same batch size: CPU kernels are not batch-invariant (one uint8 level on a few pixels,
    see test_generation), so a batch of 4 and a batch of 1 may differ by design; the seam must not.
    """
    options = RunOptions(reports_root=tmp_path / "r", cache_dir=tmp_path / "c", device="cpu", batch_size=batch_size)
    summary = run_suite(seam_suite, options)
    assert summary.counts.failed == 0
    jobs = plan_jobs(load_suite(seam_suite), device="cpu")
    store = ImageStore(tmp_path / "c")
    house = (tmp_path / "images" / "house.png").read_bytes()
    init_images = {hashlib.sha256(house).hexdigest(): house}
    batches = plan_batches(jobs, batch_size)
    outcomes = [o for batch in LocalExecutor("cpu").run(batches, init_images) for o in batch]
    assert [o.key for o in outcomes] == [job.key for batch in batches for job in batch]
    for outcome in outcomes:
        assert outcome.png == store.path(outcome.key).read_bytes()
        assert outcome.seconds is not None and outcome.seconds > 0
    with Image.open(store.path(jobs[0].key)) as image:
        image.load()
        legacy = legacy_png(jobs[0].key, image)
    # images cached at zlib level 6 (before the fast level) are other bytes of the same pixels, and still valid
    assert legacy != store.path(jobs[0].key).read_bytes()
    store.path(jobs[0].key).write_bytes(legacy)
    assert store.verify(jobs[0].key) is None
    with Image.open(store.path(jobs[0].key)) as old, Image.open(io.BytesIO(outcomes[0].png)) as new:
        assert old.tobytes() == new.tobytes() and old.info["probe-key"] == jobs[0].key


def test_local_executor_bad_job_fails_alone(monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    from probe.generate import adapter

    real = adapter.PipelineAdapter.generate
    calls: list[int] = []

    def flaky(self: Any, jobs: Sequence[Job], init_images: Any = None) -> list[Image.Image]:
        calls.append(len(jobs))
        if any(job.prompt == "bad" for job in jobs):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, jobs, init_images)

    jobs = [make_job(seed=0), make_job(prompt="bad"), make_job(seed=1)]
    alone = {o.key: o.png for batch in LocalExecutor("cpu").run(plan_batches(jobs[::2], 1), {}) for o in batch}
    monkeypatch.setattr(adapter.PipelineAdapter, "generate", flaky)
    (outcomes,) = list(LocalExecutor("cpu").run(plan_batches(jobs, 4), {}))
    assert calls == [3, 1, 1, 1]
    assert [o.key for o in outcomes] == [job.key for job in jobs]
    assert outcomes[1].error == "RuntimeError: CUDA out of memory (simulated)" and outcomes[1].png is None
    assert {o.key: o.png for o in (outcomes[0], outcomes[2])} == alone


def test_jobs_an_executor_skips_are_recorded_as_failed(seam_suite: Path, tmp_path: Path) -> None:
    class Skipper(FakeExecutor):
        def run(self, batches, init_images, progress=None):  # type: ignore[no-untyped-def]
            for batch in batches:
                yield [JobOutcome(key=job.key, png=encode_png(job.key, solid(job))) for job in batch[:1]]

    options = RunOptions(reports_root=tmp_path / "r", cache_dir=tmp_path / "c", device="cpu", batch_size=2)
    summary = run_suite(seam_suite, options, executor=Skipper())
    ledger = [json.loads(line) for line in (summary.run_dir / "progress.jsonl").read_text().splitlines()]
    skipped = [line for line in ledger if line["status"] == "failed"]
    assert skipped and all(line["error"] == "executor returned no outcome" for line in skipped)
    assert summary.counts.generated + summary.counts.failed == summary.counts.planned


def test_a_cache_that_cannot_be_written_stops_cleanly_and_keeps_what_is_logged(seam_suite: Path, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from probe.errors import ProbeError

    calls = {"n": 0}
    original = ImageStore.put_bytes

    def full_disk(self: ImageStore, key: str, png: bytes) -> Path:
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(28, "No space left on device")
        return original(self, key, png)

    monkeypatch.setattr(ImageStore, "put_bytes", full_disk)
    options = RunOptions(reports_root=tmp_path / "r", cache_dir=tmp_path / "c", device="cpu", batch_size=2)
    with pytest.raises(ProbeError, match="run the same command again to resume"):
        run_suite(seam_suite, options, executor=FakeExecutor())
    run_dir = next(p for p in (tmp_path / "r").rglob("progress.jsonl")).parent
    logged = [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]
    assert [line["status"] for line in logged].count("generated") == 3  # every image stored before the error
