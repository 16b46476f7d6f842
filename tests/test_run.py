"""End to end on the tiny model: `probe run` through the CLI, re-runs, kill-and-resume, failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from probe.cli.commands import app
from tests.conftest import REPO, probe_cli

pytestmark = pytest.mark.slow


def read_run(run_dir: Path) -> tuple[dict, pd.DataFrame]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return manifest, pd.read_parquet(run_dir / "jobs.parquet")


def assert_complete(run_dir: Path, planned: int) -> pd.DataFrame:
    """Every job present exactly once, with a readable PNG inside the run folder."""
    manifest, jobs = read_run(run_dir)
    assert manifest["status"] == "complete"
    assert len(jobs) == planned == manifest["counts"]["planned"]
    assert jobs.groupby(["probe", "model", "key"]).size().max() == 1
    assert set(jobs["status"]) <= {"generated", "cached"}
    for rel in jobs["image"]:
        with Image.open(run_dir / rel) as image:
            image.verify()
    return jobs


def test_smoke_run_through_cli(smoke_run):
    root, cache, proc = smoke_run
    assert proc.returncode == 0, proc.stderr
    latest = root / "reports" / "smoke" / "latest"
    assert latest.is_symlink()
    jobs = assert_complete(latest.resolve(), planned=46)
    manifest, _ = read_run(latest)
    assert manifest["counts"] == {"planned": 46, "generated": 46, "cached": 0, "failed": 0}
    assert "generated 46" in proc.stdout
    assert set(jobs["model"]) == {"tiny", "tiny-cfg"}
    assert manifest["presets"]["tiny-cfg"]["model_id"] == "probe/tiny"
    assert manifest["packages"]["torch"] and manifest["device"]["device"] == "cpu"
    i2i = jobs[jobs["probe"] == "strength-sweep"]
    assert sorted(set(i2i["strength"])) == [0.25, 0.5, 1.0] and set(i2i["init_image"]) == {"images/house.png"}
    assert (jobs["seconds"] > 0).all()
    assert len(list(cache.glob("images/*/*.png"))) == 46


def test_rerun_generates_nothing(smoke_run):
    root, cache, first = smoke_run
    assert first.returncode == 0
    proc = probe_cli("run", "suites/smoke.yaml", "--out", str(root / "reports"), env={"PROBE_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr
    manifest, _ = read_run(root / "reports" / "smoke" / "latest")
    assert manifest["counts"] == {"planned": 46, "generated": 0, "cached": 46, "failed": 0}


def test_run_directory_is_portable(smoke_run, tmp_path):
    root, cache, first = smoke_run
    assert first.returncode == 0
    moved = tmp_path / "elsewhere"
    shutil.copytree((root / "reports" / "smoke" / "latest").resolve(), moved)
    _, jobs = read_run(moved)
    for rel in jobs["image"]:
        assert (moved / rel).is_file()
        with Image.open(moved / rel) as image:
            assert image.size == (64, 64)


KILL_SUITE = """
name: killme
models: [tiny]
seeds: 24
probes:
  - name: p
    prompts: [a red apple, a blue car, a green tree]
    steps: [1, 4]
