"""Preference metrics: PickScore v1, HPS v2.1 and the LAION aesthetic predictor v2, one number per image.

Each is a learnt proxy for what people prefer, loaded offline like every checkpoint (a cached hub id, a local
folder or a weights file; a clear error naming the fix), and each is its reference's formula on the shared
CLIP machinery (probe.score.metrics.clip), so embeddings go through the feature cache:

- pickscore (Kirstain et al. 2023): exp(logit_scale) * cos(image, prompt) on PickScore_v1, a CLIP ViT-H/14
  fine-tune, with LAION CLIP-H's processor, as the model card computes it;
- hps (Wu et al. 2023, HPS v2.1): cos(image, prompt) on open_clip ViT-H-14 with the HPS checkpoint, as
  hpsv2's `score` computes it (the diagonal of normalised image @ text features);
- aesthetic (LAION improved-aesthetic-predictor v2, sac+logos+ava1-l14-linearMSE): an MLP over L2-normalised
  CLIP ViT-L/14 image embeddings (the run's CLIP embeddings are reused when the CLIP is the same).

ImageReward is not here: its package (image-reward 1.5) pins timm==0.6.13 and imports transformers helpers
that transformers 5 removed (`apply_chunking_to_forward`, `find_pruneable_heads_and_indices`), so it cannot run
beside probe's pins (see the README).

When every image comes from the embedded tiny model and the run's CLIP is the tiny one, a metric left at its
default checkpoint uses stand-ins instead (the tiny CLIP; for aesthetic a seeded random MLP), as FID does, so
such runs score offline; the extractor ids and configs say so, and the values measure nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from probe.errors import ProbeError
from probe.score.metrics.clip import ClipBackend, clip_backend
from probe.score.protocol import ImageItem, Metric, Score, ScoringContext
from probe.spec.metric_catalog import DEFAULT_CLIP_MODEL, METRICS

log = logging.getLogger(__name__)

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_ARCH = "ViT-H-14"
HPS_WEIGHTS_ENV = "PROBE_HPS_WEIGHTS"
HPS_FILE = "HPS_v2.1_compressed.pt"
HPS_URL = "https://huggingface.co/xswu/HPSv2/resolve/main/HPS_v2.1_compressed.pt"
AESTHETIC_WEIGHTS_ENV = "PROBE_AESTHETIC_WEIGHTS"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac%2Blogos%2Bava1-l14-linearMSE.pth")
# sha256 of that file as published (read from the repository's commit 6934dd8); the project publishes no digest.
AESTHETIC_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
STAND_IN_SEED = 20260
STAND_IN = "random-stand-in"


def uses_stand_in(ctx: ScoringContext) -> bool:
    """Every image is from the tiny model and the CLIP is the tiny one: default checkpoints give way to stand-ins."""
    return ctx.all_tiny and ctx.clip_model == "tiny"


def _warn_stand_in(ctx: ScoringContext, name: str) -> None:
    def warn() -> bool:
        log.warning("%s: every model is tiny and so is the CLIP, so %s scores with random stand-in weights: the "
                    "values test the machinery, not preference", name, name)
        return True

    ctx.shared(f"preference-stand-in-warned:{name}", warn)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosines(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """Row-wise cosine of image and text embeddings."""
    return np.sum(_unit(images) * _unit(texts), axis=-1)


def weights_file(arg: str | None, env: str, default: Path, what: str, url: str, base_dir: Path) -> Path:
    """A weights file: the metric's `weights` arg (relative to the suite), else `$env`, else `default`.

    Raises:
        ProbeError: no such file; the message names where it was looked for and where to get it.
    """
    if arg:
        path = Path(arg).expanduser()
        path = path if path.is_absolute() else base_dir / path
    else:
        path = Path(os.environ[env]).expanduser() if os.environ.get(env) else default
    if not path.is_file():
        raise ProbeError(f"{what} weights not found at {path}. Download {url} on a machine with internet and put it "
                         f"there (or anywhere, with {env}=/path/to/file, or the metric arg `weights: PATH`)")
    return path


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class _ClipPreference(Metric):
    """Shared by pickscore and hps: a CLIP-family backend, cached embeddings, a formula over the cosine."""

    def __init__(self, batch_size: int = 16) -> None:
        self.batch_size = batch_size

    def backend(self, ctx: ScoringContext) -> ClipBackend:
        raise NotImplementedError

    def values(self, cosine: np.ndarray, backend: ClipBackend) -> np.ndarray:
        raise NotImplementedError

    def score(self, items: Sequence[ImageItem], ctx: ScoringContext) -> list[Score]:
        if not items:
            return []
        backend = self.backend(ctx)
        images = backend.image_embeddings(items, ctx.features, self.batch_size)
        texts, truncated = backend.text_embeddings([item.prompt for item in items], ctx.features)
        values = self.values(cosines(images, texts), backend)
        return [Score(metric=self.name, value=float(v), key=item.key, extra={"truncated": bool(cut)})
                for item, v, cut in zip(items, values, truncated, strict=True)]


class PickScore(_ClipPreference):
    """pickscore: exp(logit_scale) * cos(image, prompt) on PickScore_v1 (higher: more preferred).

    Args:
        model: a folder holding the model (saved with save_pretrained) or a hub id[@revision] in the local
            Hugging Face cache; default PickScore_v1.
        processor: where its tokenizer and image processor come from when the model's folder has none; default
            LAION CLIP-H's for PickScore_v1 (as its model card loads it), else the model's own.
    """

    info = METRICS["pickscore"]

    def __init__(self, model: str | None = None, processor: str | None = None, batch_size: int = 16) -> None:
        super().__init__(batch_size)
        self.model = model
        self.processor = processor

    def backend(self, ctx: ScoringContext) -> ClipBackend:
        if self.model is None and uses_stand_in(ctx):
            _warn_stand_in(ctx, self.name)
            return clip_backend(ctx, "tiny")
        model = self.model or PICKSCORE_MODEL
        processor = self.processor or (PICKSCORE_PROCESSOR if model.split("@")[0] == PICKSCORE_MODEL else None)
        try:
            return clip_backend(ctx, model, processor)
        except ProbeError as error:
            raise ProbeError(f"pickscore: {error}. PickScore needs {PICKSCORE_MODEL} and the processor of "
                             f"{PICKSCORE_PROCESSOR} (`hf download {PICKSCORE_MODEL}` and `hf download "
                             f"{PICKSCORE_PROCESSOR} --include '*.json' '*.txt'`), or the metric args "
                             "`model: FOLDER` (and `processor: FOLDER`)") from error

    def config(self, ctx: ScoringContext) -> dict[str, Any]:
        stand_in = self.model is None and uses_stand_in(ctx)
        return {**self.backend(ctx).describe(), "formula": "exp(logit_scale)*cos(image, prompt)",
                **({"weights": f"{STAND_IN}: the tiny CLIP"} if stand_in else {})}

    def values(self, cosine: np.ndarray, backend: ClipBackend) -> np.ndarray:
        return backend.logit_scale() * cosine


class Hps(_ClipPreference):
    """hps: HPS v2.1, cos(image, prompt) on open_clip ViT-H-14 with the HPS checkpoint (higher: more preferred).

    Args:
        weights: the checkpoint file (HPS_v2.1_compressed.pt; open_clip reads its `state_dict`); default
            `$PROBE_HPS_WEIGHTS`, else HPS_v2.1_compressed.pt in `$HPS_ROOT` or ~/.cache/hpsv2 (where hpsv2 keeps it).
        arch: the open_clip architecture the checkpoint fits.
    """

    info = METRICS["hps"]

    def __init__(self, weights: str | None = None, arch: str = HPS_ARCH, batch_size: int = 16) -> None:
        super().__init__(batch_size)
        self.weights = weights
        self.arch = arch

    def _stand_in(self, ctx: ScoringContext) -> bool:
        return self.weights is None and uses_stand_in(ctx)

    def backend(self, ctx: ScoringContext) -> ClipBackend:
        if self._stand_in(ctx):
            _warn_stand_in(ctx, self.name)
            return clip_backend(ctx, "tiny")
        root = Path(os.environ["HPS_ROOT"]) if os.environ.get("HPS_ROOT") else Path.home() / ".cache" / "hpsv2"
        path = weights_file(self.weights, HPS_WEIGHTS_ENV, root / HPS_FILE, "HPS v2.1", HPS_URL, ctx.base_dir)
        return clip_backend(ctx, f"open_clip:{self.arch}:{path}")

    def config(self, ctx: ScoringContext) -> dict[str, Any]:
        return {**self.backend(ctx).describe(), "formula": "cos(image, prompt)",
                **({"weights": f"{STAND_IN}: the tiny CLIP"} if self._stand_in(ctx) else {})}

    def values(self, cosine: np.ndarray, backend: ClipBackend) -> np.ndarray:
        return cosine


def aesthetic_mlp(input_size: int) -> Any:
    """The improved-aesthetic-predictor's MLP (its layer order, so its state dict loads as saved)."""
    from torch import nn

    return nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


