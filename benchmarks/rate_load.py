"""Load on the rating server: concurrent raters voting against a real `probe rate` on loopback, measured in one run.

    python benchmarks/rate_load.py                 # 20 raters, 12 pairs x 2 questions each: 480 votes
    python benchmarks/rate_load.py --clients 50 --pairs 16

A run folder is generated first on the tiny model (two configurations, tiny@1 and tiny-cfg@4, in a temp folder),
then `probe rate RUN --compare tiny tiny-cfg --pairs N --attention 0 --raters CLIENTS --question quality
--question prompt --port 0` serves it in a subprocess, exactly as a user starts it. Each client is a thread with
its own HTTP connection and rater link; it loops GET next -> POST vote until the server says done, and re-POSTs
about `--retry` of its votes a second time (a retry after a lost response), which must come back as duplicates.

Printed: votes/s (new votes acknowledged per second of the load, retries not counted), latency of the vote POSTs
(p50 / p95 / max, retries included), lost votes (acknowledged but not in ratings.sqlite), doubled votes (a task
stored twice, or stored with another choice than acknowledged), retries not answered as duplicates, and errors.
Every vote is committed with synchronous=FULL before it is acknowledged, so the disk's fsync time is in every
figure: a temp folder on tmpfs is faster than the run folder on disk (--dir picks where the run folder goes).
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import random
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"^\s+(\S+): (http://127\.0\.0\.1:\d+/r/\S+)\s*$")
CSRF = re.compile(r'data-csrf="([0-9a-f]+)"')
THINGS = ["apple", "car", "tree", "house", "cat", "dog", "boat", "tower", "chair", "lamp", "kite", "clock"]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "old", "tall"]


def suite(n_prompts: int) -> str:
    prompts = [f"a {COLOURS[i % len(COLOURS)]} {THINGS[i // len(COLOURS) % len(THINGS)]}" for i in range(n_prompts)]
    return f"""
name: rating
models:
  - tiny
  - {{preset: tiny, name: tiny-cfg, steps: [4], guidance: 3.0}}
seeds: 2
probes:
  - name: quality
    kind: quality
    prompts: [{", ".join(prompts)}]
    steps: [1]
    metrics: [clip_score]
