"""Sustained image writes at 512²: probe's writer path vs bare `PIL.save` loops, measured in one run.

    python benchmarks/writer.py                  # 64 photo-like images, batches of 4, 3 repeats
    python benchmarks/writer.py --images 128 --workers 4

Four ways to put the same decoded images on disk, each timed `--repeats` times (best kept; machines are noisy):

- bare serial:    `image.save(folder / name.png)` in a loop (no fsync): what a user's script does;
- bare parallel:  the same `image.save` calls in `--workers` threads: the machine's ceiling for PNG writes
                  (also at probe's zlib level 1, the ceiling for the very bytes probe writes);
- probe serial:   encode_png, ImageStore.put_bytes (atomic, fsynced), link into a run folder, one at a time:
                  what probe did before the writer pool (at today's level 1);
- probe pool:     the executor's pipeline (encoding in `--workers` threads beside the producer) and the
                  driver's writer (a batch's PNGs stored and linked in parallel, then the batch logged).

Targets (issue 14): probe pool >= 0.9x bare parallel, and >= 1.8x probe serial on 2 cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image


def photo_like(n: int, size: int) -> list[Image.Image]:
    """Smooth colour fields with mild grain: compresses like a generated photo, not like noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    images = []
    for i in range(n):
        base = np.stack([128 + 100 * np.sin((6 + i % 5) * x + c) * np.cos((4 + i % 3) * y - c) for c in (0, 1, 2)], -1)
        pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels))
    return images


def bare_serial(images: list[Image.Image], out: Path, workers: int, batch: int) -> None:
    for i, image in enumerate(images):
        image.save(out / f"{i}.png")


def bare_parallel(images: list[Image.Image], out: Path, workers: int, batch: int) -> None:
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda pair: pair[1].save(out / f"{pair[0]}.png"), enumerate(images)))


def bare_parallel_fast(images: list[Image.Image], out: Path, workers: int, batch: int) -> None:
    """The ceiling for the bytes probe writes: the same parallel saves at probe's zlib level."""
    from probe.store.images import PNG_LEVEL

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda pair: pair[1].save(out / f"{pair[0]}.png", compress_level=PNG_LEVEL),
                      enumerate(images)))


def probe_serial(images: list[Image.Image], out: Path, workers: int, batch: int) -> None:
    from probe.store.images import ImageStore, encode_png, link_or_copy

    store, run = ImageStore(out / "cache"), out / "run"
    for i, image in enumerate(images):
        key = f"{i:064x}"
        stored = store.put_bytes(key, encode_png(key, image))
        link_or_copy(stored, run / "images" / key[:2] / f"{key}.png")


def probe_pool(images: list[Image.Image], out: Path, workers: int, batch: int) -> None:
    from probe.generate.executors import encode_made, generate_batch
    from probe.generate.pipelining import pipelined
    from probe.run import writer
    from probe.run.folder import RunDir
    from probe.store.images import ImageStore

    class Ready:
        """A 'pipeline' that hands back already made images at once: only the writes are measured."""

        def __init__(self) -> None:
            self.left = list(images)

        def generate(self, jobs: list[SimpleNamespace], init_images: object = None) -> list[Image.Image]:
            taken, self.left = self.left[: len(jobs)], self.left[len(jobs):]
            return taken

    # stand-ins with what generate_batch reads of a Job (its key and init image): only the writes are measured
    jobs = [SimpleNamespace(key=f"{i:064x}", init_image=None, init_image_sha256=None) for i in range(len(images))]
    batches = [jobs[i : i + batch] for i in range(0, len(jobs), batch)]
    source = Ready()
    store, run = ImageStore(out / "cache"), RunDir(out / "run")
    run.path.mkdir(parents=True, exist_ok=True)
    pending = {job.key for job in jobs}
    with ThreadPoolExecutor(max_workers=workers) as writers:
        made = (generate_batch(source, b, {}) for b in batches)  # type: ignore[arg-type]
        for outcomes in pipelined(made, workers, 2 * workers, encode_made):
            run.append_results(writer._store_batch(outcomes, pending, store, run, writers))


def best_of(method, images: list[Image.Image], workers: int, batch: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            method(images, Path(folder), workers, batch)
            times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    images = photo_like(args.images, args.size)
    rates = {}
    methods = (("bare serial", bare_serial), ("bare parallel", bare_parallel),
               ("bare parallel, probe's level", bare_parallel_fast), ("probe serial", probe_serial),
               ("probe pool", probe_pool))
    for name, method in methods:
        seconds = best_of(method, images, args.workers, args.batch, args.repeats)
        rates[name] = args.images / seconds
        print(f"{name:29s} {rates[name]:7.1f} images/s  ({seconds * 1000 / args.images:.1f} ms/image)")
    pool = rates["probe pool"]
    print(f"probe pool / bare parallel (PIL's default level 6): {pool / rates['bare parallel']:.2f}  (target >= 0.9)")
    print(f"probe pool / bare parallel at probe's level 1:      {pool / rates[methods[2][0]]:.2f}  (same bytes)")
    print(f"probe pool / probe serial:                          {pool / rates['probe serial']:.2f}  "
          "(target >= 1.8 on 2 cores)")


if __name__ == "__main__":
    main()
