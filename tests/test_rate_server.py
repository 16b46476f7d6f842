"""`probe rate` as a real server in a subprocess on loopback: concurrent raters with retried POSTs store every
acknowledged vote exactly once; a server killed with SIGKILL loses no vote and the same link resumes where the
rater left off; Ctrl-C stops it cleanly."""

from __future__ import annotations

import os
import queue
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"^\s+(\S+): (http://127\.0\.0\.1:(\d+)/r/(\S+))\s*$")
CSRF = re.compile(r'data-csrf="([0-9a-f]+)"')


class RateServer:
    """`probe rate RUN --compare tiny tiny-cfg ARGS --port 0` in a subprocess; `links` maps rater -> link."""

    def __init__(self, run_dir: Path, *args: str) -> None:
        self.command = [sys.executable, "-m", "probe.cli", "rate", str(run_dir), "--compare", "tiny", "tiny-cfg",
                        *args, "--port", "0"]
        self.proc: subprocess.Popen[str] | None = None
        self.links: dict[str, str] = {}
        self.out: list[str] = []
        self.err: list[str] = []

    def start(self, timeout: float = 60) -> RateServer:
        self.out, self.err, self.links = [], [], {}
        self.proc = subprocess.Popen(self.command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        lines: queue.Queue[str | None] = queue.Queue()

        def drain(stream, keep: list[str], forward: bool) -> None:
            for line in stream:
                keep.append(line)
                if forward:
                    lines.put(line)
            if forward:
                lines.put(None)

        threading.Thread(target=drain, args=(self.proc.stdout, self.out, True), daemon=True).start()
        threading.Thread(target=drain, args=(self.proc.stderr, self.err, False), daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise TimeoutError(f"the server printed no 'serving' line in {timeout} s: {self.output()}") from None
            if line is None:
                self.proc.wait(timeout=10)
                raise RuntimeError(f"the server exited ({self.proc.returncode}) before serving: {self.output()}")
            found = LINK.match(line)
            if found:
                self.links[found.group(1)] = found.group(2)
            if line.startswith("serving"):
                return self

    def output(self) -> str:
        return f"stdout:\n{''.join(self.out)}\nstderr:\n{''.join(self.err)}"

    def interrupt(self, timeout: float = 20) -> int:
        """Ctrl-C (SIGINT); kill when it has not exited within `timeout`. Its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        time.sleep(0.2)  # the drain threads read what it printed last
        return self.proc.returncode

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=20)


def token_of(link: str) -> str:
    return link.rsplit("/r/", 1)[1]


def csrf_of(client: httpx.Client, link: str) -> str:
    """The CSRF value from the rater's page, as the page's script reads it."""
    page = client.get(link)
    assert page.status_code == 200, page.text
    found = CSRF.search(page.text)
    assert found, page.text
    return found.group(1)


def stored_votes(run_dir: Path) -> list[tuple[str, int, str, str]]:
    """(rater, pair, question, choice) of every row of the votes table, in insertion order."""
    with sqlite3.connect(run_dir / "ratings.sqlite", timeout=30) as db:
        return [(r[0], int(r[1]), r[2], r[3]) for r in
                db.execute("SELECT rater, pair, question, choice FROM votes ORDER BY id")]


@pytest.mark.slow
def test_concurrent_raters_with_retries_store_every_acknowledged_vote_exactly_once(rating_run):
    started = time.monotonic()
    server = RateServer(rating_run, "--pairs", "12", "--attention", "0", "--raters", "20", "--question", "quality",
                        "--question", "prompt").start()
    acknowledged: dict[str, list[tuple[str, int, str, str]]] = {}
    retries: dict[str, list[bool]] = {}
    errors: list[str] = []
    try:
        assert len(server.links) == 20

        def rate(rater: str, link: str) -> None:
            base = link
            rng = random.Random(rater)
            mine: list[tuple[str, int, str, str]] = []
            repeated: list[bool] = []
            try:
                with httpx.Client(timeout=20) as client:
                    headers = {"X-Probe-CSRF": csrf_of(client, link)}
                    for _ in range(100):  # 24 tasks; a bound, so a server that never says done cannot hang us
                        state = client.get(f"{base}/next")
                        assert state.status_code == 200, state.text
                        state = state.json()
                        if state["done"]:
                            break
                        task = state["task"]
                        body = {"pair": task["pair"], "question": task["question"],
                                "choice": rng.choice(["left", "right"])}
                        answer = client.post(f"{base}/vote", json=body, headers=headers)
                        assert answer.status_code == 200, answer.text
                        assert answer.json()["stored"] is True and answer.json()["duplicate"] is False, answer.text
                        mine.append((rater, task["pair"], task["question"], body["choice"]))
                        if rng.random() < 0.2:  # a retry after a lost response
                            again = client.post(f"{base}/vote", json=body, headers=headers)
                            assert again.status_code == 200, again.text
                            repeated.append(again.json()["duplicate"] is True)
                    else:
                        raise AssertionError("the server never said done")
                    assert state["progress"] == {"answered": 24, "total": 24}
            except Exception as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(f"{rater}: {exc!r}")
            acknowledged[rater], retries[rater] = mine, repeated

        threads = [threading.Thread(target=rate, args=item, daemon=True) for item in server.links.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(1.0, 50 - (time.monotonic() - started)))
        assert not any(thread.is_alive() for thread in threads), "raters still busy after 50 s"
        assert errors == []
    finally:
        server.interrupt()
    acked = [vote for rater in sorted(acknowledged) for vote in acknowledged[rater]]
    rows = stored_votes(rating_run)
    assert len(acked) == 480 and len({v[:3] for v in acked}) == 480
    assert len(rows) == 480 and len({r[:3] for r in rows}) == 480  # no row twice
    assert sorted(rows) == sorted(acked)  # every acknowledged vote, with its choice, and nothing else
    repeated = [flag for flags in retries.values() for flag in flags]
    assert 40 <= len(repeated) <= 160 and all(repeated)  # about one in five re-posted, every one a duplicate


@pytest.mark.slow
def test_a_killed_server_loses_no_vote_and_the_same_link_resumes_at_the_next_task(rating_run):
    args = ("--pairs", "6", "--attention", "0", "--raters", "1")
    server = RateServer(rating_run, *args).start()
    try:
        (rater, link), = server.links.items()
        answered = []
        with httpx.Client(timeout=20) as client:
            headers = {"X-Probe-CSRF": csrf_of(client, link)}
            state = client.get(f"{link}/next").json()
            for i in range(4):
                task = state["task"]
                body = {"pair": task["pair"], "question": task["question"], "choice": ("left", "right")[i % 2]}
                state = client.post(f"{link}/vote", json=body, headers=headers).json()
                assert state["stored"] is True and state["duplicate"] is False
                answered.append((rater, task["pair"], task["question"], body["choice"]))
            before = client.get(f"{link}/next").json()
        assert before["progress"] == {"answered": 4, "total": 6}
        server.proc.send_signal(signal.SIGKILL)
        assert server.proc.wait(timeout=20) == -signal.SIGKILL
    finally:
        server.kill()
    assert stored_votes(rating_run) == answered  # every acknowledged vote survived the kill

    again = RateServer(rating_run, *args).start()
    try:
        assert "resumed" in "".join(again.out)
        assert {r: token_of(u) for r, u in again.links.items()} == {rater: token_of(link)}  # the same link
        link = again.links[rater]
        with httpx.Client(timeout=20) as client:
            after = client.get(f"{link}/next").json()
            assert after["progress"] == {"answered": 4, "total": 6}
            assert after["task"] == before["task"]  # task 5, with the same images on the same sides
            task = after["task"]
            state = client.post(f"{link}/vote", json={"pair": task["pair"], "question": task["question"],
                                                      "choice": "left"},
                                headers={"X-Probe-CSRF": csrf_of(client, link)}).json()
            assert state["duplicate"] is False and state["progress"] == {"answered": 5, "total": 6}
    finally:
        again.interrupt()
    assert stored_votes(rating_run) == [*answered, (rater, task["pair"], task["question"], "left")]


@pytest.mark.slow
def test_ctrl_c_stops_the_server_cleanly(rating_run):
    server = RateServer(rating_run, "--pairs", "2", "--attention", "0", "--raters", "1").start()
    try:
        link = next(iter(server.links.values()))
        with httpx.Client(timeout=20) as client:
            assert client.get(f"{link}/next").status_code == 200  # uvicorn is up and serving
    finally:
        code = server.interrupt()
    assert code == 0, server.output()
    assert "stopped" in "".join(server.out), server.output()
    assert "Traceback" not in "".join(server.err), server.output()
