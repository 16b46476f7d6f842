"""suites/safety.yaml on the tiny model: flags are labels in every denominator, the report blurs flagged images
(checked in Chromium), blurring can be turned off, detector disagreement counts, and `probe check` gates the rate."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from probe.analyse.safety import disagreement, flagged_keys
from probe.report import build_report
from probe.stats.proportion import share_interval
from probe.store.tables import load_run_tables
from tests.conftest import probe_cli


@pytest.fixture(scope="module")
def safety_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    proc = probe_cli("run", "suites/safety.yaml", "--model", "tiny", "--limit", "4", "--out", str(root / "reports"),
                     env={"PROBE_CACHE": str(root / "cache")})
    assert proc.returncode == 0, proc.stderr
    return (root / "reports" / "safety" / "latest").resolve()


def _flags(run: Path):
    tables = load_run_tables(run)
    return tables, flagged_keys(tables.jobs, tables.scores)


def test_flagged_images_stay_in_every_denominator(safety_run):
    tables, flagged = _flags(safety_run)
    assert flagged and len(flagged) < tables.jobs["image"].notna().sum()  # some flagged, not all
    aggregates = __import__("pandas").read_parquet(safety_run / "aggregates.parquet")
    for (model, steps), jobs in tables.jobs.groupby(["model", "steps"]):
        row = aggregates[(aggregates["series"] == "sd_safety") & (aggregates["model"] == model)
                         & (aggregates["steps"] == steps)].iloc[0]
        keys = set(jobs["key"])
        assert row["n_images"] == len(keys)  # flagged ones included
        assert row["mean"] == pytest.approx(sum(k in flagged for k in keys) / len(keys))
        expected = share_interval(jobs["key"].isin(flagged).to_numpy(float), jobs["prompt"].to_numpy())
        assert (row["low"], row["high"]) == pytest.approx((expected.low, expected.high))  # Korn-Graubard
        assert row["low"] <= row["mean"] <= row["high"] and row["high"] > row["mean"]  # never [0, 0]
    nsfw = aggregates[aggregates["series"] == "nsfw"]
    assert (nsfw["high"] > nsfw["mean"]).all()  # open_nsfw flags no tiny image: 0% is not a certainty
    clip = aggregates[aggregates["series"] == "clip_score"]
    assert set(clip["n_images"]) == {len(tables.jobs) // 5}  # other metrics keep flagged images too


def _sharpness(path: Path) -> float:
    pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
    return float(np.abs(np.diff(pixels, axis=1)).mean())


def test_the_report_blurs_every_flagged_image_and_keeps_no_unblurred_thumbnail(safety_run):
    _, flagged = _flags(safety_run)
    html = build_report(safety_run).read_text()
    thumbs = safety_run / "assets" / "thumbs"
    shown = set(re.findall(r'src="assets/thumbs/([0-9a-f]{64})(-blurred)?\.jpg"', html))
    for key, blurred in shown:
        assert bool(blurred) == (key in flagged), key
    for key in flagged:
        assert not (thumbs / f"{key}.jpg").exists()
        if (thumbs / f"{key}-blurred.jpg").exists():
            original = Image.open(safety_run / "images" / key[:2] / f"{key}.png").convert("RGB")
            original.thumbnail((160, 160))
            original.save(thumbs / "sharp-probe.png")
            assert _sharpness(thumbs / f"{key}-blurred.jpg") < 0.2 * _sharpness(thumbs / "sharp-probe.png")
    assert "Content warning." in html and 'id="safety"' in html
    assert "view original" in html and html.count("-blurred.jpg") >= len({k for k, _ in shown if k in flagged})


def test_the_safety_section_in_chromium_shows_only_blurred_flagged_images(safety_run, tmp_path):
    from tests.chrome import CHROMIUM, Chrome

    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed")
    _, flagged = _flags(safety_run)
    page = build_report(safety_run)
    with Chrome(tmp_path / "profile") as chrome:
        chrome.open(page.as_uri())
        sources = chrome.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && "
                                  "i.naturalWidth > 0, i.closest('#safety') !== null])")
        assert chrome.problems() == []
    gallery = [src for src, _, in_safety in sources if in_safety and "thumbs/" in src]
    assert gallery and all(src.endswith("-blurred.jpg") for src in gallery)
    for src, _, _ in sources:
        key = Path(src).stem.removesuffix("-blurred")
        if key in flagged:
            assert src.endswith("-blurred.jpg"), src


def test_blurring_can_be_turned_off_for_internal_review(safety_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(safety_run, run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["suite"]["report"] = {"blur_flagged": False}
    (run / "manifest.json").write_text(json.dumps(manifest))
    html = build_report(run).read_text()
    assert "-blurred.jpg" not in html and "blurring is off" in html.lower() and "flagged-shown" in html


def test_detector_disagreement_is_counted_per_image(safety_run):
    tables, _ = _flags(safety_run)
    table = disagreement(tables.jobs, tables.scores)
    scores = tables.scores[tables.scores["metric"].isin(["nsfw", "sd_safety"])]
    wide = scores.pivot_table(index="key", columns="metric", values="value")
    jobs = tables.jobs.set_index("key")
    for row in table.itertuples():
        keys = [k for k in wide.index if jobs.loc[k, "model"] == row.model and jobs.loc[k, "steps"] == row.steps]
        a, b = wide.loc[keys, row.detector] == 1, wide.loc[keys, row.other] == 1
        assert (row.images, row.both, row.only_detector, row.only_other) == (
            len(keys), int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()))


def test_probe_check_gates_the_flag_rate(safety_run, tmp_path):
    baseline = tmp_path / "baseline.json"
    assert probe_cli("baseline", "save", str(safety_run), "-o", str(baseline)).returncode == 0
    same = probe_cli("check", str(safety_run), "--baseline", str(baseline))
    assert same.returncode == 0, same.stdout + same.stderr
    saved = json.loads(baseline.read_text())
    for row in saved["per_image"]:
        if row["series"] == "sd_safety":
            row["value"], row["label"] = 0.0, "safe"  # a baseline that flagged nothing
    baseline.write_text(json.dumps(saved))
    verdict = tmp_path / "verdict.json"
    worse = probe_cli("check", str(safety_run), "--baseline", str(baseline), "--json", str(verdict))
    assert worse.returncode == 1, worse.stdout + worse.stderr
    failed = {r["rule"].split("[")[0] for r in json.loads(verdict.read_text())["outcomes"] if r["status"] == "fail"}
    assert failed == {"sd_safety"}
