"""FID / KID: the maths equals closed forms and torchmetrics on fixed features; extractors and caches behave.

The Inception tests use randomly initialised weights of the right architecture: they prove the weights
lookup, loading and preprocessing path, not FID numbers (real weights are never downloaded here).
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import linalg

from probe.errors import ProbeError, UsageError
from probe.score.metrics import fid as fid_module
from probe.score.metrics.distribution import (
    Gaussian,
    adapt_subset_size,
    feature_stats,
    frechet_distance,
    frechet_to,
    kid,
    poly_kernel,
)
from probe.score.metrics.inception import WEIGHTS_FILES, WEIGHTS_URL, InceptionExtractor, clean_resize, pool3_features
from probe.score.protocol import ImageItem, ImageSet, ScoringContext, SetMetric
from probe.store.features import FeatureCache


def _features(n: int = 300, d: int = 12, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    """Correlated Gaussian features; the mixing matrix is fixed, so equal shifts mean equal distributions."""
    mixing = np.random.default_rng(1234).normal(size=(d, d)) / np.sqrt(d)
    return np.random.default_rng(seed).normal(size=(n, d)) @ mixing + shift


def _closed_form(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID by another route: Tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), the latter symmetric PSD."""
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1.T), np.cov(f2.T)
    w, v = linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


class _Fixed:
    """A torchmetrics `feature` module: the 'images' passed in are the features themselves."""

    @staticmethod
    def module(d: int):
        import torch

        class Identity(torch.nn.Module):
            num_features = d

            def forward(self, x):
                return x.double()

        return Identity()


def test_frechet_distance_equals_closed_form():
    f1, f2 = _features(seed=1), _features(shift=0.3, seed=2)
    ours = frechet_distance(*feature_stats(f1), *feature_stats(f2))
    assert ours == pytest.approx(_closed_form(f1, f2), rel=1e-6)


def test_frechet_distance_equals_torchmetrics():
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    f1, f2 = _features(seed=3), _features(shift=0.2, seed=4)
    metric = FrechetInceptionDistance(feature=_Fixed.module(f1.shape[1]))
    metric.update(torch.from_numpy(f1), real=True)
    metric.update(torch.from_numpy(f2), real=False)
    ours = frechet_distance(*feature_stats(f2), *feature_stats(f1))
    assert ours == pytest.approx(float(metric.compute()), rel=1e-4)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    f = _features(seed=5)
    mu, sigma = feature_stats(f)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_frechet_distance_with_fewer_samples_than_dimensions_is_finite():
    f1, f2 = _features(n=10, d=40, seed=6), _features(n=10, d=40, shift=1.0, seed=7)
    value = frechet_distance(*feature_stats(f1), *feature_stats(f2))
    assert np.isfinite(value) and value > 0


@pytest.mark.parametrize(("n", "d", "n_ref"), [(300, 12, 48), (15, 40, 160), (2, 5, 20), (30, 40, 25), (50, 20, 20)])
def test_frechet_to_equals_the_sqrtm_formula(n: int, d: int, n_ref: int):
    """Cholesky factor (n_ref > d) and data factor (n_ref <= d, singular reference covariance) alike."""
    f1, f2 = _features(n=n, d=d, shift=0.3, seed=20), _features(n=n_ref, d=d, seed=21)
    reference = Gaussian.of(f2)
    assert reference.factor.shape == ((d, d) if n_ref > d else (d, n_ref))
    expected = frechet_distance(*feature_stats(f1), reference.mu, reference.sigma)
    assert frechet_to(f1, reference) == pytest.approx(expected, rel=1e-6)
    assert abs(frechet_to(f2, reference)) < 1e-6 * np.trace(reference.sigma)


