"""FID and KID: distance from a group of generated images to a reference set, on pluggable features.

Two feature extractors, each with an `id` that names the network, the exact weights and the preprocessing
mode, so a cached vector or reference statistic is never reused across any of them:
- `InceptionExtractor`: the FID Inception-v3 pool3 (2048-d) of Heusel et al. 2017 with clean-fid's "clean"
  preprocessing (Parmar et al. 2022). Its weights are read from local disk only.
- `ClipFeatures`: L2-normalised CLIP image embeddings ("FD on CLIP"), which need no extra download and
  are shared with clip_score and cmmd.
The maths is in `probe.score.metrics.distribution`; this module does features, caching and Score records. The
scorer calls `embed` on both sets and then `compare` (once for the value, then once per bootstrap
resample of the evaluated set), so `compare` keeps the reference's moments for as long as it is handed the
same reference array. `score_set` (one group, no CI) also caches reference statistics on disk under
`<cache>/features/refstats/`, keyed by extractor id, mode and the sorted image keys of the reference set.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from probe.errors import ProbeError, UsageError, suggest
from probe.score.metrics.distribution import Gaussian, adapt_subset_size, frechet_to, kid, poly_kernel
from probe.score.metrics.inception import InceptionExtractor, StandInExtractor
from probe.score.metrics.kernel_sums import GroupKernel
from probe.score.protocol import ImageItem, ImageSet, Metric, Score, ScoringContext
from probe.spec.metric_catalog import METRICS
from probe.stats.jackknife import MAX_GROUPS, Design, Interval, jackknife_interval
from probe.store.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from probe.store.features import FeatureCache

logger = logging.getLogger(__name__)

FeatureKind = Literal["inception", "clip"]
FEATURE_KINDS: tuple[str, ...] = ("inception", "clip")
#: largest reference whose KID kernel matrix is kept between `compare` calls (4096^2 float64 = 128 MiB).
MAX_KERNEL_ROWS = 4096


class FeatureExtractor(Protocol):
    """What the set metrics need from a feature network."""

    #: names network, weights and preprocessing; the key of every cached vector and statistic.
    id: str
    #: name of the preprocessing / post-processing mode, also part of the reference-stats key.
    mode: str

    def embed(self, items: Sequence[ImageItem], cache: FeatureCache) -> np.ndarray: ...


class ClipFeatures:
    """CLIP image embeddings, L2-normalised, as features for a Fréchet distance or KID.

    The CLIP backend caches its embeddings per image in the FeatureCache itself, so they are computed once
    for clip_score, cmmd and these metrics alike; normalising is cheap and done here on every call.
    """

    mode = "clip-l2"

    def __init__(self, ctx: ScoringContext) -> None:
        from probe.score.metrics.clip import get_clip

        self._clip = get_clip(ctx)
        self.id = f"{self._clip.image_extractor_id}:fd"

    def embed(self, items: Sequence[ImageItem], cache: FeatureCache) -> np.ndarray:
        vectors = np.asarray(self._clip.image_embeddings(items, cache), dtype=np.float64)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)


def build_extractor(features: str, ctx: ScoringContext) -> FeatureExtractor:
    """The extractor named by a metric's `features` arg, one instance per scoring context.

    `inception` is the real FID Inception-v3, except when every image comes from the embedded tiny model
    and the CLIP is the tiny one too (`--model tiny` without `--clip-model`): then a seeded random-weight
    stand-in takes its place, as the tiny CLIP does for CLIP, so such runs score FID/KID offline. Its id marks
    it as a stand-in. Images made elsewhere (`probe score`), runs with any real model and runs scored with a
    real CLIP always get the real network.
    """
    if features == "inception":
        if ctx.all_tiny and ctx.clip_model == "tiny":
            return ctx.shared("fid-features:inception", lambda: StandInExtractor(device=ctx.device))
        return ctx.shared("fid-features:inception", lambda: InceptionExtractor(device=ctx.device))
    if features == "clip":
        return ctx.shared("fid-features:clip", lambda: ClipFeatures(ctx))
    raise UsageError(f"unknown features {features!r}{suggest(features, FEATURE_KINDS)}")


@dataclass(frozen=True)
class ReferenceStats:
    """Gaussian moments (for FID) and the features themselves (for KID) of a reference set."""

    gaussian: Gaussian
    features: np.ndarray


def sorted_items(items: Sequence[ImageItem]) -> list[ImageItem]:
    """Items in key order, so features (and KID's subset draws) do not depend on listing order."""
    return sorted(items, key=lambda item: item.key)


def reference_stats_path(extractor: FeatureExtractor, reference: ImageSet, cache: FeatureCache) -> Path:
    """Where the statistics of `reference` under `extractor` are cached."""
    material = {"extractor": extractor.id, "mode": extractor.mode, "keys": sorted(i.key for i in reference.items)}
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", extractor.id)[:80]
    return cache.cache_root / "refstats" / f"{safe}-{extractor.mode}-{digest[:40]}.npz"


def reference_stats(extractor: FeatureExtractor, reference: ImageSet, cache: FeatureCache) -> ReferenceStats:
    """Moments and features (rows in key order) of the reference set, computed once per (extractor, mode, keys)."""
    if len(reference.items) < 2:
        raise ProbeError(f"the reference set has {len(reference.items)} image(s); FID and KID need at least 2")
    path = reference_stats_path(extractor, reference, cache)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                return ReferenceStats(Gaussian(data["mu"], data["sigma"], data["factor"]), data["features"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            logger.warning("unreadable reference statistics %s (%s); recomputing", path, exc)
    features = extractor.embed(sorted_items(reference.items), cache)
    gaussian = Gaussian.of(features)
    buffer = io.BytesIO()
    np.savez(buffer, mu=gaussian.mu, sigma=gaussian.sigma, factor=gaussian.factor, features=features)
    atomic_write_bytes(path, buffer.getvalue())
    logger.info("reference statistics of %d images cached at %s", len(reference.items), path)
    return ReferenceStats(gaussian, features)


class _ReferenceDistance(Metric):
    """Shared by Fid and Kid: argument checks, extractor choice, the reference memo, `score_set`."""

    def __init__(self, features: FeatureKind = "inception", ci_groups: int = MAX_GROUPS) -> None:
        if features not in FEATURE_KINDS:
            raise UsageError(f"{self.name}: unknown features {features!r}{suggest(features, FEATURE_KINDS)}")
        self.features = features
        #: most jackknife groups of prompts for the CI (each one replicate; see probe.stats.jackknife).
        self.ci_groups = ci_groups
        self._reference: tuple[np.ndarray, ReferenceStats] | None = None

    def config(self, ctx: ScoringContext) -> dict[str, Any]:
        extractor = build_extractor(self.features, ctx)
        return {"features": self.features, "extractor": extractor.id, "mode": extractor.mode}

    def embed(self, items: Sequence[ImageItem], ctx: ScoringContext) -> np.ndarray:
        """(n, d) features of `items`, in order, through the feature cache."""
        return np.asarray(build_extractor(self.features, ctx).embed(items, ctx.features))

    def compare(self, features: np.ndarray, reference: np.ndarray) -> tuple[float, dict[str, Any]]:
        raise NotImplementedError

    def _stats(self, reference: np.ndarray) -> ReferenceStats:
        """The reference's moments, recomputed only when a different reference array is passed."""
        if self._reference is None or self._reference[0] is not reference:
            self._reference = (reference, ReferenceStats(Gaussian.of(reference), reference))
        return self._reference[1]

    def score_set(self, images: ImageSet, reference: ImageSet, ctx: ScoringContext) -> Score:
        """One Score for `images` against `reference` (no CI; the scorer adds one via embed/compare)."""
        extractor = build_extractor(self.features, ctx)
        stats = reference_stats(extractor, reference, ctx.features)
        self._reference = (stats.features, stats)
        extra: dict[str, Any] = {"n_reference": len(reference.items), "extractor": extractor.id, "mode": extractor.mode}
        value: float | None = None
        if len(images.items) < 2:
            logger.warning("%s: group %s has %d image(s); no value", self.name, images.group, len(images.items))
            extra["reason"] = "fewer than 2 images"
        else:
            value, more = self.compare(extractor.embed(sorted_items(images.items), ctx.features), stats.features)
            extra.update(more)
        return Score(metric=self.name, value=value, group=dict(images.group), n=len(images.items), extra=extra)


class Fid(_ReferenceDistance):
    """Fréchet distance between feature Gaussians of a group and a reference set (Heusel et al. 2017).

    With `features="inception"` this is FID as clean-fid computes it; with `"clip"` it is the same formula
    on CLIP embeddings (offline-friendly, not comparable to published FID numbers). FID from fewer images
    than feature dimensions is strongly biased upward; compare values only at equal set sizes.
    """

    info = METRICS["fid"]

    def compare(self, features: np.ndarray, reference: np.ndarray) -> tuple[float, dict[str, Any]]:
        """FID of embedded sets; ValueError when either has fewer than 2 rows."""
        if len(reference) < 2:
            raise ValueError(f"fid: the reference has {len(reference)} row(s), needs at least 2")
        return frechet_to(features, self._stats(reference).gaussian), {}

    def interval(self, features: np.ndarray, reference: np.ndarray, design: Design, estimate: float,
                 extra: dict[str, Any]) -> Interval:
        """Jackknife CI over prompts: each replicate is one `frechet_to` (an SVD), the fixed side's moments once."""
        fixed = self._stats(reference).gaussian

        def replicate(keep_x: np.ndarray, keep_y: np.ndarray) -> float:
            rows = np.asarray(features)[keep_x[design.x_groups]]
            if keep_y.all():
                return frechet_to(rows, fixed)
            kept = np.asarray(reference)[keep_y[design.y_groups]]
            if len(kept) < 2:
                raise ValueError("fewer than 2 reference rows")
            return frechet_to(rows, Gaussian.of(kept))

        return jackknife_interval(replicate, design, estimate, floor=0.0)


class Kid(_ReferenceDistance):
    """Kernel Inception Distance (Bińkowski et al. 2018): unbiased cubic-kernel MMD² over random subsets.

    Unbiased, so it suits smaller sets than FID; the subset size shrinks to the smaller set when needed and
    the record says so (`subset_adapted`), since smaller subsets give a noisier estimate.
    """

    info = METRICS["kid"]

    def __init__(
        self,
        features: FeatureKind = "inception",
        subset_size: int = 1000,
        n_subsets: int = 100,
        seed: int = 0,
        ci_groups: int = MAX_GROUPS,
    ) -> None:
        super().__init__(features, ci_groups)
        if subset_size < 2 or n_subsets < 1:
            raise UsageError(f"kid: subset_size must be >= 2 and n_subsets >= 1 (got {subset_size}, {n_subsets})")
        self.subset_size = subset_size
        self.n_subsets = n_subsets
        self.seed = seed
        self._kernel: tuple[np.ndarray, np.ndarray] | None = None

    def config(self, ctx: ScoringContext) -> dict[str, Any]:
        settings = {"subset_size": self.subset_size, "n_subsets": self.n_subsets, "seed": self.seed}
        return {**super().config(ctx), **settings, "kernel": "(x.y/d + 1)^3"}

    def compare(self, features: np.ndarray, reference: np.ndarray) -> tuple[float, dict[str, Any]]:
        """KID mean with std and the subset size used; ValueError when a set has fewer than 2 rows."""
        size = adapt_subset_size(len(features), len(reference), self.subset_size)
        if size != self.subset_size:
            logger.debug("kid: subset size %d -> %d (smaller set)", self.subset_size, size)
        k22 = self._reference_kernel(reference)
        mean, std = kid(features, reference, size, self.n_subsets, self.seed, k22=k22)
        adapted = size != self.subset_size
        return mean, {"std": std, "subset_size": size, "n_subsets": self.n_subsets, "subset_adapted": adapted}

    def interval(self, features: np.ndarray, reference: np.ndarray, design: Design, estimate: float,
                 extra: dict[str, Any]) -> Interval:
        """Jackknife CI of the full-set unbiased MMD² (KID's mean) plus the subset-sampling variance."""
        sums = GroupKernel.of(poly_kernel, np.asarray(features, dtype=np.float64),
                              np.asarray(reference, dtype=np.float64), design)
        subset_variance = float(extra.get("std", 0.0)) ** 2 / self.n_subsets
        return jackknife_interval(lambda kx, ky: sums.mmd2(kx, ky, unbiased=True), design, estimate,
                                  extra_variance=subset_variance)

    def _reference_kernel(self, reference: np.ndarray) -> np.ndarray | None:
        """poly_kernel(reference, reference), kept while the same reference array comes back (bootstrap)."""
        if len(reference) > MAX_KERNEL_ROWS:
            return None
        if self._kernel is None or self._kernel[0] is not reference:
            rows = np.asarray(reference, dtype=np.float64)
            self._kernel = (reference, poly_kernel(rows, rows))
        return self._kernel[1]
