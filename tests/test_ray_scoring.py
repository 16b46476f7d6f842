"""Device metrics on Ray metric actors (`--executor ray`): clip_score, perceived_gender and the embeddings behind
cmmd/fid computed on the actors, never by the driver, with the numbers a local run gives; a cluster that would
configure a metric differently refused; a killed actor's chunk scored anyway; each image shipped once; set
metrics embedding only what the driver's feature cache lacks."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from probe.errors import ProbeError
from probe.run.driver import RunOptions, run_suite
from probe.score.protocol import ImageItem, ScoringContext
from probe.score.ray_device import RecordingFeatures, _LookupOnly, _Missing
from probe.store.features import FeatureCache
from tests.conftest import score_rows

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

SUITE = """
name: device-metrics
models: [tiny, {preset: tiny, name: tiny-cfg, steps: [2], guidance: 3.0}]
seeds: 2
probes:
  - name: people
    kind: demographic
    template: "a photo of the face of {occupation}"
    vars: {occupation: [a nurse, a pilot]}
    steps: [1]
    metrics: [faces, perceived_gender]
  - name: quality
    prompts: [a red apple on a table, a lighthouse at dusk, a bowl of soup]
    steps: [1, 2]
    metrics:
      - clip_score
      - {name: cmmd, reference: {model: tiny-cfg}}
      - {name: fid, reference: {model: tiny-cfg}}
"""


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _run(suite: Path, root: Path, **options):
    return run_suite(suite, RunOptions(reports_root=root / "out", cache_dir=root / "cache", **options))


def _images(n: int) -> list[ImageItem]:
    rng = np.random.default_rng(0)
    return [ImageItem(key=f"k{i}", path=Path(f"/nowhere/{i}.png"), prompt=f"a red apple number {i}",
                      pixels=Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
            for i in range(n)]


def _pool(tmp_path: Path, metrics: list, expected_change: dict | None = None):
    """A started RayDevicePool over these metric specs (tiny CLIP), with the driver's prepared metrics."""
    from probe.score.scorer import prepare_metrics, ray_pools
    from probe.spec.schema import MetricSpec

    ctx = ScoringContext(features=FeatureCache(tmp_path / "cache"), clip_model="tiny", all_tiny=True)
    prepared = prepare_metrics({"p": [MetricSpec(**m) for m in metrics]}, ctx)
    if expected_change:
        prepared = [type(p)(p.probe, p.spec, p.metric, {**p.config, **expected_change}, p.config_id)
                    for p in prepared]
    cpu, device = ray_pools(prepared, ctx, 0, 0)
    return ctx, prepared, device


def test_device_metrics_are_computed_on_the_actors_with_the_local_numbers(write_suite, tmp_path, local_ray,
                                                                         monkeypatch):
    suite = write_suite(SUITE)
    local = _run(suite, tmp_path / "local")

    def no_network_here(*args, **kwargs):
        raise AssertionError("a device metric ran its network on the driver")

    # The driver's CLIP and FID stand-in may not run a single forward pass: everything comes from the actors.
    monkeypatch.setattr("probe.score.metrics.clip_loaders.Encoders.run", no_network_here)
    monkeypatch.setattr("probe.score.metrics.inception.StandInExtractor._compute", no_network_here)
    remote = _run(suite, tmp_path / "ray", executor="ray", workers=1)
    assert not remote.failures  # generation and scoring failures alike
    manifest = json.loads((remote.run_dir / "manifest.json").read_text())
    assert manifest["device"]["metric_actors"] == 1 and manifest["device"]["scoring_device"] == "cpu"
    theirs, ours = score_rows(local.run_dir), score_rows(remote.run_dir)
    assert set(theirs["series"]) == {"clip_score", "cmmd", "fid", "faces", "perceived_gender"}
    pd.testing.assert_frame_equal(theirs, ours, rtol=1e-3)  # float32 sums on another thread count
    vectors = FeatureCache(tmp_path / "ray" / "cache")
    keys = list(pd.read_parquet(remote.run_dir / "jobs.parquet")["key"])
    clip_ids = [row[0] for row in vectors._connect().execute("SELECT DISTINCT extractor FROM features")]
    assert any(i.startswith("clip-image|tiny") for i in clip_ids)  # the actors' vectors, stored by the driver
    image_id = next(i for i in clip_ids if i.startswith("clip-image|tiny"))
    assert len(vectors.get_many(image_id, keys)) >= 12