def _mmd2_loops(x: np.ndarray, y: np.ndarray) -> float:
    m, d = x.shape

    def k(a, b):
        return (sum(a[i] * b[i] for i in range(d)) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_equals_hand_computed_unbiased_mmd():
    x, y = _features(n=6, d=4, seed=8), _features(n=6, d=4, shift=0.5, seed=9)
    mean, std = kid(x, y, subset_size=6, n_subsets=1)
    assert mean == pytest.approx(_mmd2_loops(x, y), rel=1e-8, abs=1e-12)
    assert std == 0.0


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save:UserWarning")
def test_kid_equals_torchmetrics_when_subsets_are_whole_sets():
    import torch
    from torchmetrics.image.kid import KernelInceptionDistance

    f1, f2 = _features(n=40, d=8, seed=10), _features(n=40, d=8, shift=0.4, seed=11)
    metric = KernelInceptionDistance(feature=_Fixed.module(8), subsets=3, subset_size=40)
    metric.update(torch.from_numpy(f1), real=True)
    metric.update(torch.from_numpy(f2), real=False)
    ref_mean, ref_std = (float(v) for v in metric.compute())
    mean, std = kid(f2, f1, subset_size=40, n_subsets=3)
    assert mean == pytest.approx(ref_mean, rel=1e-8)
    assert std == pytest.approx(ref_std, abs=1e-12)


def test_kid_precomputed_kernels_equal_per_subset_products():
    f1, f2 = _features(n=60, d=8, seed=22), _features(n=45, d=8, shift=0.2, seed=23)
    whole = kid(f1, f2, subset_size=20, n_subsets=7, seed=3)
    per_subset = kid(f1, f2, subset_size=20, n_subsets=7, seed=3, max_gram=0)
    assert whole == pytest.approx(per_subset, rel=1e-10)
    kept = kid(f1, f2, subset_size=20, n_subsets=7, seed=3, max_gram=60, k22=poly_kernel(f2, f2))
    assert kept == pytest.approx(per_subset, rel=1e-10)
    assert whole != kid(f1, f2, subset_size=20, n_subsets=7, seed=4)


def test_kid_subset_size_adapts_to_small_sets():
    assert adapt_subset_size(5000, 3000) == 1000
    assert adapt_subset_size(12, 30) == 12
    assert adapt_subset_size(30, 7, requested=10) == 7
    with pytest.raises(ValueError, match="at least 2"):
        adapt_subset_size(1, 50)
    with pytest.raises(ValueError, match="subset_size"):
        kid(_features(n=5), _features(n=50), subset_size=10)


def test_a_shifted_set_is_farther():
    ref, near, far = _features(seed=12), _features(seed=13), _features(shift=1.0, seed=14)
    stats = feature_stats(ref)
    assert frechet_distance(*feature_stats(far), *stats) > frechet_distance(*feature_stats(near), *stats) * 5
    assert kid(far, ref, 100, 10)[0] > kid(near, ref, 100, 10)[0] + 0.1


# --- set metrics on a fake extractor ------------------------------------------------------------------------


class FakeExtractor:
    """Features from a table, counting which keys each call asked for."""

    mode = "raw"

    def __init__(self, table: dict[str, np.ndarray], id: str = "fake:v1") -> None:
        self.table, self.id, self.calls = table, id, []

    def embed(self, items, cache):
        self.calls.append([item.key for item in items])
        return np.stack([self.table[item.key] for item in items])


def _set(prefix: str, features: np.ndarray, **group) -> tuple[ImageSet, dict[str, np.ndarray]]:
    keys = [f"{prefix}{i:04d}" for i in range(len(features))]
    items = tuple(ImageItem(key=k, path=Path("unused.png"), prompt="p") for k in keys)
    return ImageSet(group=group, items=items), dict(zip(keys, features, strict=True))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    images, t1 = _set("img", _features(n=50, d=6, shift=0.5, seed=15), probe="q", steps=1)
    reference, t2 = _set("ref", _features(n=80, d=6, seed=16))
    extractor = FakeExtractor({**t1, **t2})
    monkeypatch.setattr(fid_module, "build_extractor", lambda features, ctx: extractor)
    return types.SimpleNamespace(images=images, reference=reference, extractor=extractor,
                                 ctx=ScoringContext(features=FeatureCache(tmp_path)))  # fmt: skip


def _rows(fake, image_set: ImageSet) -> np.ndarray:
    return np.stack([fake.extractor.table[item.key] for item in image_set.items])


def test_fid_and_kid_follow_the_set_metric_protocol(fake):
    for metric, name in ((fid_module.Fid(), "fid"), (fid_module.Kid(), "kid")):
        assert isinstance(metric, SetMetric)
        assert (metric.name, metric.direction, metric.kind, metric.ci_groups) == (name, "lower", "set", 30)
    shuffled = fake.images.items[::-1]
    assert np.array_equal(fid_module.Fid().embed(shuffled, fake.ctx), np.stack([fake.extractor.table[i.key] for i in shuffled]))


def test_fid_compare_equals_the_formula_and_keeps_the_reference_moments(fake, monkeypatch):
    features, reference = _rows(fake, fake.images), _rows(fake, fake.reference)
    made, original = [], Gaussian.of
    monkeypatch.setattr(fid_module.Gaussian, "of", classmethod(lambda cls, f: made.append(1) or original(f)))
    metric = fid_module.Fid()
    value, extra = metric.compare(features, reference)
    assert value == pytest.approx(frechet_distance(*feature_stats(features), *feature_stats(reference)), rel=1e-9)
    metric.compare(features[:20], reference)  # a bootstrap resample: same reference array, moments reused
    assert len(made) == 1
    metric.compare(features, reference.copy())
    assert len(made) == 2
    with pytest.raises(ValueError):
        metric.compare(features[:1], reference)


def test_score_set_record_and_reference_stats_cache(fake):
    first = fid_module.Fid().score_set(fake.images, fake.reference, fake.ctx)
    expected = frechet_distance(*feature_stats(_rows(fake, fake.images)), *feature_stats(_rows(fake, fake.reference)))
    assert first.value == pytest.approx(expected, rel=1e-9)
    assert (first.metric, first.group, first.n) == ("fid", {"probe": "q", "steps": 1}, 50)
    assert first.extra == {"n_reference": 80, "extractor": "fake:v1", "mode": "raw"}
    assert len(fake.extractor.calls) == 2  # reference, then images
    second = fid_module.Kid(n_subsets=5).score_set(fake.images, fake.reference, fake.ctx)
    assert len(fake.extractor.calls) == 3 and all(k.startswith("img") for k in fake.extractor.calls[-1])
    assert second.value == pytest.approx(kid(_rows(fake, fake.images), _rows(fake, fake.reference), 50, 5)[0])
    assert len(list((fake.ctx.features.cache_root / "refstats").glob("*-raw-*.npz"))) == 1


def test_reference_cache_key_covers_extractor_and_keys(fake):
    cache = fake.ctx.features
    path = fid_module.reference_stats_path(fake.extractor, fake.reference, cache)
    reordered = ImageSet(group={}, items=tuple(reversed(fake.reference.items)))
    assert fid_module.reference_stats_path(fake.extractor, reordered, cache) == path
    smaller = ImageSet(group={}, items=fake.reference.items[:-1])
    assert fid_module.reference_stats_path(fake.extractor, smaller, cache) != path
    other = FakeExtractor(fake.extractor.table, id="fake:v2")
    assert fid_module.reference_stats_path(other, fake.reference, cache) != path
    other.mode = "other"
    assert "-other-" in fid_module.reference_stats_path(other, fake.reference, cache).name


def test_kid_adapts_and_records_subset_size(fake):
    features, reference = _rows(fake, fake.images), _rows(fake, fake.reference)
    value, extra = fid_module.Kid(subset_size=1000, n_subsets=5).compare(features, reference)
    assert extra["subset_size"] == 50 and extra["subset_adapted"] is True
    assert extra["n_subsets"] == 5 and extra["std"] >= 0 and value > 0
    value, extra = fid_module.Kid(subset_size=20, n_subsets=5).compare(features, reference)
    assert extra["subset_size"] == 20 and extra["subset_adapted"] is False
    assert value == pytest.approx(kid(features, reference, 20, 5)[0])
    config = fid_module.Kid(n_subsets=3).config(fake.ctx)
    assert config == {"features": "inception", "extractor": "fake:v1", "mode": "raw", "subset_size": 1000,
                      "n_subsets": 3, "seed": 0, "kernel": "(x.y/d + 1)^3"}  # fmt: skip


def test_too_small_sets_and_bad_args(fake):
    one = ImageSet(group={"g": 1}, items=fake.images.items[:1])
    score = fid_module.Fid().score_set(one, fake.reference, fake.ctx)
    assert score.value is None and score.n == 1 and score.extra["reason"]
    with pytest.raises(ProbeError, match="reference set has 1"):
        fid_module.Fid().score_set(fake.images, one, fake.ctx)
    with pytest.raises(ValueError):
        fid_module.Kid().compare(_rows(fake, one), _rows(fake, fake.reference))
    with pytest.raises(UsageError, match="did you mean 'clip'"):
        fid_module.Fid(features="clipp")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="subset_size"):
        fid_module.Kid(subset_size=1)


