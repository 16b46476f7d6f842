"""Nothing lost, nothing silently wrong: torn logs, corrupt cache entries, failing metrics, locks, resumes.

Each test damages what a crash or a bad disk would and checks the next run repairs it (or refuses it with a
clear message) and ends with the same numbers as an undamaged run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from probe.run.driver import run_suite
from probe.run.folder import RunDir
from probe.run.options import RunOptions
from probe.run.records import JobResult
from probe.store.features import FeatureCache
from probe.store.images import ImageStore, verify_png
from probe.store.score_cache import ScoreCache
from probe.store.tables import read_scores
from tests.conftest import REPO, probe_cli, score_rows

SUITE = """
name: drill
models: [tiny]
seeds: 2
probes:
  - name: quality
    prompts: [a red apple on a table, a lighthouse at dusk]
    steps: [1, 2]
    metrics: [clip_score]
  - name: signs
    kind: text
    prompts:
      - {text: OPEN, prompt: 'a shop sign that says "OPEN"'}
    steps: [1]
    metrics: [ocr]
"""


def _run(suite: Path, out: Path, cache: Path, **options: object):
    return run_suite(suite, RunOptions(reports_root=out, cache_dir=cache, **options))  # type: ignore[arg-type]


# --- the progress log ------------------------------------------------------------------------------------------


def test_a_torn_last_line_is_ended_before_the_next_append_and_nothing_else_is_lost(tmp_path):
    run = RunDir(tmp_path)
    run.append_results([JobResult(key="a", status="generated", seconds=0.1)])
    with (tmp_path / "progress.jsonl").open("ab") as handle:
        handle.write(b'{"key": "b", "stat')  # killed mid-append
    run.append_results([JobResult(key="c", status="cached")])
    with (tmp_path / "progress.jsonl").open("ab") as handle:
        handle.write(b"\xff\xfe not utf-8 \xc3\n")
    run.append_results([JobResult(key="d", status="failed", error="x")])
    assert set(run.read_results()) == {"a", "c", "d"}  # "c" was not glued onto the fragment


# --- corrupt cache entries -------------------------------------------------------------------------------------


def test_a_truncated_cached_image_is_moved_aside_regenerated_and_rescored(write_suite, tmp_path):
    suite = write_suite(SUITE)
    cache = tmp_path / "cache"
    first = _run(suite, tmp_path / "out", cache)
    expected = score_rows(first.run_dir)
    jobs = pd.read_parquet(first.run_dir / "jobs.parquet")
    key = jobs.loc[jobs["probe"] == "quality", "key"].iloc[0]
    store = ImageStore(cache)
    data = store.path(key).read_bytes()
    store.path(key).write_bytes(data[: len(data) // 2])  # in place: the run folder's hard link is cut too
    assert verify_png(first.run_dir / "images" / key[:2] / f"{key}.png", key) is not None
    FeatureCache(cache).put("probe-test-extractor", key, np.ones(3))
    scores = read_scores(first.run_dir)
    stale = scores[scores["key"] == key].iloc[0].to_dict()
    ScoreCache(cache).add(stale["config_id"], [{**stale, "value": 999.0, "extra": None}])  # a stale cached score
    second = _run(suite, tmp_path / "out", cache, new_run=True)
    assert second.counts.generated == 1 and second.report is not None
    assert store.verify(key) is None and any((cache / "quarantine").glob(f"{key}.*.png"))
    assert FeatureCache(cache).get("probe-test-extractor", key) is None  # its features were forgotten
    again = score_rows(second.run_dir)
    assert 999.0 not in set(again["value"])  # nothing cached for the bad image was reused
    # regenerated alone rather than in a batch of four, its pixels may differ in the last bits on a CPU
    pd.testing.assert_frame_equal(again, expected, rtol=1e-3)


def test_a_damaged_score_cache_database_is_moved_aside_and_scores_recomputed(write_suite, tmp_path):
    suite = write_suite(SUITE)
    cache = tmp_path / "cache"
    first = _run(suite, tmp_path / "out", cache)
    (cache / "scores.sqlite").write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (cache / f"scores.sqlite{suffix}").unlink(missing_ok=True)
    second = _run(suite, tmp_path / "out", cache, new_run=True)
    assert second.report is not None and list(cache.glob("scores.sqlite.corrupt-*"))
    pd.testing.assert_frame_equal(score_rows(second.run_dir), score_rows(first.run_dir))


def test_unreadable_score_cache_records_are_dropped_and_scored_again(tmp_path):
    cache = ScoreCache(tmp_path)
    cache.add("c", [{"score_id": "s1", "key": "k1", "metric": "m", "value": 1.0}])
    cache.add("c", [{"score_id": "s2", "key": "k2", "metric": "m", "value": 2.0}])
    cache.close()
    db = sqlite3.connect(tmp_path / "scores.sqlite")
    for bad, sid in (("null", "s2"), ("123", "s3"), ('{"a": 1}', "s4"), ("[]", "s5"), ("\udcff", "s6")):
        db.execute("INSERT OR REPLACE INTO scores VALUES ('c', ?, 'k', ?)", (sid, bad.encode("utf-8", "surrogatepass")
                   .decode("utf-8", "replace")))
    db.commit()
    db.close()
    again = ScoreCache(tmp_path)
    assert set(again.rows("c")) == {"s1"}
    assert set(ScoreCache(tmp_path).rows("c")) == {"s1"}  # the bad records are gone, not read again


def test_an_image_counts_as_scored_only_with_every_row_its_metric_writes(tmp_path):
    from probe.store.tables import ScoresTable

    cache = ScoreCache(tmp_path / "cache")
    cache.add("ocr1", [{"score_id": "s", "key": "k", "metric": "ocr_exact", "config_id": "ocr1", "value": 1.0}])
    (tmp_path / "run").mkdir()
    table = ScoresTable(tmp_path / "run", cache)
    outputs = frozenset({"ocr_exact", "ocr_cer", "ocr_f1", "ocr_detected"})
    assert table.reuse("ocr1", ["s"], outputs) == set() and table.frame.empty
    assert table.reuse("ocr1", ["s"]) == {"s"}  # a metric that declares no outputs takes what is there


def _set_blob(path: Path, extractor: str, item: str, dtype: str, data: bytes) -> None:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE features SET dtype = ?, data = ? WHERE extractor = ? AND item = ?", (dtype, data, extractor,
                                                                                               item))


def test_corrupt_feature_vectors_are_recomputed(tmp_path):
    cache = FeatureCache(tmp_path)
    calls: list[list[int]] = []

    def compute(indices: list[int]) -> np.ndarray:
        calls.append(list(indices))
        return np.full((len(indices), 4), 2.0, dtype=np.float32)

    cache.get_or_compute("x", ["a", "b", "c", "d", "e"], compute)
    cache.close()
    database = tmp_path / "features.sqlite"
    _set_blob(database, "x", "a", "<f4", b"\x00\x00\x80")  # torn: not a whole float
    _set_blob(database, "x", "b", "<f8", np.ones(9).tobytes())  # another width
    _set_blob(database, "x", "c", "|O", b"\x93NUMPY garbage")  # not a float type
    _set_blob(database, "x", "d", "<f4", np.array([1.0, np.nan, 0, 0], dtype="<f4").tobytes())  # not finite
    calls.clear()
    out = FeatureCache(tmp_path).get_or_compute("x", ["a", "b", "c", "d", "e"], compute)
    assert out.shape == (5, 4) and (out == 2.0).all() and sorted(i for c in calls for i in c) == [0, 1, 2, 3]
    assert len(list((tmp_path / "quarantine" / "features").glob("*.bin"))) == 4  # kept for a person to inspect
    calls.clear()
    FeatureCache(tmp_path).get_or_compute("x", ["a", "b", "c", "d", "e"], compute)
    assert calls == []


def test_a_feature_database_that_does_not_open_is_moved_aside(tmp_path):
    FeatureCache(tmp_path).put("x", "a", np.ones(3))
    (tmp_path / "features.sqlite").write_bytes(b"not a database " * 100)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"features.sqlite{suffix}").unlink(missing_ok=True)
    cache = FeatureCache(tmp_path)
    assert cache.get("x", "a") is None and list(tmp_path.glob("features.sqlite.corrupt-*"))
    cache.put("x", "a", np.ones(3))
    assert (FeatureCache(tmp_path).get("x", "a") == 1.0).all()


def test_a_corrupt_scores_table_is_repaired_by_run_and_refused_clearly_by_readers(write_suite, tmp_path):
    suite = write_suite(SUITE)
    cache = tmp_path / "cache"
    first = _run(suite, tmp_path / "out", cache)
    expected = score_rows(first.run_dir)
    (first.run_dir / "scores.parquet").write_bytes(b"PAR1 torn")
    (first.run_dir / "index.html").unlink()  # as if killed before the report: the rerun resumes this folder
    report = probe_cli("report", str(first.run_dir))
    assert report.returncode == 2 and "scores.parquet is not a readable table" in report.stderr
    assert "Traceback" not in report.stderr
    second = _run(suite, tmp_path / "out", cache)
    assert second.resumed and second.run_dir == first.run_dir and (first.run_dir / "index.html").is_file()
    pd.testing.assert_frame_equal(score_rows(second.run_dir), expected)


# --- scoring failures ------------------------------------------------------------------------------------------


@pytest.fixture
def flaky_metric():
    """A registered metric that raises on images of the prompt 'a lighthouse at dusk' (until told not to)."""
    from probe.score import protocol
    from probe.score.protocol import Metric, Score, registered
    from probe.spec.metric_catalog import METRICS, MetricInfo

    state = {"broken": True}

    @registered
    class Flaky(Metric):
        info = MetricInfo("flaky", "image", "brightness that fails on one prompt", direction="higher")

        def config(self, ctx):
            return {}

        def score(self, items, ctx):
            if state["broken"] and any(i.prompt == "a lighthouse at dusk" for i in items):
                raise RuntimeError("the lighthouse broke me")
            return [Score(self.name, float(np.asarray(i.open().convert("L")).mean()), key=i.key) for i in items]

    yield state
    del METRICS["flaky"]
    protocol._IN_PROCESS.pop("flaky", None)


def test_a_metric_that_raises_on_one_image_is_recorded_and_the_run_goes_on(write_suite, tmp_path, flaky_metric):
    suite = write_suite(SUITE.replace("metrics: [clip_score]", "metrics: [flaky, clip_score]"))
    cache = tmp_path / "cache"
    summary = _run(suite, tmp_path / "out", cache)
    failed = [f for f in summary.failures if "flaky" in f["error"]]
    assert len(failed) == 4 and all("the lighthouse broke me" in f["error"] for f in failed)  # 2 seeds x 2 steps
    assert {f["prompt"] for f in failed} == {"a lighthouse at dusk"}
    scores = read_scores(summary.run_dir)
    assert (scores["series"] == "flaky").sum() == 4  # the apple's images are scored
    assert (scores["series"] == "clip_score").sum() == 8 and (scores["series"] == "ocr_exact").sum() == 2
    manifest = json.loads((summary.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed" and len(manifest["score_failures"]) == 4
    flaky_metric["broken"] = False
    again = _run(suite, tmp_path / "out", cache, new_run=True)
    assert again.failures == [] and (read_scores(again.run_dir)["series"] == "flaky").sum() == 8


def test_the_cli_exits_1_listing_a_failed_score(write_suite, tmp_path):
    suite = write_suite(SUITE)
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "sitecustomize.py").write_text(
        "from probe.score.protocol import Metric, registered\n"
        "from probe.spec.metric_catalog import MetricInfo\n"
        "@registered\n"
        "class Broken(Metric):\n"
        "    info = MetricInfo('broken', 'image', 'always raises', direction='higher')\n"
        "    def config(self, ctx): return {}\n"
        "    def score(self, items, ctx): raise ValueError('no luck')\n")
    suite.write_text(suite.read_text().replace("metrics: [clip_score]", "metrics: [broken]"))
    proc = probe_cli("run", str(suite), "--out", str(tmp_path / "out"),
                     env={"PYTHONPATH": f"{plugin}{os.pathsep}{REPO}", "PROBE_CACHE": str(tmp_path / "c")})
    assert proc.returncode == 1, proc.stderr
    assert "score broken: ValueError: no luck" in proc.stderr and "Traceback" not in proc.stderr
    assert "report:" in proc.stdout  # the report is still written


# --- locks and honest resumes ----------------------------------------------------------------------------------


def test_a_second_run_into_a_held_folder_says_who_holds_it(write_suite, tmp_path):
    suite = write_suite(SUITE)
    cache = tmp_path / "cache"
    first = _run(suite, tmp_path / "out", cache)
    (first.run_dir / "index.html").unlink()  # unfinished: the next run of this plan resumes into it
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from probe.run.folder import RunDir\n"
                               f"with RunDir({str(first.run_dir)!r}).lock():\n"
                               "    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        proc = probe_cli("run", str(suite), "--out", str(tmp_path / "out"), env={"PROBE_CACHE": str(cache)})
        assert proc.returncode == 2 and f"pid {holder.pid}" in proc.stderr and "--new" in proc.stderr
        assert "Traceback" not in proc.stderr and not (first.run_dir / "index.html").exists()
    finally:
        holder.kill()
        holder.wait()
    done = _run(suite, tmp_path / "out", cache)  # once the holder is gone the folder is free again
    assert done.resumed and done.run_dir == first.run_dir and (first.run_dir / "index.html").is_file()


def test_files_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        from probe.store import atomic

        target = tmp_path / "f.bin"
        atomic.atomic_write_bytes(target, b"x")
        assert target.stat().st_mode & 0o777 == atomic.FILE_MODE == 0o644
    finally:
        os.umask(old)


def test_random_kills_resume_to_the_tables_of_an_unkilled_run(write_suite, tmp_path):
    """Five SIGKILLs at random moments (seeded), each followed by a resume; then one finishing run."""
    suite = write_suite(SUITE)
    clean = probe_cli("run", str(suite), "--out", str(tmp_path / "clean"), env={"PROBE_CACHE": str(tmp_path / "c1")})
    assert clean.returncode == 0, clean.stderr
    expected = score_rows(tmp_path / "clean" / "drill" / "latest")
    draw = random.Random(13)
    env = {**os.environ, "PROBE_CACHE": str(tmp_path / "c2")}
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-m", "probe.cli", "run", str(suite), "--out", str(tmp_path / "out")],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(draw.uniform(2.0, 12.0))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    final = probe_cli("run", str(suite), "--out", str(tmp_path / "out"), env={"PROBE_CACHE": str(tmp_path / "c2")})
    assert final.returncode == 0, final.stderr
    runs = [p for p in (tmp_path / "out" / "drill").iterdir() if p.is_dir() and not p.is_symlink()]
    # a kill before a run finished resumes its folder; only a run that finished (report written) is followed
    # by a new folder, so every folder is complete now and holds the same numbers
    for run_dir in runs:
        assert (run_dir / "index.html").is_file(), run_dir
        pd.testing.assert_frame_equal(score_rows(run_dir), expected)
        jobs = pd.read_parquet(run_dir / "jobs.parquet")
        assert (jobs["status"] != "failed").all()
