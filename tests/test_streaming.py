"""Scoring beside generation and CPU metrics in worker processes: the same scores as scoring after generation
in-process, rows written while the run still generates, set groups scored only once complete, one decode per
image, a broken pool finished in-process, and workers that never re-run a user's unguarded script."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from probe.generate.executors import LocalExecutor
from probe.run.driver import run_suite
from probe.run.options import RunOptions
from tests.conftest import REPO, score_rows

SUITE = {
    "name": "stream",
    "models": [{"preset": "tiny", "size": 128}, {"preset": "tiny", "name": "tiny-cfg", "steps": [4], "guidance": 3.0,
                                                 "size": 128}],
    "seeds": 3,
    "probes": [
        {"name": "people", "kind": "demographic", "template": "a photo of the face of {who}",
         "vars": {"who": ["a nurse", "a pilot"]}, "steps": [1, 4],
         "metrics": ["clip_score", "faces", "skin_tone", "perceived_gender"]},
        {"name": "signs", "kind": "text", "prompts": [{"prompt": 'a sign that says "OPEN"', "text": "OPEN"}],
         "steps": [1], "metrics": ["ocr"]},
        {"name": "quality", "kind": "quality", "prompts": ["a red apple", "a blue car"], "steps": [1, 4],
         "metrics": ["clip_score", {"name": "cmmd", "reference": {"model": "tiny-cfg"}}]},
    ],
}


def _suite(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "stream.yaml"
    path.write_text(yaml.safe_dump(SUITE, sort_keys=False))
    return path


def _same_scores(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Equal rows: labels exactly, values to float32 rounding (CLIP batches differ between the two ways)."""
    assert list(a["series"]) == list(b["series"]) and list(a["score_id"]) == list(b["score_id"])
    assert list(a["label"].fillna("")) == list(b["label"].fillna(""))
    np.testing.assert_allclose(a["value"].astype(float), b["value"].astype(float), rtol=0, atol=1e-4)


class WaitForScores(LocalExecutor):
    """Holds back the last batch until the streamed scorer has written rows for the images already made."""

    def __init__(self, out: Path) -> None:
        super().__init__("cpu")
        self.out = out
        self.seen_while_generating = 0

    def run(self, batches, init_images, progress=None):
        from probe.store.tables import ScoresTable

        batches = list(batches)
        made = super().run(batches, init_images, progress)
        for index, outcomes in enumerate(made):
            if index == len(batches) - 1:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and not self.seen_while_generating:
                    runs = [p for p in self.out.glob("stream/2*") if (p / "scores.parts").is_dir()]
                    if runs:
                        self.seen_while_generating = len(ScoresTable(runs[0]).frame)
                    time.sleep(0.2)
            yield outcomes


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, WaitForScores]:
    """The suite streamed with two CPU workers, and the same suite scored after generation in-process."""
    root = tmp_path_factory.mktemp("stream")
    suite = _suite(root)
    executor = WaitForScores(root / "streamed")
    streamed = run_suite(suite, RunOptions(reports_root=root / "streamed", cache_dir=root / "cache-a",
                                           score_workers=2), executor=executor)
    after = run_suite(suite, RunOptions(reports_root=root / "after", cache_dir=root / "cache-b",
                                        score_workers=0, stream_scoring=False))
    assert not streamed.failures and not after.failures
    return streamed.run_dir, after.run_dir, executor


def test_streamed_run_with_workers_scores_what_scoring_after_generation_scores(two_runs):
    streamed, after, _ = two_runs
    a, b = score_rows(streamed), score_rows(after)
    assert {"faces", "skin_tone", "perceived_gender", "ocr_cer", "clip_score", "cmmd"} <= set(a["series"])
    _same_scores(a, b)
    assert not list((streamed / "scores.parts").glob("*.parquet"))  # compacted at the end, as before


def test_rows_are_written_while_the_run_is_still_generating(two_runs):
    _, _, executor = two_runs
    assert executor.seen_while_generating > 0