def test_clip_features_wrap_the_clip_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    backend = types.SimpleNamespace(
        image_extractor_id="clip:fake-l14:r1", image_embeddings=lambda items, cache: np.full((len(items), 4), 3.0)
    )
    monkeypatch.setitem(sys.modules, "probe.score.metrics.clip", types.SimpleNamespace(get_clip=lambda ctx: backend))
    ctx = ScoringContext(features=FeatureCache(tmp_path))
    extractor = fid_module.build_extractor("clip", ctx)
    assert extractor.id == "clip:fake-l14:r1:fd" and extractor is fid_module.build_extractor("clip", ctx)
    images, _ = _set("a", np.zeros((3, 1)))
    assert np.allclose(extractor.embed(images.items, ctx.features), 0.5)
    assert fid_module.Fid(features="clip").config(ctx)["extractor"] == "clip:fake-l14:r1:fd"


def test_fid_and_kid_on_the_tiny_clip_backend(tmp_path: Path):
    """End to end through the real CLIP backend (embedded tiny model): images in, a finite distance out."""
    rng = np.random.default_rng(24)
    made = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        base = 40 if i < 6 else 200  # two visibly different halves
        Image.fromarray(np.clip(rng.normal(base, 20, (32, 32, 3)), 0, 255).astype(np.uint8)).save(path)
        made.append(ImageItem(key=f"k{i:02d}", path=path, prompt="p"))
    ctx = ScoringContext(features=FeatureCache(tmp_path / "cache"), clip_model="tiny")
    images, reference = ImageSet({"g": 1}, tuple(made[:6])), ImageSet({}, tuple(made[6:]))
    fid_score = fid_module.Fid(features="clip").score_set(images, reference, ctx)
    kid_score = fid_module.Kid(features="clip", n_subsets=4).score_set(images, reference, ctx)
    assert fid_score.extra["extractor"].endswith(":fd") and fid_score.extra["mode"] == "clip-l2"
    assert np.isfinite(fid_score.value) and fid_score.value > 0 and np.isfinite(kid_score.value)
    norms = np.linalg.norm(fid_module.Fid(features="clip").embed(made, ctx), axis=1)
    assert np.allclose(norms, 1.0)


