"""The Python API on a tiny-model run: frame shape, summary = report numbers, images, grids, compare."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import probe
from probe.analyse.aggregate import aggregate
from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture
def run(smoke_run):
    root, _, proc = smoke_run
    assert proc.returncode == 0, proc.stderr
    return probe.load_run(root / "reports" / "smoke" / "latest")


def test_frame_has_one_row_per_image_and_a_column_per_metric(run):
    frame = run.frame()
    assert len(frame) == 46 == len(run.jobs)
    assert frame["clip_score"].notna().all()
    expected = run.scores[run.scores["metric"] == "clip_score"].set_index("key")["value"]
    assert np.allclose(frame.set_index("key")["clip_score"].sort_index(), expected.sort_index())


def test_summary_is_the_stored_aggregates_and_recomputes_identically(run):
    stored = run.summary()
    pd.testing.assert_frame_equal(stored, pd.read_parquet(run.path / "aggregates.parquet"))
    again = aggregate(run.jobs, run.scores)
    pd.testing.assert_frame_equal(stored.reset_index(drop=True), again.reset_index(drop=True), check_dtype=False)


def test_summary_by_custom_columns(run):
    by_model = run.summary(by=["model"]).set_index(["model", "metric"])
    frame = run.frame()
    for model, mean in frame.groupby("model")["clip_score"].mean().items():
        assert by_model.loc[(model, "clip_score"), "mean"] == pytest.approx(mean)
        assert by_model.loc[(model, "clip_score"), "n_images"] == (frame["model"] == model).sum()


def test_image_round_trip(run, smoke_run):
    _, cache, _ = smoke_run
    key = run.jobs["key"].iloc[0]
    image = run.image(key)
    with Image.open(cache / "images" / key[:2] / f"{key}.png") as stored:
        assert np.array_equal(np.asarray(image), np.asarray(stored.convert("RGB")))
    with pytest.raises(probe.UsageError):
        run.image("0" * 64)


def test_grid_figure_layout(run):
    fig = run.grid(probe="occupations", seed=0)
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 2 * 4  # two prompts x (tiny at 1, 2, 4 steps + tiny-cfg at 4)
    assert fig.get_suptitle() == "seed 0"


def test_compare_two_runs(run, tmp_path):
    assert (probe.compare(run, run)["delta"] == 0).all()
    other = tmp_path / "other"
    shutil.copytree(run.path, other)
    scores = pd.read_parquet(other / "scores.parquet")
    tiny_keys = set(run.jobs.loc[run.jobs["model"] == "tiny", "key"])
    bump = scores["key"].isin(tiny_keys) & (scores["metric"] == "clip_score")
    scores.loc[bump, "value"] += 1.5
    scores.to_parquet(other / "scores.parquet", index=False)
    deltas = probe.compare(run, other).set_index(["model", "metric"])
    assert np.allclose(deltas.loc[("tiny", "clip_score"), "delta"], 1.5)
    assert np.allclose(deltas.loc[("tiny-cfg", "clip_score"), "delta"], 0.0)


def test_load_run_rejects_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(probe.UsageError, match="not a run directory"):
        probe.load_run(tmp_path)


def test_import_probe_is_light():
    code = "import sys, probe; probe.load_suite; print('torch' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.split() == ["False", "False"]


def test_readme_api_example_runs_as_written(smoke_run, tmp_path):
    root, _, proc = smoke_run
    assert proc.returncode == 0
    text = (REPO / "README.md").read_text()
    api_section = text.split("## Python API and notebooks", 1)[1]
    example = api_section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "reports" / "smoke").mkdir(parents=True)
    (tmp_path / "reports" / "smoke" / "latest").symlink_to((root / "reports" / "smoke" / "latest").resolve())
    done = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True,
                          env={"MPLBACKEND": "Agg", "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert "clip_score" in done.stdout and (tmp_path / "grid.png").is_file()