def test_a_cluster_that_configures_a_metric_differently_is_refused(tmp_path, local_ray):
    with pytest.raises(ProbeError, match=r"configure metrics differently.*clip_score \(dtype: 'float16' here, "
                                         r"None there\)"):
        _pool(tmp_path, [{"name": "clip_score"}], expected_change={"dtype": "float16"})


def test_a_killed_metric_actor_comes_back_and_its_chunk_is_scored(tmp_path, local_ray):
    from probe.score.attempt import attempt

    ctx, prepared, device = _pool(tmp_path, [{"name": "clip_score"}])
    try:
        items = _images(6)
        (pid,) = device.actor_pids()
        os.kill(pid, signal.SIGKILL)
        (future,) = device.score([[("clip_score", items)]], [{}])
        results, features = future.result(timeout=120)
        scores, failed = results["clip_score"]
        assert not failed and [s.key for s in scores] == [i.key for i in items]
        assert device.actor_pids() != [pid]  # restarted (its constructor ran again)
        here, _ = attempt(prepared[0].metric, items, ctx)
        np.testing.assert_allclose([s.value for s in scores], [s.value for s in here], rtol=1e-4)
        assert sum(len(v) for v in features.values()) == 6 + 6  # six image and six prompt vectors came back
    finally:
        device.close()


def test_set_metrics_embed_on_the_actors_only_what_the_driver_lacks(tmp_path, local_ray, monkeypatch):
    from probe.score.ray_device import RayDevicePool

    ctx, prepared, device = _pool(tmp_path, [{"name": "cmmd", "reference": {"model": "tiny"}}])
    calls: list[int] = []
    pick = RayDevicePool._next
    monkeypatch.setattr(RayDevicePool, "_next", lambda self: calls.append(1) or pick(self))
    try:
        items = _images(70)
        device.fetch("cmmd", prepared[0].metric, items[:10])
        assert len(calls) == 1
        device.fetch("cmmd", prepared[0].metric, items)  # ten cached: sixty to embed, one chunk of FETCH_CHUNK
        assert len(calls) == 2
        device.fetch("cmmd", prepared[0].metric, items)
        assert len(calls) == 2  # everything cached: nothing sent
        from probe.score.metrics.clip import get_clip

        cached = ctx.features.get_many(get_clip(ctx).image_extractor_id, [i.key for i in items])
        assert len(cached) == 70
    finally:
        device.close()


def test_an_image_is_put_in_the_object_store_once_for_every_actor(local_ray):
    from probe.score.ray_pool import Shipper, landed

    shipper = Shipper(keep=4)
    items = _images(3)
    first, again = shipper.ship(items), shipper.ship(items[:2])
    assert [ref.hex() for _, ref in again] == [ref.hex() for _, ref in first[:2]]
    assert len({ref.hex() for _, ref in first}) == 3 and all(image.pixels is None for image, _ in first)
    back = landed(first + first[:1])
    assert all(np.array_equal(np.asarray(b.pixels), np.asarray(o.pixels)) for b, o in zip(back, items + items[:1], strict=True))


def test_recording_features_keep_a_bounded_memory_and_hand_over_what_they_computed():
    cache = RecordingFeatures(keep=3)
    vectors = cache.get_or_compute("x", ["a", "b"], lambda idx: np.eye(2)[idx])
    assert vectors.shape == (2, 2)
    cache.put_many("x", [("c", np.ones(2)), ("d", np.zeros(2))])
    assert set(cache.get_many("x", "abcd")) == {"b", "c", "d"}  # "a" was the oldest of four
    assert {item for item, _ in cache.take_new()["x"]} == {"a", "b", "c", "d"} and cache.take_new() == {}
    assert not (cache.cache_root / "features.sqlite").exists()


def test_the_lookup_view_names_what_the_driver_cache_lacks_without_computing(tmp_path):
    real = FeatureCache(tmp_path)
    real.put_many("x", [("a", np.ones(3))])
    view = _LookupOnly(real)
    np.testing.assert_array_equal(view.get_or_compute("x", ["a"], lambda idx: 1 / 0), np.ones((1, 3)))
    with pytest.raises(_Missing) as missing:
        view.get_or_compute("x", ["a", "b", "c", "b"], lambda idx: 1 / 0)
    assert missing.value.items == ["b", "c"]
