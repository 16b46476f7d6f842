"""perceived_gender on the embedded tiny CLIP: label set, no-face policies, the unclear band, the formula by hand,
and crop embeddings served from the feature cache. The tiny CLIP has random weights: these tests check the
machinery, never whether a reading is right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from probe.errors import UsageError
from probe.score.metrics import gender
from probe.score.metrics.clip import ClipBackend
from probe.score.metrics.faces import FaceBox
from probe.score.metrics.gender import DEFAULT_PROMPTS, LABELS, FaceCrop, PerceivedGender
from probe.score.protocol import ImageItem, ImageMetric, ScoringContext
from probe.store.features import FeatureCache

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def backend() -> ClipBackend:
    return ClipBackend("tiny")


@pytest.fixture
def items(tmp_path: Path) -> list[ImageItem]:
    """Four different noisy 96x80 pictures (the tiny CLIP needs varied pixels to give varied readings)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(4):
        pixels = rng.integers(0, 256, size=(80, 96, 3), dtype=np.uint8)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        out.append(ImageItem(key=f"k{i}", path=path, prompt="a photo of the face of a nurse"))
    return out


def _ctx(root: Path, backend: ClipBackend) -> ScoringContext:
    ctx = ScoringContext(features=FeatureCache(root / "cache"), clip_model="tiny", base_dir=root)
    ctx.shared("clip:tiny", lambda: backend)
    return ctx


BOX = FaceBox(20, 10, 40, 40, "fake", 9.0)


@pytest.fixture
def one_face(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every image has the same single face, except k3, which has none."""
    monkeypatch.setattr(gender, "faces_for", lambda item, ctx, settings=None: [] if item.key == "k3" else [BOX])


@pytest.mark.usefixtures("one_face")
def test_labels_values_and_no_person(tmp_path, items, backend):
    metric = PerceivedGender()
    assert isinstance(metric, ImageMetric)
    scores = metric.score(items, _ctx(tmp_path, backend))
    assert [s.key for s in scores] == ["k0", "k1", "k2", "k3"]
    assert all(s.label in LABELS for s in scores)
    for s in scores[:3]:
        assert s.label != "no_person" and 0.0 <= s.value <= 1.0
        assert s.extra["p_feminine"] + s.extra["p_masculine"] == pytest.approx(1.0)
        assert s.extra["source"] == "face" and s.extra["box"] == [20, 10, 40, 40] and s.extra["n_faces"] == 1
    assert (scores[3].label, scores[3].value, scores[3].extra["source"]) == ("no_person", None, None)


@pytest.mark.usefixtures("one_face")
def test_whole_image_policy_reads_the_image_under_its_own_key(tmp_path, items, backend):
    ctx = _ctx(tmp_path, backend)
    last = PerceivedGender(no_face_policy="whole_image").score(items, ctx)[3]
    assert last.label in {"feminine", "masculine", "unclear"} and last.extra["source"] == "whole_image"
    # the whole-image embedding is the one clip_score caches under the image key
    assert ctx.features.get(backend.image_extractor_id, "k3") is not None


@pytest.mark.usefixtures("one_face")
def test_margin_moves_images_to_unclear(tmp_path, items, backend):
    ctx = _ctx(tmp_path, backend)
    strict = PerceivedGender(margin=1.0).score(items, ctx)
    assert all(0.0 < s.value < 1.0 for s in strict[:3])  # not saturated, so a margin of 1 can never be reached
    assert [s.label for s in strict] == ["unclear"] * 3 + ["no_person"]
    loose = PerceivedGender(margin=0.0).score(items, ctx)
    assert all(s.label in {"feminine", "masculine"} for s in loose[:3])
    assert [s.value for s in loose] == [s.value for s in strict]  # the margin changes labels, not values


@pytest.mark.usefixtures("one_face")
def test_p_feminine_equals_the_formula_on_a_hand_made_crop(tmp_path, items, backend):
    from PIL import Image

    ctx = _ctx(tmp_path, backend)
    value = PerceivedGender(crop_margin=0.25).score(items[:1], ctx)[0].value
    # crop by hand: box grown by round(40 * 0.25) = 10 px each side, clipped at the top edge
    with Image.open(items[0].path) as image:
        image.convert("RGB").crop((10, 0, 70, 60)).save(tmp_path / "crop.png")
    fresh = FeatureCache(tmp_path / "other-cache")
    image = backend.image_embeddings([ImageItem("crop", tmp_path / "crop.png", "")], fresh)[0]
    image = image / np.linalg.norm(image)
    classes = []
    for name in ("feminine", "masculine"):
        texts, _ = backend.text_embeddings(list(DEFAULT_PROMPTS[name]), fresh)
        mean = (texts / np.linalg.norm(texts, axis=1, keepdims=True)).mean(axis=0)
        classes.append(mean / np.linalg.norm(mean))
    logits = 100.0 * np.array([image @ classes[0], image @ classes[1]])
    expected = np.exp(logits[0]) / np.exp(logits).sum()
    assert value == pytest.approx(expected, rel=1e-5, abs=1e-9)


@pytest.mark.usefixtures("one_face")
def test_crop_embeddings_are_cached(tmp_path, items, backend):
    first = PerceivedGender().score(items, _ctx(tmp_path, backend))
    again = _ctx(tmp_path, backend)  # a new context over the same cache folder
    second = PerceivedGender().score(items, again)
    assert again.features.misses == 0 and again.features.hits > 0
    assert [s.value for s in second] == [s.value for s in first]
    key = FaceCrop.key_for("k0", BOX, 0.2)
    assert key == "k0.face.20_10_40_40.m0.2"
    assert again.features.get(backend.image_extractor_id, key) is not None


def test_real_detector_on_the_astronaut(tmp_path, backend):
    from PIL import Image
    from skimage import data

    Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.png")
    Image.fromarray(data.coffee()).save(tmp_path / "coffee.png")
    items = [ImageItem("astro", tmp_path / "astronaut.png", ""), ImageItem("coffee", tmp_path / "coffee.png", "")]
    ctx = _ctx(tmp_path, backend)
    astro, coffee = PerceivedGender().score(items, ctx)
    assert astro.label in {"feminine", "masculine", "unclear"} and astro.extra["n_faces"] == 1
    assert coffee.label == "no_person"
    config = PerceivedGender().config(ctx)
    assert config["prompts"]["feminine"] == list(DEFAULT_PROMPTS["feminine"]) and config["margin"] == 0.2
    assert config["no_face_policy"] == "no_person" and "not gender identity" in config["measures"]


def test_bad_arguments_are_usage_errors():
    with pytest.raises(UsageError, match="margin"):
        PerceivedGender(margin=1.5)
    with pytest.raises(UsageError, match="no_face_policy"):
        PerceivedGender(no_face_policy="guess")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="prompts"):
        PerceivedGender(prompts={"feminine": ["a woman"]})