def _load_mlp(path: Path) -> Any:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("layers."): v for k, v in state.items()}
        mlp = aesthetic_mlp(int(state["0.weight"].shape[1]))
        mlp.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - a wrong or damaged file: say which and why
        raise ProbeError(f"aesthetic: {path} is not an aesthetic predictor state dict ({type(exc).__name__}: "
                         f"{exc}); expected {AESTHETIC_FILE} from {AESTHETIC_URL}") from exc
    return mlp.eval()


def _load_checked(path: Path) -> Any:
    """The MLP, with a warning when the file is not the published sac+logos+ava1 checkpoint (another predictor
    trained the same way is allowed: its digest is recorded in the metric's configuration)."""
    if file_digest(path) != AESTHETIC_SHA256:
        log.warning("aesthetic: %s is not the published %s (sha256 %s...); scores are that file's, not the LAION "
                    "predictor's", path, AESTHETIC_FILE, AESTHETIC_SHA256[:16])
    return _load_mlp(path)


def _stand_in_mlp(input_size: int) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(STAND_IN_SEED)
        return aesthetic_mlp(input_size).eval()


class Aesthetic(Metric):
    """aesthetic: the LAION aesthetic predictor v2 on L2-normalised CLIP ViT-L/14 image embeddings (1-10 scale for
    real photos; higher: more aesthetic).

    Args:
        weights: the MLP's state dict (sac+logos+ava1-l14-linearMSE.pth); default `$PROBE_AESTHETIC_WEIGHTS`, else
            that name in torch hub's checkpoints folder.
        clip: the CLIP the MLP was trained on (ViT-L/14, the run's default CLIP, whose embeddings are reused).
    """

    info = METRICS["aesthetic"]

    def __init__(self, weights: str | None = None, clip: str = DEFAULT_CLIP_MODEL, batch_size: int = 16) -> None:
        self.weights = weights
        self.clip = clip
        self.batch_size = batch_size

    def _stand_in(self, ctx: ScoringContext) -> bool:
        return self.weights is None and self.clip == DEFAULT_CLIP_MODEL and uses_stand_in(ctx)

    def _weights(self, ctx: ScoringContext) -> Path:
        import torch

        default = Path(torch.hub.get_dir()) / "checkpoints" / AESTHETIC_FILE
        return weights_file(self.weights, AESTHETIC_WEIGHTS_ENV, default, "LAION aesthetic predictor v2",
                            AESTHETIC_URL, ctx.base_dir)

    def backend(self, ctx: ScoringContext) -> ClipBackend:
        return clip_backend(ctx, "tiny" if self._stand_in(ctx) else self.clip)

    def _mlp(self, ctx: ScoringContext, width: int) -> Any:
        if self._stand_in(ctx):
            _warn_stand_in(ctx, self.name)
            return ctx.shared(f"aesthetic-mlp:stand-in:{width}", lambda: _stand_in_mlp(width))
        path = self._weights(ctx)
        return ctx.shared(f"aesthetic-mlp:{path}", lambda: _load_checked(path))

    def config(self, ctx: ScoringContext) -> dict[str, Any]:
        if self._stand_in(ctx):
            weights: dict[str, Any] = {"weights": f"{STAND_IN}: seed {STAND_IN_SEED}"}
        else:
            digest = file_digest(self._weights(ctx))
            weights = {"weights": f"{AESTHETIC_FILE}:sha256-{digest[:16]}", "published": digest == AESTHETIC_SHA256}
        return {**self.backend(ctx).describe(), **weights, "formula": "MLP(image embedding / |image embedding|)"}

    def score(self, items: Sequence[ImageItem], ctx: ScoringContext) -> list[Score]:
        import torch

        if not items:
            return []
        embeddings = _unit(self.backend(ctx).image_embeddings(items, ctx.features, self.batch_size))
        mlp = self._mlp(ctx, embeddings.shape[1])
        expected = mlp[0].in_features
        if expected != embeddings.shape[1]:
            raise ProbeError(f"aesthetic: the predictor takes {expected}-d CLIP embeddings, but {self.clip} gives "
                             f"{embeddings.shape[1]}-d ones; use the CLIP it was trained on (ViT-L/14)")
        with torch.inference_mode():
            values = mlp(torch.from_numpy(embeddings.astype(np.float32))).squeeze(1).double().numpy()
        return [Score(metric=self.name, value=float(v), key=item.key) for item, v in zip(items, values, strict=True)]