def test_a_set_group_is_scored_only_once_its_images_and_its_reference_are_ready(tmp_path, two_runs):
    from probe.score.protocol import ScoringContext
    from probe.score.scorer import prepare_metrics, score_run
    from probe.spec.schema import MetricSpec
    from probe.store.features import FeatureCache
    from probe.store.tables import ScoresTable

    _, after, _ = two_runs
    run = tmp_path / "run"
    shutil.copytree(after / "images", run / "images")
    jobs = pd.read_parquet(after / "jobs.parquet")
    jobs = jobs[jobs["probe"] == "quality"]
    ctx = ScoringContext(features=FeatureCache(tmp_path / "cache"), clip_model="tiny", run_dir=run, all_tiny=True)
    spec = MetricSpec.model_validate({"name": "cmmd", "reference": {"model": "tiny-cfg"}})
    prepared = prepare_metrics({"quality": [spec]}, ctx)
    sink = ScoresTable(run)
    subject_1 = set(jobs.loc[(jobs["model"] == "tiny") & (jobs["steps"] == 1), "key"])
    reference = set(jobs.loc[jobs["model"] == "tiny-cfg", "key"])
    one_short = subject_1 | set(sorted(reference)[1:])
    score_run(run, jobs, prepared, ctx, sink=sink, kinds=frozenset({"set"}), ready=one_short)
    assert sink.frame.empty  # the reference lacks one image: nothing yet
    score_run(run, jobs, prepared, ctx, sink=sink, kinds=frozenset({"set"}), ready=subject_1 | reference)
    rows = sink.frame
    assert list(rows["steps"]) == [1] and list(rows["model"]) == ["tiny"]  # the steps=4 group is not ready
    score_run(run, jobs, prepared, ctx, sink=sink, kinds=frozenset({"set"}))
    assert sorted(sink.frame["steps"]) == [1, 4] and len(sink.frame) == 2  # the first row reused, not doubled


def _copy_unscored(run_dir: Path, to: Path) -> pd.DataFrame:
    shutil.copytree(run_dir / "images", to / "images")
    return pd.read_parquet(run_dir / "jobs.parquet")


def test_each_image_is_decoded_once_for_all_the_metrics_of_its_probe(tmp_path, two_runs, monkeypatch):
    import PIL.Image

    from probe.score.protocol import ScoringContext
    from probe.score.scorer import prepare_metrics, score_run
    from probe.spec.schema import MetricSpec
    from probe.store.features import FeatureCache
    from probe.store.tables import ScoresTable

    _, after, _ = two_runs
    run = tmp_path / "run"
    jobs = _copy_unscored(after, run)
    jobs = jobs[jobs["probe"] == "people"]
    ctx = ScoringContext(features=FeatureCache(tmp_path / "cache"), clip_model="tiny", run_dir=run, all_tiny=True)
    names = ["faces", "skin_tone", "perceived_gender", "clip_score", "ocr"]
    prepared = prepare_metrics({"people": [MetricSpec(name=n) for n in names]}, ctx)
    opened: list[str] = []
    real_open = PIL.Image.open

    def counting(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting)
    counts = score_run(run, jobs, prepared, ctx, sink=ScoresTable(run))
    assert all(counts.computed[name] == jobs["key"].nunique() for name in names)
    pngs = [name for name in opened if name.endswith(".png")]
    assert sorted(pngs) == sorted(f"{key}.png" for key in jobs["key"].unique())  # once each, not once per metric


def test_a_pool_that_breaks_is_finished_in_process(tmp_path, two_runs):
    from probe.score.image_pass import score_images
    from probe.score.protocol import ScoringContext
    from probe.score.scorer import prepare_metrics
    from probe.spec.schema import MetricSpec
    from probe.store.features import FeatureCache
    from probe.store.tables import ScoresTable

    class BrokenPool:
        workers, broken, submitted = 2, False, 0

        def usable(self, labels):
            return not self.broken

        def submit(self, task):
            self.submitted += 1
            future: Future = Future()
            future.set_exception(BrokenProcessPool("a worker was killed"))
            return future

    _, after, _ = two_runs
    run = tmp_path / "run"
    jobs = _copy_unscored(after, run)
    jobs = jobs[jobs["probe"] == "people"]
    ctx = ScoringContext(features=FeatureCache(tmp_path / "cache"), clip_model="tiny", run_dir=run, all_tiny=True)
    prepared = prepare_metrics({"people": [MetricSpec(name="faces"), MetricSpec(name="skin_tone")]}, ctx)
    pool = BrokenPool()
    failures: list = []
    sink = ScoresTable(run)
    counts = score_images(prepared, jobs, run, ctx, sink, None, failures, pool)  # type: ignore[arg-type]
    assert pool.submitted >= 1 and pool.broken and not failures
    assert counts["faces"][0] == jobs["key"].nunique()
    assert sink.frame.groupby("series").size().to_dict() == {"faces": jobs["key"].nunique(),
                                                             "skin_tone": jobs["key"].nunique()}


