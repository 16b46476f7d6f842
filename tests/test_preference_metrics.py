"""pickscore, hps and aesthetic against their references' own formulas, on stand-in weights of the same
architecture families built here (a random tiny CLIPModel, a random tiny open_clip model saved as an HPS
checkpoint, a random aesthetic MLP saved as a state dict), offline; their missing-weights errors; and their
stand-ins in an all-tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from probe.errors import ProbeError
from probe.score.protocol import ImageItem, ScoringContext, build_metric
from probe.store.features import FeatureCache

PROMPTS = ["a red apple on a wooden table", "a lighthouse at dusk, oil painting", "two cats on a sofa"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    from probe.embedded.tiny_clip import build_tiny_clip

    folder = tmp_path_factory.mktemp("tiny-clip")
    model, processor = build_tiny_clip()
    with torch.no_grad():
        model.logit_scale.fill_(3.1)  # not CLIP's initial value, so a formula that ignores it fails
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _items(tmp_path: Path) -> list[ImageItem]:
    rng = np.random.default_rng(3)
    items = []
    for i, prompt in enumerate(PROMPTS):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path)
        items.append(ImageItem(key=f"key{i}", path=path, prompt=prompt))
    return items


def _ctx(tmp_path: Path, **kw) -> ScoringContext:
    return ScoringContext(features=FeatureCache(tmp_path / "cache"), base_dir=tmp_path, **kw)


def _values(name: str, args: dict, items: list[ImageItem], ctx: ScoringContext) -> np.ndarray:
    metric = build_metric(name, args)
    metric.config(ctx)
    return np.array([s.value for s in metric.score(items, ctx)])  # type: ignore[union-attr]


def test_pickscore_is_the_model_cards_formula(clip_folder, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    items = _items(tmp_path)
    ours = _values("pickscore", {"model": str(clip_folder)}, items, _ctx(tmp_path))
    # The PickScore_v1 model card's calc_probs, one prompt per image.
    processor = CLIPProcessor.from_pretrained(clip_folder)
    model = CLIPModel.from_pretrained(clip_folder).eval()
    reference = []
    with torch.no_grad():
        for item in items:
            image_inputs = processor(images=[Image.open(item.path).convert("RGB")], return_tensors="pt")
            text_inputs = processor(text=[item.prompt], padding=True, truncation=True, max_length=77,
                                    return_tensors="pt")
            image_embs = model.get_image_features(**image_inputs)
            image_embs = getattr(image_embs, "pooler_output", image_embs)
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.get_text_features(**text_inputs)
            text_embs = getattr(text_embs, "pooler_output", text_embs)
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            reference.append(float((model.logit_scale.exp() * (text_embs @ image_embs.T))[0, 0]))
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)
    assert np.ptp(ours) > 0


def test_pickscore_takes_its_processor_from_another_folder(clip_folder, tmp_path):
    import shutil

    model_only = tmp_path / "model-only"
    model_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clip_folder / name, model_only / name)
    items = _items(tmp_path)
    whole = _values("pickscore", {"model": str(clip_folder)}, items, _ctx(tmp_path / "a"))
    split = _values("pickscore", {"model": str(model_only), "processor": str(clip_folder)}, items,
                    _ctx(tmp_path / "b"))
    np.testing.assert_allclose(split, whole, rtol=1e-6)
    with pytest.raises(ProbeError, match="lacks preprocessor_config.json"):
        build_metric("pickscore", {"model": str(model_only)}).config(_ctx(tmp_path / "c"))


def test_pickscore_without_its_checkpoint_names_the_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ProbeError, match=r"hf download yuvalkirstain/PickScore_v1.*model: FOLDER"):
        build_metric("pickscore").config(_ctx(tmp_path))


TINY_OPEN_CLIP = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory) -> tuple[str, Path]:
    import open_clip

    folder = tmp_path_factory.mktemp("open-clip")
    (folder / "probe-tiny-hps.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(folder / "probe-tiny-hps.json")
    torch.manual_seed(7)
    model = open_clip.create_model("probe-tiny-hps")
    path = folder / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, path)  # the layout of HPS's own checkpoints
    return "probe-tiny-hps", path


def test_hps_is_hpsv2s_score(hps_checkpoint, tmp_path):
    import open_clip

    arch, path = hps_checkpoint
    items = _items(tmp_path)
    ours = _values("hps", {"weights": str(path), "arch": arch}, items, _ctx(tmp_path))
    # hpsv2/img_score.py: create the model, load checkpoint["state_dict"], preprocess_val, model(image, text).
    model, _, preprocess_val = open_clip.create_model_and_transforms(arch, pretrained=None)
    model.load_state_dict(torch.load(path, map_location="cpu")["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    reference = []
    with torch.no_grad():
        for item in items:
            image = preprocess_val(Image.open(item.path)).unsqueeze(0)
            outputs = model(image, tokenizer([item.prompt]))
            image_features, text_features = outputs[0], outputs[1]
            logits_per_image = image_features @ text_features.T
            reference.append(float(torch.diagonal(logits_per_image)[0]))
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-6)
    assert np.ptp(ours) > 0


def test_hps_without_its_checkpoint_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBE_HPS_WEIGHTS", str(tmp_path / "nothing.pt"))
    with pytest.raises(ProbeError, match=r"HPS v2.1 weights not found at .*nothing.pt. Download https://"
                                         r"huggingface.co/xswu/HPSv2.*PROBE_HPS_WEIGHTS"):
        build_metric("hps").config(_ctx(tmp_path))


class ReferenceMLP(torch.nn.Module):
    """improved-aesthetic-predictor/simple_inference.py's MLP, as published (a `layers` Sequential)."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def test_aesthetic_is_the_predictors_inference(clip_folder, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    torch.manual_seed(11)
    mlp = ReferenceMLP(16)
    for layer in mlp.layers:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=0.5)  # large enough that scores differ visibly
    weights = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(mlp.state_dict(), weights)
    items = _items(tmp_path)
    ours = _values("aesthetic", {"weights": str(weights), "clip": str(clip_folder)}, items, _ctx(tmp_path))
    processor = CLIPProcessor.from_pretrained(clip_folder)
    model = CLIPModel.from_pretrained(clip_folder).eval()
    mlp.eval()
    reference = []
    with torch.no_grad():
        for item in items:
            pixels = processor(images=[Image.open(item.path).convert("RGB")], return_tensors="pt")
            features = model.get_image_features(**pixels)
            features = getattr(features, "pooler_output", features).numpy()
            l2 = np.atleast_1d(np.linalg.norm(features, 2, -1))  # simple_inference.py's normalized()
            l2[l2 == 0] = 1
            embedding = features / np.expand_dims(l2, -1)
            reference.append(float(mlp(torch.from_numpy(embedding).float())[0, 0]))
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-6)
    assert np.ptp(ours) > 0


