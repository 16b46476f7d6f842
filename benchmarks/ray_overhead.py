"""What `--executor ray` costs on one machine, and how fast it recovers from a killed worker.

    python benchmarks/ray_overhead.py                  # 96 tiny images, 2 Ray workers
    python benchmarks/ray_overhead.py --seeds 8 --workers 2

The same tiny-model suite (generation only, no metrics, fresh caches) is run three ways in one process:
with the local executor; with Ray, after Ray and its workers have started (start-up is timed apart: `ray.init`,
then the actors' process start and fingerprint check); and with Ray again while one worker is SIGKILLed after
the first batch is written, timing from the kill to the moment its lost batch is written by another worker.
Target: Ray's wall time / local's <= 1.3 once Ray is started.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from pathlib import Path

from probe.generate.ray_executor import RayExecutor
from probe.run.driver import RunOptions, run_suite

SUITE = """
name: overhead
models: [tiny]
seeds: {seeds}
probes:
  - name: p
    prompts: [a red apple on a table, a lighthouse at dusk, a bowl of soup, a cat on a sofa,
              a city street at night, a mountain lake, a bicycle by a wall, a cup of coffee,
              a forest path, a sailboat at sea, a plate of pasta, a wooden chair]
    steps: [1, 2, 4]
"""


class Killer:
    """Progress that SIGKILLs one Ray worker once the first batch is durable, and notes when."""

    def __init__(self, executor: RayExecutor) -> None:
        self.executor = executor
        self.killed_at: float | None = None

    def start(self, total: int) -> None: ...
    def group(self, label: str, total: int) -> None: ...
    def finish(self) -> None: ...

    def advance(self, n: int) -> None:
        if self.killed_at is None:
            os.kill(self.executor.worker_pids()[0], signal.SIGKILL)
            self.killed_at = time.monotonic()


def timed_run(suite: Path, root: Path, executor: RayExecutor | None = None, progress: Killer | None = None,
              batch_size: int = 4) -> float:
    started = time.perf_counter()
    summary = run_suite(suite, RunOptions(reports_root=root / "out", cache_dir=root / "cache", batch_size=batch_size),
                        progress=progress, executor=executor)
    assert summary.counts.generated == summary.counts.planned and not summary.failures, summary.failures[:3]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt and step count (12 prompts x 3 steps)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        suite = folder / "suite.yaml"
        suite.write_text(SUITE.format(seeds=args.seeds), encoding="utf-8")
        images = 12 * 3 * args.seeds
        local = timed_run(suite, folder / "local", batch_size=args.batch_size)
        started = time.perf_counter()
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        ray_init = time.perf_counter() - started
        executor = RayExecutor(workers=args.workers).connect()
        started = time.perf_counter()
        executor.start()
        actors = time.perf_counter() - started
        on_ray = timed_run(suite, folder / "ray", executor, batch_size=args.batch_size)
        executor.close()
        killed = RayExecutor(workers=args.workers).connect()
        killer = Killer(killed)
        with_kill = timed_run(suite, folder / "kill", killed, killer, batch_size=args.batch_size)
        assert killer.killed_at is not None
        recovered = [t - killer.killed_at for t in killed.recovered_at]
        killed.close()
        ray.shutdown()
    print(f"{images} tiny images, batch size {args.batch_size}, {args.workers} Ray workers, {os.cpu_count()} cores\n")
    print("| run | wall s | images/s |")
    print("|---|---|---|")
    print(f"| local executor | {local:.1f} | {images / local:.1f} |")
    print(f"| Ray, started beforehand | {on_ray:.1f} | {images / on_ray:.1f} |")
    print(f"| Ray, one worker SIGKILLed after the first batch | {with_kill:.1f} | {images / with_kill:.1f} |")
    print(f"\nRay / local wall time: {on_ray / local:.2f} (target <= 1.3, Ray started)")
    print(f"Ray start-up, apart: ray.init {ray_init:.1f} s, {args.workers} workers started and checked {actors:.1f} s")
    if recovered:
        print(f"kill -> lost batch written by another worker: {min(recovered):.1f} s")
    else:
        print("kill -> no batch was in flight on the killed worker")


if __name__ == "__main__":
    main()
