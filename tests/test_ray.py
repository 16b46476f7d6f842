"""`--executor ray` on a local Ray (2 CPUs, tiny model): the same images and scores as the local executor,
worker deaths survived by the driver, a poison job recorded failed, stale workers refused, the driver's own
death resumed, and a cluster joined by address. Skipped when Ray is not installed (`pip install 'probe[ray]'`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from probe.errors import ProbeError
from probe.run.driver import RunOptions, run_suite
from tests.conftest import score_rows

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

SUITE = """
name: cluster
models: [tiny]
seeds: 3
probes:
  - name: quality
    prompts: [a red apple on a table, a lighthouse at dusk, a bowl of soup]
    steps: [1, 2]
    metrics: [clip_score]
  - name: signs
    kind: text
    prompts:
      - {text: OPEN, prompt: 'a shop sign that says "OPEN"'}
    steps: [1]
    metrics: [ocr]
"""


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (its start-up is seconds); executors reuse it and leave it running."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _executor(**kw):
    from probe.generate.ray_executor import RayExecutor

    return RayExecutor(workers=2, **kw).connect()


def _run(suite: Path, root: Path, executor=None, progress=None, executor_kind: str = "local", **options):
    """run_suite with this executor object; `executor_kind` is what RunOptions says (scoring follows it)."""
    return run_suite(suite, RunOptions(reports_root=root / "out", cache_dir=root / "cache", executor=executor_kind,
                                       **options), progress=progress, executor=executor)


def _ledger_keys(run_dir: Path) -> list[str]:

    return [json.loads(line)["key"] for line in (run_dir / "progress.jsonl").read_text().splitlines() if line]


def test_ray_makes_the_same_jobs_images_and_scores_as_the_local_executor(write_suite, tmp_path, local_ray,
                                                                         monkeypatch):
    from probe.score.ray_pool import RayCpuPool

    suite = write_suite(SUITE)
    local = _run(suite, tmp_path / "local")
    tasks: list[int] = []
    submit = RayCpuPool.submit
    monkeypatch.setattr(RayCpuPool, "submit", lambda self, task: tasks.append(len(task)) or submit(self, task))
    executor = _executor()
    try:  # OCR on a Ray actor (score_workers=1: the pool even for these few images), waiting for the GPUs' CPUs
        remote = _run(suite, tmp_path / "ray", executor=executor, executor_kind="ray", score_workers=1)
    finally:
        executor.close()
    assert tasks and sum(tasks) > 0  # the CPU metric went to the Ray actors
    assert remote.counts.generated == remote.counts.planned == 21 and not remote.failures
    drop = ["seconds"]
    pd.testing.assert_frame_equal(pd.read_parquet(local.run_dir / "jobs.parquet").drop(columns=drop),
                                  pd.read_parquet(remote.run_dir / "jobs.parquet").drop(columns=drop))
    pngs = sorted((local.run_dir / "images").rglob("*.png"))
    assert len(pngs) == 21
    for png in pngs:
        assert png.read_bytes() == (remote.run_dir / png.relative_to(local.run_dir)).read_bytes()
    pd.testing.assert_frame_equal(score_rows(local.run_dir), score_rows(remote.run_dir), rtol=1e-4)
    devices = set(pd.read_parquet(remote.run_dir / "jobs.parquet")["device_name"])
    assert devices == {"cpu"}

    manifest = json.loads((remote.run_dir / "manifest.json").read_text())
    assert manifest["device"]["executor"] == "ray" and manifest["device"]["worker_devices"] == ["cpu"]


class KillAfterFirstBatch:
    """Progress that SIGKILLs one generation actor once the first batch is durable."""

    def __init__(self, executor) -> None:
        self.executor = executor
        self.killed: list[int] = []

    def start(self, total: int) -> None: ...
    def group(self, label: str, total: int) -> None: ...
    def finish(self) -> None: ...

    def advance(self, n: int) -> None:
        if not self.killed:
            pid = self.executor.worker_pids()[0]
            os.kill(pid, signal.SIGKILL)
            self.killed.append(pid)


def test_a_killed_worker_is_survived_every_key_written_once(write_suite, tmp_path, local_ray):
    suite = write_suite(SUITE.replace("metrics: [clip_score]", "metrics: []").replace("metrics: [ocr]", "metrics: []"))
    executor = _executor()
    progress = KillAfterFirstBatch(executor)
    try:
        summary = _run(suite, tmp_path, executor=executor, progress=progress, batch_size=2)
    finally:
        executor.close()
    assert progress.killed and executor.deaths >= 1
    assert summary.counts.generated == summary.counts.planned == 21 and not summary.failures
    keys = _ledger_keys(summary.run_dir)
    assert len(keys) == len(set(keys)) == 21  # nothing doubled
    assert len(list((summary.run_dir / "images").rglob("*.png"))) == 21


def test_a_job_that_kills_its_worker_every_time_is_recorded_failed(write_suite, tmp_path, local_ray):
    from tests.ray_workers import POISON, PoisonWorker

    suite = write_suite(f"""
name: poison
models: [tiny]
seeds: 2
probes:
  - name: p
    prompts: [a red apple, {POISON}]
    steps: [1]
