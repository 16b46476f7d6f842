"""CLIP metrics on the embedded tiny CLIP: clip_score equals torchmetrics, embeddings are cached, loading
paths (built, folder, hub cache, open_clip) agree, and cmmd follows the reference formula."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from probe.errors import ProbeError
from probe.score.metrics.clip import DEFAULT_CLIP_MODEL, ClipBackend, ClipScore, Cmmd, get_clip, mmd_rbf
from probe.score.protocol import ImageItem, ImageMetric, ImageSet, ScoringContext, SetMetric
from probe.store.features import FeatureCache

torch = pytest.importorskip("torch")

SHORT = "a photo of a red circle"
LONG = "a photo of " + "a red circle and a blue square " * 12  # well over 77 tokens


def _draw(path: Path, colour: tuple[int, int, int], shape: str, size: tuple[int, int]) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (240, 240, 230))
    draw = ImageDraw.Draw(image)
    box = (size[0] // 5, size[1] // 5, 4 * size[0] // 5, 4 * size[1] // 5)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    image.save(path)
    return path


@pytest.fixture
def items(tmp_path: Path) -> list[ImageItem]:
    specs = [
        ((220, 30, 30), "circle", (48, 40), SHORT),
        ((30, 30, 220), "square", (40, 56), "a blue square"),
        ((30, 180, 60), "circle", (64, 64), "a green circle on white"),
        ((250, 200, 0), "square", (33, 47), LONG),
    ]
    return [
        ImageItem(key=f"img{i}", path=_draw(tmp_path / f"img{i}.png", colour, shape, size), prompt=prompt)
        for i, (colour, shape, size, prompt) in enumerate(specs)
    ]


@pytest.fixture(scope="module")
def tiny_backend() -> ClipBackend:
    return ClipBackend("tiny")


def _context(tmp_path: Path, backend: ClipBackend | None = None, spec: str = "tiny") -> ScoringContext:
    ctx = ScoringContext(features=FeatureCache(tmp_path / "cache"), clip_model=spec, base_dir=tmp_path)
    if backend is not None:
        ctx.shared("clip:" + spec, lambda: backend)
    return ctx


class _TensorFeatures(torch.nn.Module):
    """torchmetrics 1.9 expects get_*_features to return tensors; transformers 5 returns a ModelOutput
    whose pooler_output holds the projected embeddings (Lightning-AI/torchmetrics#3407)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs):
        out = self.model.get_image_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, *args, **kwargs):
        out = self.model.get_text_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_protocols() -> None:
    assert isinstance(ClipScore(), ImageMetric)
    assert isinstance(Cmmd(), SetMetric)


def test_clip_score_equals_torchmetrics(tmp_path: Path, items: list[ImageItem], tiny_backend: ClipBackend) -> None:
    from torchmetrics.functional.multimodal import clip_score

    from probe.embedded.tiny_clip import build_tiny_clip

    model, processor = build_tiny_clip()
    adapter = _TensorFeatures(model)
    scores = ClipScore().score(items, _context(tmp_path, tiny_backend))
    assert [s.key for s in scores] == [item.key for item in items]
    for item, score in zip(items, scores, strict=True):
        if score.extra["truncated"]:
            continue  # torchmetrics slices ids and loses the end token; we keep it (see ClipScore doc)
        pixels = torch.from_numpy(np.array(item.open())).permute(2, 0, 1)
        with torch.no_grad():
            expected = float(clip_score(pixels, item.prompt, model_name_or_path=lambda: (adapter, processor)))
        assert score.value == pytest.approx(expected, abs=1e-4)
    assert sum(not s.extra["truncated"] for s in scores) == 3
    assert any(s.value > 0 for s in scores)  # not only clipped negatives: the comparison means something


def test_embeddings_are_cached(tmp_path: Path, items: list[ImageItem], tiny_backend: ClipBackend) -> None:
    ctx = _context(tmp_path, tiny_backend)
    calls = {"images": 0, "texts": 0}
    encoders = tiny_backend._encoders
    original_images, original_texts = encoders.encode_images, encoders.encode_texts

    def count_images(images):
        calls["images"] += 1
        return original_images(images)

    def count_texts(texts):
        calls["texts"] += 1
        return original_texts(texts)

    encoders.encode_images, encoders.encode_texts = count_images, count_texts
    try:
        first = ClipScore(batch_size=3).score(items, ctx)
        assert calls == {"images": 2, "texts": 1} and ctx.features.misses == 2 * len(items)
        second = ClipScore().score(items, _context(tmp_path, tiny_backend))  # new context, same cache folder
    finally:
        encoders.encode_images, encoders.encode_texts = original_images, original_texts
    assert calls == {"images": 2, "texts": 1}
    assert [s.value for s in first] == [s.value for s in second]


def test_truncation_flag(tmp_path: Path, tiny_backend: ClipBackend) -> None:
    cache = FeatureCache(tmp_path)
    other_tail = LONG + " and then something else entirely at the end"
    vectors, truncated = tiny_backend.text_embeddings([SHORT, LONG, other_tail], cache)
    assert truncated.tolist() == [False, True, True]
    assert tiny_backend.max_tokens == 77
    # Both long prompts keep the same first 75 tokens plus the end token, so CLIP sees the same text.
    np.testing.assert_allclose(vectors[1], vectors[2], atol=1e-6)


