"""Executors: the one seam between the driver and whatever turns Jobs into images.

An executor receives batches of Jobs plus the init images they need, by content hash (`Job.init_image_sha256`),
and yields one list of `JobOutcome`s per batch: the image already encoded as the store's PNG
(`probe.store.images.encode_png`, where the image was made) or the error that stopped it. A Job and that
mapping are all it needs, so it can run on another machine.

An executor never touches the run folder, the image cache or the progress log: the driver
(`probe.run.driver`) is the single writer. It stores each batch's PNGs atomically, links them into the run
folder, and only then logs the batch, so a worker that dies loses nothing that was logged and nothing is made
twice. `LocalExecutor` runs in this process; a Ray executor implements the same protocol.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from probe.generate.pipelining import pipelined
from probe.planning.job import Job
from probe.store.images import encode_png

log = logging.getLogger(__name__)

#: Init images by sha256 of their file: the file's bytes (cheap to send) or an already decoded image.
InitImages = Mapping[str, Image.Image | bytes]


class JobOutcome(BaseModel):
    """What became of one job in an executor: its PNG, or why there is none. Exactly one of `png`, `error`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str = Field(description="Job.key of the job (the driver checks it asked for this key).")
    png: bytes | None = Field(default=None, description="The image as the store's PNG bytes (encode_png).")
    seconds: float | None = Field(default=None, description="Wall seconds per image: the pipeline call that "
                                                            "made it, divided by that call's batch size.")
    error: str | None = Field(default=None, description="'ExceptionType: message' when the job failed.")
    device: str | None = Field(default=None, description="The device that made it (a CUDA card's name).")

    @model_validator(mode="after")
    def _png_or_error(self) -> JobOutcome:
        if (self.png is None) == (self.error is None):
            raise ValueError(f"outcome of {self.key[:12]} needs exactly one of png and error")
        return self

    @classmethod
    def failure(cls, key: str, exc: BaseException) -> JobOutcome:
        """The outcome of a job that raised, with the error as the progress log records it."""
        return cls(key=key, error=f"{type(exc).__name__}: {exc}")


class GroupProgress(Protocol):
    """What an executor may say while it works: a group of images (one pipeline) is starting.

    Only the driver advances the bars, once a batch is durable; the driver's `Progress` fits this protocol.
    """

    def group(self, label: str, total: int) -> None: ...


class Executor(Protocol):
    """Turns batches of Jobs into per-batch outcomes; needs no file access (see the module docstring)."""

    def run(self, batches: Sequence[Sequence[Job]], init_images: InitImages,
            progress: GroupProgress | None = None) -> Iterator[list[JobOutcome]]:
        """One list per batch with one outcome per job of it, batches in any order.

        A job that fails is an outcome with an error, never an exception; exceptions mean the executor itself
        cannot go on (a pipeline that will not load), and the driver stops the run, which stays resumable.
        """
        ...


class ImageGenerator(Protocol):
    """A loaded pipeline as executors use it (`probe.generate.adapter.PipelineAdapter`)."""

    def generate(self, jobs: Sequence[Job],
                 init_images: Mapping[str, Image.Image] | None = None) -> list[Image.Image]: ...