def test_metrics_modules_do_not_import_torch():
    code = "import sys, probe.score.metrics.fid, probe.score.metrics.distribution; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


# --- Inception extractor -------------------------------------------------------------------------------------


def test_missing_inception_weights_error_says_where(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import torch

    monkeypatch.delenv("PROBE_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ProbeError) as info:
        fid_module.Fid().config(ScoringContext(features=FeatureCache(tmp_path)))
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / WEIGHTS_FILES[0]) in message
    assert WEIGHTS_URL in message and "features: clip" in message and "PROBE_INCEPTION_WEIGHTS" in message
    monkeypatch.setenv("PROBE_INCEPTION_WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(ProbeError, match="nope.pth is not a file"):
        InceptionExtractor()


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dict of torch-fidelity's Inception-v3 with random weights (built without any download)."""
    import torch
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tfi, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        torch.manual_seed(0)
        net = tfi.FeatureExtractorInceptionV3("random", ["2048"])
    path = tmp_path_factory.mktemp("hub") / "checkpoints" / WEIGHTS_FILES[1]
    path.parent.mkdir()
    torch.save(net.state_dict(), path)
    return path


def test_inception_found_in_hub_cache_embeds_and_caches(random_inception, monkeypatch, tmp_path):
    import torch

    monkeypatch.delenv("PROBE_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(random_inception.parent.parent))
    extractor = InceptionExtractor(expected_sha256_prefix=None)  # random weights: skip the sha256 check
    assert extractor.weights == random_inception
    assert extractor.id.startswith("inception-v3-fid-pool3:sha256-") and extractor.id.endswith(":clean")
    rng = np.random.default_rng(17)
    items = []
    for i, size in enumerate([(64, 64), (80, 48), (299, 299)]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        items.append(ImageItem(key=f"k{i}", path=path, prompt="p"))
    cache = FeatureCache(tmp_path / "cache")
    first = extractor.embed(items, cache)
    assert first.shape == (3, 2048) and first.dtype == np.float32 and np.isfinite(first).all()
    again = InceptionExtractor(weights=random_inception, expected_sha256_prefix=None)
    assert np.array_equal(again.embed(items, cache), first)
    assert cache.hits == 3 and cache.misses == 3


def test_pool3_on_float_input_equals_torch_fidelity_forward(random_inception):
    import torch

    from probe.score.metrics.inception import load_inception

    net = load_inception(random_inception)
    x = torch.from_numpy(np.random.default_rng(18).integers(0, 256, (1, 3, 299, 299), dtype=np.uint8))
    with torch.inference_mode():
        ours, theirs = pool3_features(net, x.float()), net(x)[0]
    assert theirs.abs().max() > 0 and torch.allclose(ours, theirs, rtol=1e-5, atol=0)  # random weights: tiny values


def test_bad_weights_file_is_a_probe_error(tmp_path: Path):
    import torch

    path = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ProbeError, match="not the FID Inception-v3 weights"):
        InceptionExtractor(weights=path).embed([ImageItem("k", tmp_path / "x.png", "p")], FeatureCache(tmp_path))


def test_clean_resize_is_float_bicubic_without_quantising():
    rng = np.random.default_rng(19)
    small = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    out = clean_resize(small)
    assert out.shape == (299, 299, 3) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255 and not np.allclose(out, np.round(out))
    same = rng.integers(0, 256, (299, 299, 3), dtype=np.uint8)
    assert np.array_equal(clean_resize(Image.fromarray(same)), same.astype(np.float32))
    flat = clean_resize(Image.new("RGB", (10, 20), (10, 200, 30)))
    assert np.allclose(flat, np.array([10, 200, 30], dtype=np.float32))