# The tensor names and shapes of sac+logos+ava1-l14-linearMSE.pth as published (read from the file at the
# repository's commit 6934dd8, whose sha256 is AESTHETIC_SHA256): the checkpoint loads into our MLP as saved.
PUBLISHED_AESTHETIC_LAYOUT = {
    "layers.0.weight": [1024, 768], "layers.0.bias": [1024], "layers.2.weight": [128, 1024], "layers.2.bias": [128],
    "layers.4.weight": [64, 128], "layers.4.bias": [64], "layers.6.weight": [16, 64], "layers.6.bias": [16],
    "layers.7.weight": [1, 16], "layers.7.bias": [1]}


def test_aesthetic_mlp_has_the_published_checkpoints_layout_and_records_whether_the_file_is_it(clip_folder, tmp_path,
                                                                                                caplog):
    from probe.score.metrics.preference import AESTHETIC_SHA256, aesthetic_mlp

    ours = {f"layers.{k}": list(v.shape) for k, v in aesthetic_mlp(768).state_dict().items()}
    assert ours == PUBLISHED_AESTHETIC_LAYOUT
    torch.save(ReferenceMLP(16).state_dict(), tmp_path / "other.pth")
    metric = build_metric("aesthetic", {"weights": str(tmp_path / "other.pth"), "clip": str(clip_folder)})
    assert metric.config(_ctx(tmp_path))["published"] is False  # type: ignore[union-attr]
    with caplog.at_level("WARNING"):
        metric.score(_items(tmp_path)[:1], _ctx(tmp_path))  # type: ignore[union-attr]
    assert f"not the published sac+logos+ava1-l14-linearMSE.pth (sha256 {AESTHETIC_SHA256[:16]}" in caplog.text


def test_aesthetic_refuses_a_clip_of_another_width_and_a_file_that_is_not_its_mlp(clip_folder, tmp_path):
    torch.save(ReferenceMLP(768).state_dict(), tmp_path / "l14.pth")
    metric = build_metric("aesthetic", {"weights": str(tmp_path / "l14.pth"), "clip": str(clip_folder)})
    with pytest.raises(ProbeError, match="takes 768-d CLIP embeddings.*16-d"):
        metric.score(_items(tmp_path), _ctx(tmp_path))  # type: ignore[union-attr]
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    junk = build_metric("aesthetic", {"weights": str(tmp_path / "junk.pth"), "clip": str(clip_folder)})
    with pytest.raises(ProbeError, match="junk.pth is not an aesthetic predictor state dict"):
        junk.score(_items(tmp_path), _ctx(tmp_path / "x"))  # type: ignore[union-attr]


def test_an_all_tiny_run_scores_the_three_with_stand_ins(write_suite, tmp_path):
    import pandas as pd

    from probe.run.driver import RunOptions, run_suite

    suite = write_suite("""
name: prefs
models: [tiny]
seeds: 2
probes:
  - name: p
    prompts: [a red apple on a table, a lighthouse at dusk]
    steps: [1]
    metrics: [pickscore, hps, aesthetic]
""")
    summary = run_suite(suite, RunOptions(reports_root=tmp_path / "out", cache_dir=tmp_path / "cache"))
    assert not summary.failures
    scores = pd.read_parquet(summary.run_dir / "scores.parquet")
    assert scores.groupby("metric")["value"].count().to_dict() == {"aesthetic": 4, "hps": 4, "pickscore": 4}
    configs = json.loads((summary.run_dir / "manifest.json").read_text())["metrics"]
    assert all("random-stand-in" in configs[name]["weights"] for name in ("pickscore", "hps", "aesthetic"))


def test_aesthetic_reuses_the_runs_clip_embeddings(clip_folder, tmp_path):
    torch.save(ReferenceMLP(16).state_dict(), tmp_path / "mlp.pth")
    ctx = _ctx(tmp_path, clip_model=str(clip_folder))
    items = _items(tmp_path)
    _values("clip_score", {}, items, ctx)
    computed = ctx.features.misses  # three images and three prompts
    _values("aesthetic", {"weights": str(tmp_path / "mlp.pth"), "clip": str(clip_folder)}, items, ctx)
    assert computed == 6 and ctx.features.misses == computed  # not one image embedded again
    assert len(ctx.shared_names("clip:")) == 1  # one CLIP loaded for both