def plan_batches(jobs: Sequence[Job], batch_size: int) -> list[list[Job]]:
    """Jobs grouped by batch key (first-appearance order), in chunks of at most batch_size.

    Pure, so the driver decides the batches (and can re-send one) whichever executor runs them.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    groups: dict[tuple[object, ...], list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.batch_key, []).append(job)
    return [group[start : start + batch_size] for group in groups.values()
            for start in range(0, len(group), batch_size)]


def decode_init_images(init_images: InitImages, jobs: Sequence[Job]) -> dict[str, Image.Image]:
    """The RGB init images that `jobs` use, by sha256, each decoded once; hashes not given are left out
    (their jobs then fail alone, with the adapter's "has no init image" error)."""
    decoded: dict[str, Image.Image] = {}
    for job in jobs:
        sha = job.init_image_sha256
        if sha is None or sha in decoded or sha not in init_images:
            continue
        value = init_images[sha]
        if isinstance(value, bytes):
            with Image.open(io.BytesIO(value)) as image:
                decoded[sha] = image.convert("RGB")
        else:
            decoded[sha] = value.convert("RGB")
    return decoded


def run_batch(generator: ImageGenerator, batch: Sequence[Job],
              init_images: Mapping[str, Image.Image]) -> list[JobOutcome]:
    """Generate and encode one batch; if it fails, retry its jobs one by one so one bad job fails alone.

    `init_images` are decoded, by sha256 (`decode_init_images`). Shared by every executor, so a failure
    costs the same retries and gives the same error records wherever it runs.
    """
    return encode_made(generate_batch(generator, batch, init_images))


#: One job's result before encoding: the job, its image or the error that stopped it, wall seconds per image.
Made = tuple[Job, "Image.Image | BaseException", "float | None"]


def generate_batch(generator: ImageGenerator, batch: Sequence[Job],
                   init_images: Mapping[str, Image.Image], fit: BatchFit | None = None) -> list[Made]:
    """The images of one batch, in chunks of at most `fit.size`.

    Out of memory: the device cache is cleared and the batch retried at smaller sizes (accelerate's
    `find_executable_batch_size`, halving), and the size that fit is kept in `fit` for the next batches. Any
    other error: the batch is retried job by job, so one bad job fails alone. Retries run after the `except`
    block has ended, so the failed attempt's tensors (held by its traceback) are freed first.
    """
    fit = fit or BatchFit()
    size = min(len(batch), fit.size or len(batch))
    try:
        return _in_chunks(generator, batch, init_images, size)
    except Exception as exc:  # noqa: BLE001 - recorded below, outside this block
        if not should_reduce_batch_size(exc):
            raise  # _in_chunks records every other error per job
    release_memory()
    if size == 1:
        return [made for job in batch for made in _alone_or_out_of_memory(generator, job, init_images)]

    def attempt(batch_size: int) -> list[Made]:
        fit.size = batch_size
        return _in_chunks(generator, batch, init_images, batch_size)

    from accelerate.utils.memory import find_executable_batch_size

    try:
        found = find_executable_batch_size(attempt, starting_batch_size=size // 2,
                                           reduce_batch_size_fn=lambda: max(0, (fit.size or 1) // 2))()
    except RuntimeError:  # "No executable batch size found": each job is tried alone and fails with its OOM
        return [made for job in batch for made in _alone_or_out_of_memory(generator, job, init_images)]
    log.warning("out of memory at %d images per call; continuing with %s", size, fit.size)
    return found


def _alone_or_out_of_memory(generator: ImageGenerator, job: Job, init_images: Mapping[str, Image.Image]) -> list[Made]:
    try:
        return _one_call(generator, [job], init_images)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory errors get here: this job fails alone
        log.warning("job %s failed: out of memory with one image per call", job.key[:12])
        return [(job, exc.with_traceback(None), None)]


class BatchFit:
    """The largest batch that fit in memory so far, per loaded pipeline (None: as planned)."""

    def __init__(self) -> None:
        self.size: int | None = None


def release_memory() -> None:
    """Collect garbage and empty the device cache (between OOM attempts, and before the next pipeline loads)."""
    from accelerate.utils.memory import clear_device_cache

    clear_device_cache(garbage_collection=True)


def should_reduce_batch_size(exc: BaseException) -> bool:
    """Whether `exc` is an out-of-memory error (CUDA, MPS, XPU, CPU allocator), as accelerate recognises them."""
    from accelerate.utils.memory import should_reduce_batch_size as oom

    return isinstance(exc, Exception) and oom(exc)


def _in_chunks(generator: ImageGenerator, batch: Sequence[Job], init_images: Mapping[str, Image.Image],
               size: int) -> list[Made]:
    """Every chunk of `size` generated; an error other than out-of-memory falls back to one job per call."""
    return [made for start in range(0, len(batch), size)
            for made in _one_call(generator, batch[start : start + size], init_images)]


def _one_call(generator: ImageGenerator, batch: Sequence[Job], init_images: Mapping[str, Image.Image]) -> list[Made]:
    failure: Exception | None = None
    try:
        # The adapter looks init images up by the path the suite gave; the key (and so the pixels) by content.
        by_path = {job.init_image: init_images[job.init_image_sha256] for job in batch
                   if job.init_image and job.init_image_sha256 and job.init_image_sha256 in init_images}
        started = time.perf_counter()
        images = generator.generate(batch, by_path)
        seconds = (time.perf_counter() - started) / len(batch)
        return [(job, image, seconds) for job, image in zip(batch, images, strict=True)]
    except Exception as exc:  # noqa: BLE001 - any generation error is recorded, the run goes on
        if should_reduce_batch_size(exc):
            raise  # the caller finds a batch size that fits
        failure = exc.with_traceback(None)  # drop the frames (and the tensors they hold) before retrying
    if len(batch) == 1:
        log.warning("job %s failed: %s", batch[0].key[:12], failure)
        return [(batch[0], failure, None)]
    return [made for job in batch for made in _one_call(generator, [job], init_images)]


def encode_made(made: Sequence[Made]) -> list[JobOutcome]:
    """Outcomes of generated images: each encoded as the store's PNG (pure; safe in any thread)."""
    outcomes = []
    for job, image, seconds in made:
        if isinstance(image, BaseException):
            outcomes.append(JobOutcome.failure(job.key, image))
            continue
        try:
            outcomes.append(JobOutcome(key=job.key, png=encode_png(job.key, image), seconds=seconds))
        except Exception as exc:  # noqa: BLE001 - an image that cannot be encoded fails alone
            outcomes.append(JobOutcome.failure(job.key, exc))
    return outcomes


def device_name(device: str) -> str:
    """The card's name on CUDA (`NVIDIA H100 80GB HBM3`), else the device string."""
    if device.startswith("cuda"):
        import torch

        return str(torch.cuda.get_device_name(torch.device(device)))
    return device


class LocalExecutor:
    """Today's in-process executor: each pipeline loaded once, its batches run in order on one device.

    Generation runs in a producer thread and PNG encoding in a pool of `encode_workers` threads (zlib and
    Pillow's encoder release the GIL), so the device never waits for an encode or for the driver's disk
    writes; at most `depth` batches are in flight, which bounds memory.
    """

    def __init__(self, device: str, encode_workers: int | None = None, depth: int | None = None) -> None:
        self.device = device
        self.encode_workers = encode_workers or max(1, min(8, os.cpu_count() or 1))
        self.depth = depth or 2 * self.encode_workers

    def run(self, batches: Sequence[Sequence[Job]], init_images: InitImages,
            progress: GroupProgress | None = None) -> Iterator[list[JobOutcome]]:
        """Per pipeline (first-appearance order): announce the group, load it, run its batches."""
        name = device_name(self.device)

        def encode(made: Sequence[Made]) -> list[JobOutcome]:
            return [outcome.model_copy(update={"device": name}) for outcome in encode_made(made)]

        return pipelined(self._generate(batches, init_images, progress), self.encode_workers, self.depth, encode)

    def _generate(self, batches: Sequence[Sequence[Job]], init_images: InitImages,
                  progress: GroupProgress | None) -> Iterator[list[Made]]:
        from probe.generate.adapter import PipelineAdapter

        for group in _by_pipeline(batches):
            first = group[0][0]
            if progress is not None:
                progress.group(f"{first.model} ({first.preset})", sum(len(batch) for batch in group))
            adapter = PipelineAdapter.for_job(first, self.device)
            decoded = decode_init_images(init_images, [job for batch in group for job in batch])
            fit = BatchFit()
            for batch in group:
                yield generate_batch(adapter, batch, decoded, fit)
            del adapter, decoded
            release_memory()  # one pipeline resident at a time: this one is gone before the next loads


def _by_pipeline(batches: Sequence[Sequence[Job]]) -> list[list[Sequence[Job]]]:
    """Non-empty batches grouped by pipeline key, groups and batches in first-appearance order."""
    groups: dict[tuple[object, ...], list[Sequence[Job]]] = {}
    for batch in batches:
        if batch:
            groups.setdefault(batch[0].pipeline_key, []).append(batch)
    return list(groups.values())