""")
    executor = _executor(actor_class=PoisonWorker)
    try:
        summary = _run(suite, tmp_path, executor=executor, batch_size=4)
    finally:
        executor.close()
    assert summary.counts.planned == 4 and summary.counts.generated == 2 and summary.counts.failed == 2
    assert {f["prompt"] for f in summary.failures} == {POISON}
    assert all("worker died" in f["error"] for f in summary.failures)


def test_a_worker_with_other_library_versions_is_refused_before_any_run_folder(write_suite, tmp_path, local_ray):
    from tests.ray_workers import StaleWorker

    suite = write_suite(SUITE)
    executor = _executor(actor_class=StaleWorker)
    try:
        with pytest.raises(ProbeError, match=r"refused a Ray worker on cpu: its diffusers 0\.0\.1 \(driver: "):
            _run(suite, tmp_path, executor=executor)
    finally:
        executor.close()
    assert not (tmp_path / "out" / "cluster").exists() or not any((tmp_path / "out" / "cluster").glob("2*"))


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "probe.cli", *args], cwd=cwd, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, never `ray stop`
    except ProcessLookupError:
        pass
    proc.wait(30)


@pytest.mark.slow
def test_killing_the_driver_and_running_again_resumes(write_suite, tmp_path):
    suite = write_suite(SUITE.replace("seeds: 3", "seeds: 6"))
    args = ["run", str(suite), "--executor", "ray", "--workers", "2", "--batch-size", "2",
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    first = _cli(*args, cwd=tmp_path)
    ledger = None
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        found = list((tmp_path / "out" / "cluster").glob("2*/progress.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 4:
            ledger = found[0]
            break
        time.sleep(0.2)
    _kill_session(first)
    assert ledger is not None, "the first run wrote no batch in time"
    done = len(_ledger_keys(ledger.parent))
    second = _cli(*args, cwd=tmp_path)
    try:
        out, err = second.communicate(timeout=400)
    finally:
        _kill_session(second)
    assert second.returncode == 0, err[-2000:]
    assert f"resumed {ledger.parent}" in out.replace("\n", "")
    keys = _ledger_keys(ledger.parent)
    assert len(keys) == len(set(keys)) == 42 and done < 42


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_joining_a_cluster_by_address(write_suite, tmp_path):
    port = _free_port()
    import secrets

    # Ray maps 127.0.0.1 to the LAN address unless told not to; the head and the driver share one auth token.
    loopback = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    ray_bin = Path(sys.executable).parent / "ray"
    short_temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must fit in 107 bytes
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", f"--temp-dir={short_temp}"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **loopback})
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        suite = write_suite(SUITE.replace("seeds: 3", "seeds: 1"))
        proc = subprocess.run([sys.executable, "-m", "probe.cli", "run", str(suite), "--executor", "ray",
                               "--address", f"127.0.0.1:{port}", "--workers", "2",
                               "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")],
                              cwd=tmp_path, capture_output=True, text=True, timeout=180, env={**os.environ, **loopback})
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "generated 7" in proc.stdout
    finally:
        _kill_session(head)
        shutil.rmtree(short_temp, ignore_errors=True)


def test_probe_score_runs_its_metrics_on_ray_actors_with_the_same_scores(write_suite, tmp_path, local_ray,
                                                                       monkeypatch):
    from probe.run.external import ScoreRequest, score_images
    from probe.score.ray_pool import RayCpuPool

    made = _run(write_suite(SUITE.replace("seeds: 3", "seeds: 1")), tmp_path / "made")
    images = tmp_path / "images"
    images.mkdir()
    rows = ["file,prompt,text"]
    for i, png in enumerate(sorted((made.run_dir / "images").rglob("*.png"))):
        shutil.copy(png, images / f"{i}.png")
        rows.append(f"{i}.png,a shop sign,OPEN")
    (tmp_path / "prompts.csv").write_text("\n".join(rows) + "\n")
    tasks: list[int] = []
    submit = RayCpuPool.submit
    monkeypatch.setattr(RayCpuPool, "submit", lambda self, task: tasks.append(len(task)) or submit(self, task))
    results = {}
    for executor in ("local", "ray"):
        run_dir, counts = score_images(ScoreRequest(
            images=images, prompts=tmp_path / "prompts.csv", metrics=("ocr", "skin_tone", "clip_score"),
            out=tmp_path / executor,
            clip_model="tiny", cache_dir=tmp_path / f"cache-{executor}", score_workers=1, executor=executor))
        assert not counts["failures"] and counts["computed"]
        results[executor] = score_rows(run_dir)
    pd.testing.assert_frame_equal(results["local"], results["ray"], rtol=1e-4)
    assert sum(tasks) >= 2  # both CPU metrics went to the Ray CPU actors
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["device"]["metric_actors"] == 1  # clip_score on a metric actor
    assert ray.is_initialized()  # the Ray it found running is left running


@pytest.mark.slow
def test_ctrl_c_under_ray_exits_cleanly_and_leaves_no_process(write_suite, tmp_path):
    from tests.test_streaming import _session_processes

    suite = write_suite(SUITE.replace("seeds: 3", "seeds: 8"))
    args = ["run", str(suite), "--executor", "ray", "--workers", "2", "--batch-size", "2",
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    proc = _cli(*args, cwd=tmp_path)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            found = list((tmp_path / "out" / "cluster").glob("2*/progress.jsonl"))
            if found and len(found[0].read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGINT)
        started = time.time()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err[-2000:]
        assert time.time() - started < 30 and "run the same command again to resume" in err
        time.sleep(2)
        assert _session_processes(proc.pid) == []  # Ray's raylet, GCS and workers went with the driver
    finally:
        _kill_session(proc)
