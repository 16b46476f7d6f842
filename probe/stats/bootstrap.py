"""Uncertainty for aggregates: bootstrap confidence intervals clustered by prompt, and paired deltas.

Written by hand because scipy.stats.bootstrap resamples observations independently: images of the same
prompt (its seeds) are correlated, so we resample whole prompts (clusters) with replacement, which scipy
does not offer. The percentile interval matches scipy's `method="percentile"` when every cluster holds one
observation (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap confidence interval and the sample sizes behind it."""

    mean: float
    low: float
    high: float
    n_clusters: int
    n: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (for deltas)."""
        return bool(self.low > 0 or self.high < 0)


def cluster_bootstrap(
    values: np.ndarray,
    clusters: np.ndarray | None = None,
    *,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Estimate:
    """Mean of `values` with a percentile CI from resampling clusters (all members move together).

    Args:
        values: one number per observation (NaNs are dropped together with their cluster labels).
        clusters: a label per observation (e.g. the prompt); None treats each observation as its own cluster.
        n_resamples: bootstrap resamples.
        confidence: interval coverage, e.g. 0.95.
        seed: seeds the resampling, so results are reproducible.

    Returns:
        Estimate; the interval is NaN with fewer than two clusters.
    """
    values = np.asarray(values, dtype=float)
    labels = np.arange(len(values)) if clusters is None else np.asarray(clusters)
    keep = ~np.isnan(values)
    values, labels = values[keep], labels[keep]
    if len(values) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, 0)
    mean = float(values.mean())
    stats, k = cluster_replicates(values, labels, n_resamples=n_resamples, seed=seed)
    if stats is None:
        return Estimate(mean, float("nan"), float("nan"), k, len(values))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return Estimate(mean, float(low), float(high), k, len(values))


def cluster_replicates(values: np.ndarray, labels: np.ndarray, *, n_resamples: int = N_RESAMPLES,
                       seed: int = 0) -> tuple[np.ndarray | None, int]:
    """Bootstrap means of `values` resampling whole clusters (`labels`), and the cluster count; None for the
    replicates with fewer than two clusters."""
    _, inverse = np.unique(labels, return_inverse=True)
    sums = np.bincount(inverse, weights=values)
    counts = np.bincount(inverse).astype(float)
    k = len(sums)
    if k < 2:
        return None, k
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, k, size=(n_resamples, k))
    return sums[picks].sum(axis=1) / counts[picks].sum(axis=1), k


def paired_delta(
    subject: np.ndarray, baseline: np.ndarray, clusters: np.ndarray | None = None, **kwargs: object
) -> Estimate:
    """Mean of subject - baseline over pairs (same prompt and seed), CI clustered by prompt."""
    subject = np.asarray(subject, dtype=float)
    baseline = np.asarray(baseline, dtype=float)
    if subject.shape != baseline.shape:
        raise ValueError("paired values must have the same shape")
    return cluster_bootstrap(subject - baseline, clusters, **kwargs)  # type: ignore[arg-type]
