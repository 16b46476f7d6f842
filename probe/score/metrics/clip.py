"""CLIP-based metrics: clip_score (prompt-image alignment) and cmmd (CLIP-embedding MMD between image sets).

One `ClipBackend` per scoring context loads the model once; its image and text embeddings go through the
shared FeatureCache under extractor ids that name the model, revision and preprocessing, so clip_score,
cmmd and later CLIP probes compute each embedding once, ever.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from probe.errors import ProbeError
from probe.score.metrics.clip_loaders import DEFAULT_CLIP_REVISION, Encoders, load_encoders
from probe.score.metrics.kernel_sums import GroupKernel
from probe.score.protocol import ImageItem, ImageSet, Metric, Score, ScoringContext
from probe.spec.metric_catalog import DEFAULT_CLIP_MODEL, METRICS
from probe.stats.jackknife import MAX_GROUPS, Design, Interval, jackknife_interval
from probe.store.features import FeatureCache, text_id

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_CLIP_REVISION",
    "ClipBackend",
    "ClipScore",
    "Cmmd",
    "clip_backend",
    "clip_scores",
    "get_clip",
    "mmd_rbf",
]


class ClipBackend:
    """A CLIP model loaded once, with cached image and text embeddings.

    Args:
        spec: "tiny" (embedded test model), a local folder saved with `save_pretrained`, a hub id
            (optionally "id@revision"; only the local HF cache is used), or "open_clip:ARCH:WEIGHTS_FILE".
        device: torch device string.
        revision: hub revision; defaults to the pinned one for the default model, else "main".
    """

    def __init__(self, spec: str = DEFAULT_CLIP_MODEL, device: str = "cpu", revision: str | None = None,
                 dtype: str | None = None, processor: str | None = None) -> None:
        self.spec = spec
        self.device = device
        self._encoders: Encoders = load_encoders(spec, device, revision, dtype, processor)
        self.dtype = self._encoders.dtype
        self.model_id = self._encoders.model_id
        self.revision = self._encoders.revision
        self.preprocessing = self._encoders.preprocessing
        self.max_tokens = self._encoders.max_tokens
        #: FeatureCache extractor ids: everything that decides an embedding, nothing else.
        # float32 ids stay as they were before dtypes existed (caches keep their vectors); others name the dtype.
        precision = "" if self.dtype == "float32" else f"|{self.dtype}"
        self.processor_id = self._encoders.processor_id
        source = f"|processor={self.processor_id}" if self.processor_id else ""
        self.image_extractor_id = (f"clip-image|{self.model_id}@{self.revision}|{self.preprocessing}"
                                   f"{precision}{source}")
        self.text_extractor_id = (f"clip-text|{self.model_id}@{self.revision}|max_tokens={self.max_tokens}"
                                  f"{precision}{source}")
        logger.info("CLIP backend %s @ %s on %s (%s)", self.model_id, self.revision, device, self.dtype)

    def describe(self) -> dict[str, Any]:
        """What a manifest records about this backend."""
        return {
            "model": self.model_id,
            "revision": self.revision,
            "preprocessing": self.preprocessing,
            "max_tokens": self.max_tokens,
            "truncation": f"first {self.max_tokens - 2} tokens + start/end tokens",
            **({"dtype": self.dtype} if self.dtype != "float32" else {}),  # float32 config ids as before
            **({"processor": self.processor_id} if self.processor_id else {}),
        }

    def logit_scale(self) -> float:
        """exp(the model's learnt logit scale), from its weights."""
        if self._encoders.logit_scale is None:
            raise ProbeError(f"CLIP {self.model_id} exposes no logit scale")
        return self._encoders.logit_scale()

    def image_embeddings(
        self, items: Sequence[ImageItem], cache: FeatureCache, batch_size: int = 16
    ) -> np.ndarray:
        """Unnormalised projected image embeddings (n, d), computed only for images not in the cache."""

        def compute(indices: list[int]) -> np.ndarray:
            chunks = []
            for start in range(0, len(indices), batch_size):
                images = [items[i].open() for i in indices[start : start + batch_size]]
                chunks.append(self._encoders.run(self._encoders.encode_images, images))
            return np.concatenate(chunks)

        return cache.get_or_compute(self.image_extractor_id, [item.key for item in items], compute)

    def text_embeddings(
        self, texts: Sequence[str], cache: FeatureCache, batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray]:
        """Unnormalised projected text embeddings (n, d) and a bool array: was the text truncated?

        Texts longer than `max_tokens` (start and end tokens included) keep their first tokens and the end
        token, as OpenAI's and open_clip's tokenizers do; the flag lets reports say which prompts CLIP
        never fully read.
        """

        def compute(indices: list[int]) -> np.ndarray:
            chunks = []
            for start in range(0, len(indices), batch_size):
                batch = [texts[i] for i in indices[start : start + batch_size]]
                chunks.append(self._encoders.run(self._encoders.encode_texts, batch))
            return np.concatenate(chunks)

        vectors = cache.get_or_compute(self.text_extractor_id, [text_id(t) for t in texts], compute)
        truncated = np.array([self._encoders.count_tokens(t) > self.max_tokens for t in texts], dtype=bool)
        return vectors, truncated


def _resolve_spec(spec: str, base_dir: Path) -> str:
    """A relative folder in a suite means relative to the suite file; everything else passes through."""
    if spec == "tiny" or spec.startswith("open_clip:") or Path(spec).is_absolute():
        return spec
    candidate = base_dir / spec
    return str(candidate.resolve()) if candidate.is_dir() else spec


def get_clip(ctx: ScoringContext) -> ClipBackend:
    """The context's shared CLIP backend (`ctx.clip_model` on `ctx.device`), loaded on first use."""
    return clip_backend(ctx, ctx.clip_model)


def clip_backend(ctx: ScoringContext, spec: str, processor: str | None = None) -> ClipBackend:
    """A CLIP backend shared in the context by spec (and processor): the run's CLIP when `spec` names it, so
    metrics on the same CLIP (clip_score, aesthetic) embed each image once."""
    resolved = _resolve_spec(spec, ctx.base_dir)
    name = "clip:" + spec + (f"|processor={processor}" if processor else "")
    backend: ClipBackend = ctx.shared(name, lambda: ClipBackend(resolved, device=ctx.device, processor=processor))
    return backend


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clip_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """Per-row CLIPScore = 100 * max(cos(image, text), 0) (Hessel et al. 2021, as torchmetrics computes it)."""
    cos = np.sum(_l2_normalise(image_embeddings) * _l2_normalise(text_embeddings), axis=-1)
    return 100.0 * np.maximum(cos, 0.0)


def rbf_kernel(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    """exp(-gamma * |a_i - b_j|^2) for every pair of rows, in float64."""
    sq = np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :] - 2.0 * a @ b.T
    return np.exp(-gamma * sq)


def _rbf_kernel_mean(a: np.ndarray, b: np.ndarray, gamma: float, block: int = 4096) -> float:
    """Mean of exp(-gamma * |a_i - b_j|^2) over all pairs, in row blocks so memory stays O(block * len(b))."""
    b_sq = np.sum(b * b, axis=1)
    total = 0.0
    for start in range(0, len(a), block):
        rows = a[start : start + block]
        sq = np.sum(rows * rows, axis=1)[:, None] + b_sq[None, :] - 2.0 * rows @ b.T
        total += float(np.exp(-gamma * sq).sum())
    return total / (len(a) * len(b))


def mmd_rbf(x: np.ndarray, y: np.ndarray, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """Squared MMD between samples x (n, d) and y (m, d) with a Gaussian RBF kernel, times `scale`.

    This is the minimum-variance (biased, V-statistic) estimator of Gretton et al. 2012, Eq. (5), exactly as
    the CMMD reference does it (google-research/google-research, cmmd/distance.py: `_SIGMA = 10`,
    `_SCALE = 1000`, k(a, b) = exp(-|a - b|^2 / (2 sigma^2)), all pairs including i == j):

        scale * (mean K(x, x) + mean K(y, y) - 2 mean K(x, y))

    It is therefore exactly 0 for identical sets and never negative. Computed in float64 (the reference
    uses float32), so values agree with it to float32 precision.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or not len(x) or not len(y):
        raise ValueError(f"mmd_rbf needs two non-empty (n, d) arrays with equal d, got {x.shape} and {y.shape}")
    gamma = 1.0 / (2.0 * sigma**2)
    k_xx = _rbf_kernel_mean(x, x, gamma)
    k_yy = _rbf_kernel_mean(y, y, gamma)
    k_xy = _rbf_kernel_mean(x, y, gamma)
    return scale * (k_xx + k_yy - 2.0 * k_xy)


class ClipScore(Metric):
    """clip_score: prompt-image alignment per image, 100 * max(cos(E_image, E_prompt), 0).

    Equal to torchmetrics' CLIPScore on the same model and prompts of at most `max_tokens` tokens. Longer
    prompts differ on purpose: torchmetrics slices the token ids (dropping the end token CLIP pools at), we
    truncate with the tokenizer (keeping it), and flag them in `extra["truncated"]`.
    """

    info = METRICS["clip_score"]

    def __init__(self, batch_size: int = 16) -> None:
        self.batch_size = batch_size

    def config(self, ctx: ScoringContext) -> dict[str, Any]:
        return {**get_clip(ctx).describe(), "formula": "100*max(cos(image, prompt), 0)"}

    def score(self, items: Sequence[ImageItem], ctx: ScoringContext) -> list[Score]:
        if not items:
            return []
        clip = get_clip(ctx)
        images = clip.image_embeddings(items, ctx.features, self.batch_size)
        texts, truncated = clip.text_embeddings([item.prompt for item in items], ctx.features)
        values = clip_scores(images, texts)
        return [
            Score(metric=self.name, value=float(value), key=item.key, extra={"truncated": bool(cut)})
            for item, value, cut in zip(items, values, truncated, strict=True)
        ]


class Cmmd(Metric):
    """cmmd: CLIP-embedding MMD of a set of images against a reference set (Jayasumana et al. 2024,
    "Rethinking FID: Towards a Better Evaluation Metric for Image Generation"; reference implementation
    google-research/google-research/cmmd).

    Unlike FID it assumes no normal distribution and suits small sets. Embeddings are the L2-normalised CLIP
    image embeddings shared with clip_score (scenic's CLIP, which the reference uses, normalises them too).
    The paper uses CLIP ViT-L/14 at 336 px; the default here is ViT-L/14 at 224 px, so absolute values are
    comparable within probe, not with the paper's tables.
    """

    info = METRICS["cmmd"]

    def __init__(self, sigma: float = 10.0, scale: float = 1000.0, batch_size: int = 16,
                 ci_groups: int = MAX_GROUPS) -> None:
        self.sigma = sigma
        self.scale = scale
        self.batch_size = batch_size
        #: most jackknife groups of prompts for the CI (see probe.stats.jackknife).
        self.ci_groups = ci_groups

    def config(self, ctx: ScoringContext) -> dict[str, Any]:
        return {
            **get_clip(ctx).describe(),
            "sigma": self.sigma,
            "scale": self.scale,
            "estimator": "biased (V-statistic), as google-research cmmd/distance.py",
            "embeddings": "L2-normalised CLIP image embeddings",
        }

    def embed(self, items: Sequence[ImageItem], ctx: ScoringContext) -> np.ndarray:
        """L2-normalised CLIP image embeddings (n, d) of `items`, in order, through the feature cache."""
        return _l2_normalise(get_clip(ctx).image_embeddings(items, ctx.features, self.batch_size))

    def compare(self, features: np.ndarray, reference: np.ndarray) -> tuple[float, dict[str, Any]]:
        """CMMD of embedded sets; raises ValueError when either is empty."""
        return mmd_rbf(features, reference, sigma=self.sigma, scale=self.scale), {}

    def interval(self, features: np.ndarray, reference: np.ndarray, design: Design, estimate: float,
                 extra: dict[str, Any]) -> Interval:
        """Jackknife CI over prompts; each replicate is a quadratic form in kernel sums computed once."""
        gamma = 1.0 / (2.0 * self.sigma**2)
        sums = GroupKernel.of(lambda a, b: rbf_kernel(a, b, gamma), np.asarray(features, dtype=np.float64),
                              np.asarray(reference, dtype=np.float64), design)
        return jackknife_interval(lambda kx, ky: self.scale * sums.mmd2(kx, ky, unbiased=False), design, estimate,
                                  floor=0.0)

    def score_set(self, images: ImageSet, reference: ImageSet, ctx: ScoringContext) -> Score:
        """One Score for `images` against `reference` (no CI; the scorer adds one via embed/compare)."""
        extra: dict[str, Any] = {"n_reference": len(reference.items)}
        if not images.items or not reference.items:
            logger.warning("cmmd of group %s: empty set or reference, no value", images.group)
            return Score(metric=self.name, value=None, group=dict(images.group), n=len(images.items), extra=extra)
        value, more = self.compare(self.embed(images.items, ctx), self.embed(reference.items, ctx))
        return Score(metric=self.name, value=value, group=dict(images.group), n=len(images.items), extra={**extra, **more})