"""


def make_run(root: Path, pairs: int) -> Path:
    """`probe run` of a tiny suite with at least `pairs` pairs (two seeds per prompt); its run folder."""
    path = root / "rating.yaml"
    path.write_text(suite(max(4, math.ceil(pairs / 2))))
    proc = subprocess.run([sys.executable, "-m", "probe.cli", "run", str(path), "--out", str(root / "reports")],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PROBE_CACHE": str(root / "cache")})
    if proc.returncode != 0:
        raise SystemExit(f"probe run failed:\n{proc.stdout}\n{proc.stderr}")
    return (root / "reports" / "rating" / "latest").resolve()


def start_server(run_dir: Path, clients: int, pairs: int) -> tuple[subprocess.Popen[str], dict[str, str]]:
    command = [sys.executable, "-m", "probe.cli", "rate", str(run_dir), "--compare", "tiny", "tiny-cfg", "--pairs",
               str(pairs), "--attention", "0", "--raters", str(clients), "--question", "quality", "--question",
               "prompt", "--port", "0"]
    proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    links: dict[str, str] = {}
    deadline = time.monotonic() + 120
    while True:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            raise SystemExit("the server printed no 'serving' line in 120 s") from None
        if line is None:
            raise SystemExit(f"the server exited ({proc.wait()}) before serving")
        if found := LINK.match(line):
            links[found.group(1)] = found.group(2)
        if line.startswith("serving"):
            return proc, links


def stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Rater(threading.Thread):
    """One rater: its own connection, GET next -> POST vote until done, some votes posted twice."""

    def __init__(self, name: str, link: str, retry: float, start_line: threading.Barrier) -> None:
        super().__init__(daemon=True)
        self.rater, self.link, self.retry, self.start_line = name, link, retry, start_line
        self.acked: list[tuple[str, int, str, str]] = []
        self.latencies: list[float] = []
        self.retries = self.not_duplicate = 0
        self.error: str | None = None

    def run(self) -> None:
        rng = random.Random(self.rater)
        try:
            with httpx.Client(timeout=30) as client:
                page = client.get(self.link)
                headers = {"X-Probe-CSRF": CSRF.search(page.text).group(1)}
                self.start_line.wait(timeout=60)
                for _ in range(10_000):
                    state = client.get(f"{self.link}/next").raise_for_status().json()
                    if state["done"]:
                        return
                    task = state["task"]
                    body = {"pair": task["pair"], "question": task["question"], "choice": rng.choice(["left", "right"])}
                    started = time.perf_counter()
                    answer = client.post(f"{self.link}/vote", json=body, headers=headers)
                    self.latencies.append(time.perf_counter() - started)
                    answer.raise_for_status()
                    if answer.json()["duplicate"]:
                        raise RuntimeError(f"a first vote came back as a duplicate: {body}")
                    self.acked.append((self.rater, task["pair"], task["question"], body["choice"]))
                    if rng.random() < self.retry:
                        started = time.perf_counter()
                        again = client.post(f"{self.link}/vote", json=body, headers=headers)
                        self.latencies.append(time.perf_counter() - started)
                        self.retries += 1
                        self.not_duplicate += again.raise_for_status().json()["duplicate"] is not True
        except Exception as exc:  # noqa: BLE001 - counted and printed
            self.error = f"{self.rater}: {exc!r}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20, help="concurrent raters (one link and thread each)")
    parser.add_argument("--pairs", type=int, default=12, help="pairs per rater (x 2 questions = tasks)")
    parser.add_argument("--retry", type=float, default=0.2, help="share of votes posted a second time")
    parser.add_argument("--dir", type=Path, default=None, help="where the run folder goes (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="probe-rate-load-", dir=args.dir) as tmp:
        started = time.perf_counter()
        run_dir = make_run(Path(tmp), args.pairs)
        print(f"run folder generated on the tiny model in {time.perf_counter() - started:.1f} s: {run_dir}")
        proc, links = start_server(run_dir, args.clients, args.pairs)
        try:
            barrier = threading.Barrier(len(links) + 1)
            raters = [Rater(name, link, args.retry, barrier) for name, link in links.items()]
            for rater in raters:
                rater.start()
            barrier.wait(timeout=60)  # every client has its page and CSRF value: the load starts now
            began = time.perf_counter()
            for rater in raters:
                rater.join(timeout=600)
            seconds = time.perf_counter() - began
        finally:
            code = stop(proc)
        with sqlite3.connect(run_dir / "ratings.sqlite") as db:
            rows = [(r[0], int(r[1]), r[2], r[3]) for r in
                    db.execute("SELECT rater, pair, question, choice FROM votes")]
            tasks_per_rater = db.execute("SELECT count(*) FROM pairs").fetchone()[0] * 2
    acked = [vote for rater in raters for vote in rater.acked]
    stored = {row[:3]: row[3] for row in rows}
    lost = sum(vote[:3] not in stored for vote in acked)
    doubled = (len(rows) - len(stored)) + sum(stored.get(vote[:3], vote[3]) != vote[3] for vote in acked)
    unasked = len(set(stored) - {vote[:3] for vote in acked})
    latencies = sorted(t for rater in raters for t in rater.latencies)
    errors = [rater.error for rater in raters if rater.error] + [f"{r.rater}: still running" for r in raters
                                                                  if r.is_alive()]
    retries = sum(r.retries for r in raters)
    ms = 1000
    print(f"{len(raters)} clients x {tasks_per_rater} tasks ({args.pairs} pairs x 2 questions), "
          f"{args.retry:.0%} re-posted; votes committed with synchronous=FULL on {tmp}")
    print(f"  votes acknowledged  {len(acked)} of {len(raters) * tasks_per_rater} in {seconds:.2f} s: "
          f"{len(acked) / seconds:.1f} votes/s")
    print(f"  POST vote latency   p50 {statistics.median(latencies) * ms:.1f} ms, "
          f"p95 {latencies[int(0.95 * (len(latencies) - 1))] * ms:.1f} ms, max {latencies[-1] * ms:.1f} ms "
          f"({len(latencies)} POSTs, {retries} of them retries)")
    print(f"  rows in votes       {len(rows)}")
    print(f"  lost {lost}, doubled {doubled}, stored but never acknowledged {unasked}, "
          f"retries not answered duplicate {sum(r.not_duplicate for r in raters)}")
    print(f"  errors {len(errors)}{': ' + '; '.join(errors[:3]) if errors else ''}")
    print(f"  server exit status after Ctrl-C: {code}")


if __name__ == "__main__":
    main()
