"""CLIP's weights load on the first embedding, not when the metrics are built in pre-flight; a folder missing
its files still fails at once."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from probe.embedded.tiny_clip import save_tiny_clip
from probe.errors import ProbeError
from probe.score.metrics.clip import ClipBackend
from probe.score.protocol import ImageItem
from probe.store.features import FeatureCache


def test_weights_load_on_the_first_embedding_only(tmp_path, monkeypatch):
    import transformers

    folder = save_tiny_clip(tmp_path / "clip")
    loads = []
    real = transformers.CLIPModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", classmethod(counting))
    backend = ClipBackend(str(folder))
    described = backend.describe()  # what pre-flight and the config id need
    assert loads == [] and described["max_tokens"] > 2 and described["revision"].startswith("sha256:")
    path = tmp_path / "a.png"
    Image.fromarray(np.full((32, 32, 3), 120, dtype="uint8")).save(path)
    cache = FeatureCache(tmp_path / "cache")
    first = backend.image_embeddings([ImageItem(key="a", path=path, prompt="")], cache)
    backend.text_embeddings(["a red apple"], cache)
    assert len(loads) == 1 and first.shape[0] == 1  # loaded once, for both encoders


def test_a_folder_without_weights_fails_before_anything_runs(tmp_path):
    folder = save_tiny_clip(tmp_path / "clip")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ProbeError, match="lacks its weights"):
        ClipBackend(str(folder))


def test_open_clip_weights_load_on_the_first_embedding_with_the_preprocessing_named_up_front(tmp_path, monkeypatch):
    import json

    import open_clip
    import torch

    arch = "probe-lazy-openclip"
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
    (tmp_path / f"{arch}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{arch}.json")
    torch.manual_seed(0)
    torch.save(open_clip.create_model(arch).state_dict(), tmp_path / "weights.pt")
    loads = []
    real = open_clip.create_model_and_transforms

    def counting(*args, **kwargs):
        loads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", counting)
    backend = ClipBackend(f"open_clip:{arch}:{tmp_path / 'weights.pt'}")
    described = backend.describe()
    assert loads == [] and "Resize" in described["preprocessing"]
    path = tmp_path / "a.png"
    Image.fromarray(np.full((40, 48, 3), 90, dtype="uint8")).save(path)
    cache = FeatureCache(tmp_path / "cache")
    got = backend.image_embeddings([ImageItem(key="a", path=path, prompt="")], cache)
    assert loads == [arch]  # loaded once, and its own transforms matched the ones named in the extractor id
    model, _, preprocess = real(arch, pretrained=str(tmp_path / "weights.pt"))
    with torch.no_grad():
        expected = model.encode_image(preprocess(Image.open(path).convert("RGB"))[None]).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
