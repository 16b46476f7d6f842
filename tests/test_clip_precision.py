"""CLIP in half precision on CUDA: its own cache ids and config (never mixed with float32 vectors), embeddings
that agree with float32 to within half precision's rounding."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from probe.errors import ProbeError
from probe.score.metrics.clip import ClipBackend
from probe.score.metrics.clip_loaders import clip_dtype, load_encoders
from probe.score.protocol import ImageItem
from probe.store.features import FeatureCache


def test_half_precision_is_the_default_on_cuda_only():
    assert clip_dtype("cuda") == clip_dtype("cuda:1") == "float16"
    assert clip_dtype("cpu") == clip_dtype("mps") == "float32"
    with pytest.raises(ProbeError, match="float32, float16 or bfloat16"):
        load_encoders("tiny", "cpu", dtype="int8")


def test_float16_embeddings_agree_with_float32_and_are_cached_apart(tmp_path):
    items = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        pixels = (np.random.default_rng(i).random((64, 64, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(path)
        items.append(ImageItem(key=f"k{i}", path=path, prompt="a red apple"))
    full, half = ClipBackend("tiny"), ClipBackend("tiny", dtype="float16")
    assert full.dtype == "float32" and half.dtype == "float16"
    assert full.image_extractor_id != half.image_extractor_id and half.image_extractor_id.endswith("|float16")
    assert "dtype" not in full.describe() and half.describe()["dtype"] == "float16"
    cache = FeatureCache(tmp_path / "cache")
    a = full.image_embeddings(items, cache)
    b = half.image_embeddings(items, cache)  # the same cache: must not return the float32 rows
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert np.all(cosine > 0.999) and not np.array_equal(a, b)
    texts, _ = half.text_embeddings(["a red apple"], cache)
    reference, _ = full.text_embeddings(["a red apple"], cache)
    assert texts.dtype == np.float32 and float((texts * reference).sum() / np.linalg.norm(texts) /
                                               np.linalg.norm(reference)) > 0.999
