"""Scoring beside generation vs generating first and scoring after, on the tiny model with clip_score, faces, ocr.

    python benchmarks/pipeline.py                          # 48 images at 256², every way below
    python benchmarks/pipeline.py --prompts 8 --seeds 2 --size 128
    python benchmarks/pipeline.py --generation-threads 1 --score-workers 1   # one core each

One suite (written to a temporary folder): a text probe whose prompts ask for a face and a sign's words, on the
embedded tiny model at `--size`, scored with clip_score, faces and ocr. Four timings in one run, each of
`probe run` (run_suite) from the start on a fresh cache, so nothing is reused:

- generation alone: the same suite without metrics;
- scoring alone: the full suite on a cache that already holds every image (copied from the first timing) but
  no scores or features, so the run only scores;
- generate-then-score: the full suite with `--no-stream`;
- streamed: the full suite as `probe run` runs it by default.

Printed: each wall time, then streamed / generate-then-score (target <= 0.75) and streamed / max(generation,
scoring) (target <= 1.15). On a machine whose cores are all busy generating, streaming can only take back what
the two phases leave idle; on a GPU the generation runs on the device and the CPU metrics on the cores.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from probe.run.driver import run_suite
from probe.run.options import RunOptions

WORDS = ["OPEN", "SALE", "CAFE", "EXIT", "BAKERY", "HOTEL", "BOOKS", "TAXI", "PIZZA", "GARAGE", "MUSEUM", "PHARMACY"]


def write_suite(folder: Path, prompts: int, seeds: int, size: int, metrics: bool) -> Path:
    """The benchmark's suite: `prompts` text prompts x `seeds` seeds at 1 step on the tiny model."""
    items = [{"prompt": f'a portrait of a shopkeeper under a sign that says "{WORDS[i % len(WORDS)]}" ({i})',
              "text": WORDS[i % len(WORDS)]} for i in range(prompts)]
    probe: dict[str, object] = {"name": "signs", "kind": "text", "prompts": items, "steps": [1]}
    if metrics:
        probe["metrics"] = ["clip_score", "faces", "ocr"]
    suite = {"name": "pipeline-bench", "models": [{"preset": "tiny", "size": size}], "seeds": seeds,
             "probes": [probe]}
    path = folder / ("suite.yaml" if metrics else "generate-only.yaml")
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def timed(suite: Path, cache: Path, out: Path, **options: object) -> float:
    started = time.perf_counter()
    summary = run_suite(suite, RunOptions(reports_root=out, cache_dir=cache, **options))  # type: ignore[arg-type]
    wall = time.perf_counter() - started
    if summary.failures:
        raise SystemExit(f"{suite.name}: {len(summary.failures)} failures, e.g. {summary.failures[0]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--score-workers", type=int, default=None, help="default: one per core")
    parser.add_argument("--generation-threads", type=int, default=None,
                        help="torch threads for generation (default: torch's, one per core); with --score-workers, "
                             "splits the cores between the two phases as a GPU machine's device and cores are split")
    args = parser.parse_args()
    if args.generation_threads:
        import torch

        torch.set_num_threads(args.generation_threads)
    with tempfile.TemporaryDirectory(prefix="probe-pipeline-") as tmp:
        root = Path(tmp)
        full = write_suite(root, args.prompts, args.seeds, args.size, metrics=True)
        bare = write_suite(root, args.prompts, args.seeds, args.size, metrics=False)
        workers = {"score_workers": args.score_workers}
        timed(bare, root / "warm", root / "out-warm")  # imports, first loads: paid before any timing
        generation = timed(bare, root / "gen", root / "out-gen")
        shutil.copytree(root / "gen" / "images", root / "score" / "images")
        scoring = timed(full, root / "score", root / "out-score", **workers)
        after = timed(full, root / "after", root / "out-after", stream_scoring=False, **workers)
        streamed = timed(full, root / "stream", root / "out-stream", **workers)
    n = args.prompts * args.seeds
    import torch

    print(f"{n} images at {args.size}², clip_score + faces + ocr, tiny model; generation on {torch.get_num_threads()} "
          f"torch threads, CPU metrics on {args.score_workers if args.score_workers is not None else 'one per core'} "
          "worker(s)")
    for label, seconds in (("generation alone", generation), ("scoring alone", scoring),
                           ("generate, then score", after), ("streamed", streamed)):
        print(f"  {label:<22} {seconds:7.1f} s  {n / seconds:6.2f} img/s")
    print(f"streamed / generate-then-score     {streamed / after:5.2f}  (target <= 0.75)")
    print(f"streamed / max(generation, scoring) {streamed / max(generation, scoring):5.2f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