"""


def test_resume_after_sigkill(write_suite, tmp_path):
    suite = write_suite(KILL_SUITE)
    env = {**os.environ, "PROBE_CACHE": str(tmp_path / "cache")}
    args = [sys.executable, "-m", "probe.cli", "run", str(suite), "--out", str(tmp_path / "reports"), "--batch-size", "2"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = None
    deadline = time.time() + 300
    while time.time() < deadline:
        found = list((tmp_path / "reports" / "killme").glob("*/progress.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 10:
            progress = found[0]
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert progress is not None, "the run never got going"
    done_before = len(progress.read_text().splitlines())
    assert done_before < 144, "killed too late to test resuming"

    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("resumed"), again.stdout
    run_dir = progress.parent
    jobs = assert_complete(run_dir, planned=144)
    manifest, _ = read_run(run_dir)
    counts = manifest["counts"]
    assert counts["generated"] + counts["cached"] == 144 and counts["failed"] == 0
    assert counts["generated"] >= done_before - 2  # what was logged before the kill stays generated
    assert len(list((tmp_path / "cache").glob("images/*/*.png"))) == 144  # nothing doubled
    assert len(set(jobs["key"])) == 144


def test_failed_job_is_recorded_and_run_goes_on(write_suite, tmp_path, monkeypatch):
    from probe.generate import adapter as generate

    real = generate.PipelineAdapter.generate

    def flaky(self, jobs, init_images=None):
        if any(j.prompt == "a blue car" for j in jobs):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, jobs, init_images)

    monkeypatch.setattr(generate.PipelineAdapter, "generate", flaky)
    suite = write_suite(KILL_SUITE.replace("seeds: 24", "seeds: 2"))
    result = CliRunner().invoke(app, ["run", str(suite), "--out", str(tmp_path / "reports")])
    assert result.exit_code == 1
    assert "simulated" in result.output
    manifest, jobs = read_run(tmp_path / "reports" / "killme" / "latest")
    assert manifest["counts"] == {"planned": 12, "generated": 8, "cached": 0, "failed": 4}
    assert manifest["status"] == "failed"
    failed = jobs[jobs["status"] == "failed"]
    assert set(failed["prompt"]) == {"a blue car"} and failed["error"].str.contains("out of memory").all()
    assert failed["image"].isna().all()


def test_missing_weights_fail_before_work(write_suite, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    suite = write_suite(KILL_SUITE.replace("[tiny]", "[sd-turbo]"))
    result = CliRunner().invoke(app, ["run", str(suite), "--out", str(tmp_path / "reports"), "--device", "cpu"])
    assert result.exit_code == 1
    for needle in ("sd-turbo", "stabilityai/sd-turbo", "probe models pull sd-turbo"):
        assert needle in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "reports").exists(), "no run folder may be made before the weights are checked"


def test_models_lists_presets_and_cache_state(tmp_path):
    proc = probe_cli("models", env={"HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 0, proc.stderr
    blocks = {block.split()[0]: block for block in proc.stdout.split("\n") if block and not block.startswith(" ")}
    assert {"sd-turbo", "sd21", "lcm-lora-sd15", "lcm-lora-sdxl", "sdxl-turbo", "tiny"} <= set(blocks)
    assert "stabilityai/sd-turbo @ b261bac6fd2cf515557d5d0707481eafa0485ec2" in proc.stdout
    assert blocks["tiny"].endswith("cached: yes") and blocks["sd-turbo"].endswith("cached: no")


def test_bias_suite_runs_on_tiny_with_all_four_metrics(tmp_path):
    proc = probe_cli("run", "suites/bias.yaml", "--model", "tiny", "--limit", "1", "--out", str(tmp_path / "r"),
                     env={"PROBE_CACHE": str(tmp_path / "cache")}, timeout=900)
    assert proc.returncode == 0, proc.stderr
    scores = pd.read_parquet(tmp_path / "r" / "bias" / "latest" / "scores.parquet")
    jobs = pd.read_parquet(tmp_path / "r" / "bias" / "latest" / "jobs.parquet")
    per_metric = scores.groupby("metric")["key"].nunique()
    for metric in ("faces", "perceived_gender", "skin_tone", "clip_score"):
        assert per_metric[metric] == jobs["key"].nunique()
    assert set(jobs["probe"]) == {"occupations", "descriptors"}


def test_unavailable_device_is_a_usage_error(write_suite, tmp_path):
    suite = write_suite(KILL_SUITE.replace("seeds: 24", "seeds: 1"))
    proc = probe_cli("run", str(suite), "--device", "cuda", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "no cuda device is available" in proc.stderr and "Traceback" not in proc.stderr
    proc = probe_cli("run", str(suite), "--device", "gpu", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "use cpu, cuda" in proc.stderr


def test_missing_attrs_stay_missing_in_jobs(write_suite, tmp_path):
    from probe.run.driver import RunOptions, run_suite

    suite = write_suite("""
        name: attrs
        models: [tiny]
        seeds: 1
        probes:
          - {name: a, prompts: [{prompt: x, attrs: {share: 0.5}}], steps: [1]}
          - {name: b, prompts: [{prompt: y, attrs: {share: high}}], steps: [1]}
          - {name: c, prompts: [z], steps: [1]}
    """)
    summary = run_suite(suite, RunOptions(reports_root=tmp_path / "r", cache_dir=tmp_path / "c", device="cpu"))
    jobs = pd.read_parquet(summary.run_dir / "jobs.parquet").set_index("probe")
    assert jobs.loc["a", "attr_share"] == "0.5" and jobs.loc["b", "attr_share"] == "high"
    assert pd.isna(jobs.loc["c", "attr_share"])
