"""Every shipped suite runs offline on a fresh machine with `--model tiny`.

What makes that true: the datasets ship in the package (tests/test_datasets.py), FID/KID get a seeded
random-weight stand-in for Inception-v3 when every model is tiny (as CLIP metrics get the tiny CLIP), and
the real Inception weights are checked against the hash in their name before any image is made. The slow
test at the end runs each file in suites/ as a user would, on an empty data folder, cache and torch home.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from probe.errors import ProbeError
from probe.score.metrics import fid as fid_module
from probe.score.metrics import inception
from probe.score.protocol import ImageItem, ImageSet, ScoringContext
from probe.store.features import FeatureCache

from .conftest import SUITES, probe_cli

SUITE_FILES = sorted(p.name for p in SUITES.glob("*.yaml"))


@pytest.fixture(autouse=True)
def shared_datasets(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Overrides conftest's: an empty PROBE_DATA, so only what ships in the package can be read."""
    root = tmp_path_factory.mktemp("empty-probe-data")
    monkeypatch.setenv("PROBE_DATA", str(root))
    return root


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TORCH_HOME (torch.hub reads it on every call) and no PROBE_INCEPTION_WEIGHTS."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    return home


def _images(folder: Path, prefix: str, level: int, n: int = 4) -> ImageSet:
    rng = np.random.default_rng(level)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        path = folder / f"{prefix}{i}.png"
        Image.fromarray(np.clip(rng.normal(level, 25, (64, 64, 3)), 0, 255).astype(np.uint8)).save(path)
        items.append(ImageItem(key=f"{prefix}{i}", path=path, prompt="p"))
    return ImageSet({"g": prefix}, tuple(items))


# --- the stand-in ---------------------------------------------------------------------------------------


def test_all_tiny_runs_score_fid_and_kid_on_a_random_stand_in(tmp_path, torch_home, caplog):
    ctx = ScoringContext(features=FeatureCache(tmp_path / "cache"), clip_model="tiny", all_tiny=True)
    with caplog.at_level(logging.WARNING, logger="probe.score.metrics.inception"):
        extractor = fid_module.build_extractor("inception", ctx)
    assert isinstance(extractor, inception.StandInExtractor) and fid_module.build_extractor("inception", ctx) is extractor
    assert extractor.id.startswith("random-stand-in-for-inception-v3:") and "random weights" in caplog.text
    assert fid_module.Kid().config(ctx)["extractor"] == extractor.id  # recorded in the manifest and the report
    dark, light = _images(tmp_path, "d", 40), _images(tmp_path, "l", 200)
    features = extractor.embed(dark.items, ctx.features)
    assert features.shape == (4, 64) and features.dtype == np.float32 and np.isfinite(features).all()
    assert np.array_equal(inception.StandInExtractor().embed(dark.items, FeatureCache(tmp_path / "other")), features)
    far = fid_module.Fid().score_set(dark, light, ctx).value
    near = fid_module.Fid().score_set(dark, _images(tmp_path, "d2", 41), ctx).value
    assert far is not None and near is not None and far > near >= 0


def test_runs_with_a_real_model_never_get_the_stand_in(tmp_path, torch_home):
    # A real CLIP, or the tiny CLIP asked for on real images (`--clip-model tiny`): the real Inception or an error.
    for clip in ("/some/local/clip", "tiny"):
        ctx = ScoringContext(features=FeatureCache(tmp_path), clip_model=clip)
        with pytest.raises(ProbeError, match="needs the FID Inception-v3 weights"):
            fid_module.build_extractor("inception", ctx)


def test_the_stand_in_is_a_few_ms_per_tiny_image(tmp_path):
    import time

    items = _images(tmp_path, "t", 120, n=32).items
    extractor = inception.StandInExtractor()
    extractor.embed(items[:2], FeatureCache(tmp_path / "warm"))
    start = time.perf_counter()
    extractor.embed(items, FeatureCache(tmp_path / "cache"))
    assert (time.perf_counter() - start) / len(items) < 0.1  # 2.5 ms measured on 2 cores; Inception-v3: 0.75 s


# --- the Inception weights check ------------------------------------------------------------------------


def _bogus_weights(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"random weights saved under the published name")
    return path


