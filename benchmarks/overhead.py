"""Overhead of `probe run` over a bare diffusers loop: same pipeline, same jobs, same batch size.

    python benchmarks/overhead.py                 # tiny preset and SD-Turbo's full-size architecture
    python benchmarks/overhead.py --only tiny --images 32

Both sides generate the same images and save each one as a PNG; probe also plans, hashes keys, writes
atomically with fsync, logs progress, links images into the run folder and writes the tables. Each side
runs `--repeats` times, alternating, and the best time of each is compared (this machine is noisy).
The full-size architecture has random weights (no hub access): only its timings mean anything.
"""

from __future__ import annotations

import argparse
import tempfile
import textwrap
import time
from pathlib import Path
from unittest import mock

import torch


def bare_loop(pipe, prompts: list[str], seeds: list[int], steps: int, size: int, batch: int, out: Path) -> float:
    """The loop a user would write: call the pipeline per batch, save each image."""
    pairs = [(p, s) for p in prompts for s in seeds]
    started = time.perf_counter()
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        images = pipe(
            prompt=[p for p, _ in chunk], num_inference_steps=steps, guidance_scale=0.0, height=size, width=size,
            generator=[torch.Generator("cpu").manual_seed(s) for _, s in chunk],
        ).images
        for index, image in enumerate(images):
            image.save(out / f"{start + index}.png")
    return time.perf_counter() - started


def probe_run(pipe, prompts: list[str], seeds: list[int], steps: int, size: int, batch: int, out: Path) -> float:
    """The same jobs through `run_suite` with the pipeline injected (fresh cache, so everything is generated)."""
    from probe.generate import adapter as generate
    from probe.generate import loading
    from probe.run.driver import RunOptions, run_suite

    suite = out / "bench.yaml"
    suite.write_text(textwrap.dedent(f"""
        name: bench
        models: [tiny]
        size: {size}
        seeds: {seeds}
        probes:
          - name: p
            prompts: {prompts}
            steps: [{steps}]
    """))
    options = RunOptions(reports_root=out / "reports", device="cpu", batch_size=batch, cache_dir=out / "cache")
    adapter = lambda job, device: generate.PipelineAdapter(pipe, device, job.pipeline_key)  # noqa: E731
    with mock.patch.object(generate.PipelineAdapter, "for_job", adapter), \
         mock.patch.object(loading, "ensure_available", lambda job: None):
        started = time.perf_counter()
        summary = run_suite(suite, options)
        elapsed = time.perf_counter() - started
    assert summary.counts.generated == len(prompts) * len(seeds), summary.counts
    return elapsed


def measure(name: str, pipe, size: int, images: int, batch: int, repeats: int) -> float:
    prompts = [f"a photo of object number {i}" for i in range(max(1, images // 2))]
    seeds = [0, 1]
    pipe(prompt=prompts[:batch], num_inference_steps=1, guidance_scale=0.0, height=size, width=size)  # warm-up
    bare, ours = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            bare.append(bare_loop(pipe, prompts, seeds, 1, size, batch, Path(a)))
            ours.append(probe_run(pipe, prompts, seeds, 1, size, batch, Path(b)))
    n = len(prompts) * len(seeds)
    ratio = min(ours) / min(bare)
    print(f"{name}: {n} images at {size}x{size}, 1 step, batch {batch}: bare diffusers {min(bare):.2f} s, "
          f"probe run {min(ours):.2f} s, ratio {ratio:.3f}  (all bare {[round(x, 2) for x in bare]}, "
          f"all probe {[round(x, 2) for x in ours]})")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["tiny", "sd-turbo-arch"])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=256, help="image size for the full-size architecture")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.only in (None, "tiny"):
        from probe.embedded.tiny_sd import build_tiny_pipeline

        measure("tiny", build_tiny_pipeline(), 64, args.images * 4, args.batch_size, args.repeats)
    if args.only in (None, "sd-turbo-arch"):
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        from sd_turbo_arch import build_sd_turbo_architecture

        measure("sd-turbo architecture (random weights)", build_sd_turbo_architecture(), args.size, args.images,
                args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