def test_workers_do_not_run_a_users_unguarded_script_again(tmp_path, two_runs):
    _, after, _ = two_runs
    images = tmp_path / "images"
    images.mkdir()
    rows = ["file,prompt"]
    for i, png in enumerate(sorted((after / "images").rglob("*.png"))[:6]):
        shutil.copy(png, images / f"{i}.png")
        rows.append(f"{i}.png,a photo of a face")
    (tmp_path / "prompts.csv").write_text("\n".join(rows) + "\n")
    script = tmp_path / "unguarded.py"  # no `if __name__ == "__main__":`, as many a notebook-turned-script
    script.write_text(textwrap.dedent(f"""
        from pathlib import Path
        from probe.run.external import ScoreRequest, score_images
        run_dir, counts = score_images(ScoreRequest(
            images=Path({str(images)!r}), prompts=Path({str(tmp_path / 'prompts.csv')!r}),
            metrics=("faces", "skin_tone"), out=Path({str(tmp_path / 'out')!r}), clip_model="tiny",
            cache_dir=Path({str(tmp_path / 'cache')!r}), score_workers=2))
        print("SCORED", counts["computed"], counts["failures"])
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("SCORED") == 1 and "BrokenProcessPool" not in proc.stderr
    assert "'faces': 6" in proc.stdout and "[]" in proc.stdout
    assert len(list((tmp_path / "out").glob("*/2*"))) == 1  # one run folder: no worker started its own


def _session_processes(sid: int) -> list[int]:
    """Processes still running in session `sid` (the run and any worker it started); zombies, which are dead and
    only wait for their new parent to reap them, do not count."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                running = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
                if os.getsid(int(entry.name)) == sid and running:
                    alive.append(int(entry.name))
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                continue
    return alive


def test_ctrl_c_while_workers_score_exits_promptly_and_the_rerun_doubles_nothing(tmp_path):
    from probe.store.tables import read_scores

    suite = {"name": "interrupt", "models": [{"preset": "tiny", "size": 192}], "seeds": 12,
             "probes": [{"name": "signs", "kind": "text", "steps": [1, 2, 4],
                         "prompts": [{"prompt": f'a sign that says "SHOP {i}"', "text": f"SHOP {i}"} for i in range(4)],
                         "metrics": ["clip_score", "ocr"]}]}
    path = tmp_path / "interrupt.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    command = [sys.executable, "-m", "probe.cli", "run", str(path), "--out", str(tmp_path / "out"), "--batch-size", "2",
               "--score-workers", "2"]
    env = {**os.environ, "PROBE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not list((tmp_path / "out").glob("interrupt/2*/scores.parts/*.parquet")):
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before any streamed score was written"
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - started < 20, stderr.decode()[-2000:]
    assert "CPU scoring workers failed" not in stderr.decode()
    time.sleep(1)
    assert _session_processes(proc.pid) == []  # no worker left behind
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    scores = read_scores(next((tmp_path / "out").glob("interrupt/2*")))
    assert scores.groupby("series").size().to_dict() == {name: 144 for name in (
        "clip_score", "ocr_cer", "ocr_detected", "ocr_exact", "ocr_f1")}


def test_an_unreadable_image_fails_alone_for_each_metric_of_the_shared_pass(tmp_path, two_runs):
    from probe.score.protocol import ScoringContext
    from probe.score.scorer import prepare_metrics, score_run
    from probe.spec.schema import MetricSpec
    from probe.store.features import FeatureCache
    from probe.store.tables import ScoresTable

    _, after, _ = two_runs
    run = tmp_path / "run"
    jobs = _copy_unscored(after, run)
    jobs = jobs[jobs["probe"] == "people"].drop_duplicates("key")
    broken = jobs.iloc[2]
    (run / broken["image"]).unlink()
    (run / broken["image"]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ctx = ScoringContext(features=FeatureCache(tmp_path / "cache"), clip_model="tiny", run_dir=run, all_tiny=True)
    names = ["faces", "clip_score"]
    prepared = prepare_metrics({"people": [MetricSpec(name=n) for n in names]}, ctx)
    sink = ScoresTable(run)
    counts = score_run(run, jobs, prepared, ctx, sink=sink)
    assert sorted(f["error"].split(":")[0] for f in counts.failures) == ["score clip_score", "score faces"]
    assert {f["key"] for f in counts.failures} == {broken["key"]}
    scored = sink.frame
    assert broken["key"] not in set(scored["key"]) and scored["key"].nunique() == len(jobs) - 1