def test_weights_under_the_right_name_with_the_wrong_hash_are_refused(tmp_path, torch_home):
    path = _bogus_weights(torch_home / "hub" / "checkpoints" / inception.WEIGHTS_FILES[0])
    ctx = ScoringContext(features=FeatureCache(tmp_path))
    with pytest.raises(ProbeError) as info:
        fid_module.Fid().config(ctx)
    message = str(info.value)
    assert str(path) in message and inception.WEIGHTS_SHA256_PREFIX in message and inception.WEIGHTS_URL in message
    path.rename(path.with_name(inception.WEIGHTS_FILES[1]))  # pytorch-fid's name for the same file
    with pytest.raises(ProbeError, match=inception.WEIGHTS_SHA256_PREFIX):
        fid_module.Kid().config(ScoringContext(features=FeatureCache(tmp_path)))


def test_probe_inception_weights_pointing_at_a_wrong_file_is_refused(tmp_path, torch_home, monkeypatch):
    path = _bogus_weights(tmp_path / "elsewhere" / "my-inception.pth")
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(path))
    with pytest.raises(ProbeError, match=f"{re.escape(str(path))}.*expected {inception.WEIGHTS_SHA256_PREFIX}"):
        inception.InceptionExtractor()


def test_the_weights_are_hashed_once(tmp_path, torch_home, monkeypatch):
    from probe.store import hashing

    path = _bogus_weights(tmp_path / "w.pth")
    reads: list[Path] = []
    real = hashing._stream_sha256
    monkeypatch.setattr(hashing, "_stream_sha256", lambda p: reads.append(p) or real(p))
    for _ in range(3):
        with pytest.raises(ProbeError):
            inception.check_inception_weights(path)
    assert len(reads) == 1


def test_tests_may_skip_the_check_explicitly(tmp_path, torch_home):
    path = _bogus_weights(tmp_path / "random.pth")
    extractor = inception.InceptionExtractor(weights=path, expected_sha256_prefix=None)
    assert extractor.id.startswith("inception-v3-fid-pool3:sha256-")


def test_wrong_weights_fail_before_any_image_is_made(tmp_path, torch_home, write_suite):
    """A tiny run scored with a real (local-folder) CLIP needs the real Inception, which is checked first."""
    from probe.embedded.tiny_clip import save_tiny_clip
    from probe.run.driver import RunOptions, run_suite

    _bogus_weights(torch_home / "hub" / "checkpoints" / inception.WEIGHTS_FILES[0])
    suite = write_suite("""
        name: wrong-weights
        models: [tiny, {preset: tiny, name: other}]
        probes:
          - {name: p, prompts: [a cat], metrics: [{name: fid, reference: {model: other}}]}
    """)
    options = RunOptions(reports_root=tmp_path / "reports", cache_dir=tmp_path / "cache", device="cpu",
                         clip_model=str(save_tiny_clip(tmp_path / "clip")))
    with pytest.raises(ProbeError, match=inception.WEIGHTS_SHA256_PREFIX):
        run_suite(suite, options)
    assert not (tmp_path / "reports").exists() and not list((tmp_path / "cache").rglob("*.png"))


# --- every shipped suite, end to end --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", SUITE_FILES)
def test_shipped_suite_validates_and_runs_offline_on_tiny(name: str, tmp_path: Path, shared_datasets: Path):
    """`probe suites validate` then `probe run --model tiny --limit 1`, on a machine with nothing on it.

    Wall time of `probe run` on the idle 2-core machine: smoke 18 s, bias 18 s (SD 2.1's 50 steps x 16 seeds),
    quality 13 s, text 38 s (OCR on 96 images); two to six times that while other jobs share the cores.
    """
    env = {"PROBE_DATA": str(shared_datasets), "PROBE_CACHE": str(tmp_path / "cache"),
           "TORCH_HOME": str(tmp_path / "torch-home"), "PROBE_INCEPTION_WEIGHTS": "", "HF_HUB_OFFLINE": "1"}
    proc = probe_cli("suites", "validate", f"suites/{name}", env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = probe_cli("run", f"suites/{name}", "--model", "tiny", "--limit", "1", "--out", str(tmp_path / "reports"),
                     env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [latest] = (tmp_path / "reports").glob("*/latest")
    run = latest.resolve()
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
    assert (run / "index.html").is_file()
    scores = pd.read_parquet(run / "scores.parquet")
    assert len(scores) > 0
    if name == "preference.yaml":  # the preference models ran on their stand-ins, and the pairs were compared
        assert {"pickscore", "hps", "aesthetic"} <= set(scores["metric"])
        assert len(pd.read_parquet(run / "preference.parquet")) > 0 and len(pd.read_parquet(run / "elo.parquet")) > 0
    if name == "quality.yaml":  # FID/KID ran, on the stand-in
        assert {"fid", "kid"} <= set(scores["metric"]) and scores[scores["metric"] == "fid"]["value"].notna().all()
        assert "random-stand-in-for-inception-v3" in (run / "manifest.json").read_text()