def test_folder_and_hub_cache_load_like_built(
    tmp_path: Path, items: list[ImageItem], tiny_backend: ClipBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    from probe.embedded.tiny_clip import save_tiny_clip

    built = [s.value for s in ClipScore().score(items, _context(tmp_path / "a", tiny_backend))]
    save_tiny_clip(tmp_path / "tiny-clip")
    from_folder = [s.value for s in ClipScore().score(items, _context(tmp_path, spec="tiny-clip"))]  # relative
    np.testing.assert_allclose(from_folder, built, atol=1e-6)

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--probe-tests--tiny-clip"
    save_tiny_clip(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    backend = ClipBackend("probe-tests/tiny-clip")
    assert backend.revision == commit and commit in backend.image_extractor_id
    from_hub = [s.value for s in ClipScore().score(items, _context(tmp_path / "b", backend, "probe-tests/tiny-clip"))]
    np.testing.assert_allclose(from_hub, built, atol=1e-6)


def test_uncached_hub_id_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    start = time.monotonic()
    with pytest.raises(ProbeError, match="openai/clip-vit-large-patch14") as error:
        get_clip(_context(tmp_path, spec=DEFAULT_CLIP_MODEL))
    assert time.monotonic() - start < 5
    assert "hf download" in str(error.value) and "--clip-model" in str(error.value)


def _reference_mmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """google-research cmmd/distance.py written as plain loops: biased estimator, i == j pairs included."""

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2)))

    def mean_k(a: np.ndarray, b: np.ndarray) -> float:
        return sum(k(u, v) for u in a for v in b) / (len(a) * len(b))

    return scale * (mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y))


def test_mmd_rbf_matches_reference_formula() -> None:
    rng = np.random.default_rng(0)
    for n, m, d, spread in [(5, 7, 4, 1.0), (6, 3, 8, 10.0), (1, 4, 3, 5.0)]:
        x, y = rng.normal(size=(n, d)) * spread, rng.normal(size=(m, d)) * spread + 1.0
        assert mmd_rbf(x, y) == pytest.approx(_reference_mmd(x, y), abs=1e-6)
    x = rng.normal(size=(8, 16))
    assert mmd_rbf(x, x) == pytest.approx(0.0, abs=1e-9)
    shifts = [mmd_rbf(x, x + delta) for delta in (0.5, 1.0, 2.0)]
    assert 0 < shifts[0] < shifts[1] < shifts[2]


def test_cmmd_zero_on_itself_and_positive_otherwise(
    tmp_path: Path, items: list[ImageItem], tiny_backend: ClipBackend
) -> None:
    ctx = _context(tmp_path, tiny_backend)
    metric = Cmmd()
    images = ImageSet(group={"probe": "p", "model": "tiny"}, items=tuple(items[:2]))
    others = ImageSet(group={"reference": True}, items=tuple(items[2:]))
    same = metric.score_set(images, images, ctx)
    assert same.metric == "cmmd" and same.value == pytest.approx(0.0, abs=1e-9)
    assert same.group == images.group and same.n == 2 and same.extra == {"n_reference": 2}
    different = metric.score_set(images, others, ctx)
    assert different.value is not None and different.value > 1e-6
    # The scorer's path (embed + compare, used for the bootstrap CI) gives the same value.
    features, reference = metric.embed(images.items, ctx), metric.embed(others.items, ctx)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-9)
    assert metric.compare(features, reference)[0] == pytest.approx(different.value, abs=1e-12)
    assert metric.config(ctx)["model"] == "tiny" and metric.config(ctx)["sigma"] == 10.0


def test_open_clip_backend(tmp_path: Path, items: list[ImageItem]) -> None:
    open_clip = pytest.importorskip("open_clip")
    arch = "probe-tiny-openclip"
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    }
    (tmp_path / f"{arch}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{arch}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(arch)
    torch.save(model.state_dict(), tmp_path / "weights.pt")

    spec = f"open_clip:{arch}:{tmp_path / 'weights.pt'}"
    scores = ClipScore().score(items, _context(tmp_path, spec=spec))
    assert [s.extra["truncated"] for s in scores] == [False, False, False, True]
    preprocess = open_clip.create_model_and_transforms(arch)[2]
    with torch.no_grad():
        image = model.encode_image(preprocess(items[0].open())[None])
        text = model.encode_text(open_clip.get_tokenizer(arch)([items[0].prompt]))
    expected = 100 * max(float(torch.nn.functional.cosine_similarity(image, text)), 0.0)
    assert scores[0].value == pytest.approx(expected, abs=1e-4)


@pytest.mark.weights
def test_default_model_equals_torchmetrics(tmp_path: Path, items: list[ImageItem]) -> None:
    """The real default CLIP, only where it is already in the local HF cache."""
    try:
        backend = ClipBackend(DEFAULT_CLIP_MODEL)
    except ProbeError:
        pytest.skip(f"{DEFAULT_CLIP_MODEL} not in the local Hugging Face cache")
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPModel, CLIPProcessor

    def load():
        kwargs = {"revision": backend.revision, "local_files_only": True}
        return (_TensorFeatures(CLIPModel.from_pretrained(DEFAULT_CLIP_MODEL, **kwargs)),
                CLIPProcessor.from_pretrained(DEFAULT_CLIP_MODEL, **kwargs))

    scores = ClipScore().score(items[:1], _context(tmp_path, backend, DEFAULT_CLIP_MODEL))
    pixels = torch.from_numpy(np.array(items[0].open())).permute(2, 0, 1)
    assert scores[0].value == pytest.approx(float(clip_score(pixels, SHORT, model_name_or_path=load)), abs=1e-3)
