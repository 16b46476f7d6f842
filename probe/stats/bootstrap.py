"""Uncertainty for aggregates: bootstrap confidence intervals clustered by prompt, and paired deltas.

Written by hand because scipy.stats.bootstrap resamples observations independently: images of the same
prompt (its seeds) are correlated, so we resample whole prompts (clusters) with replacement, which scipy
does not offer. The percentile interval matches scipy's `method="percentile"` when every cluster holds one
observation (tested, with `small_sample=False`).

By default the interval is widened about the mean by t(k-1)/z * sqrt(k/(k-1)) for k clusters (`widened`): the
percentile bootstrap's variance is (k-1)/k of the unbiased one and its quantiles are normal where a t belongs,
so with few prompts it was too narrow. Simulated 95% intervals of a mean with correlated seeds (4 per prompt,
tests/test_bootstrap_coverage.py) covered 0.85 at 6 prompts, 0.90 at 12 and 0.945 at 30 before, and
0.95 / 0.95 / 0.94 (and 0.95 at 3 prompts) after.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_RESAMPLES = 2000
CONFIDENCE = 0.95


def small_sample_factor(k: int, confidence: float = CONFIDENCE) -> float:
    """How much to widen a k-cluster percentile interval about its estimate (see the module docstring)."""
    from scipy.stats import norm, t

    q = (1 + confidence) / 2
    return float(t.ppf(q, k - 1) / norm.ppf(q) * np.sqrt(k / (k - 1)))


def widened(estimate: np.ndarray | float, low: np.ndarray | float, high: np.ndarray | float, k: int,
            confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """A percentile interval widened by `small_sample_factor` about the estimate (its asymmetry kept)."""
    factor = small_sample_factor(k, confidence)
    return (np.asarray(estimate - factor * (np.asarray(estimate) - low)),
            np.asarray(estimate + factor * (np.asarray(high) - estimate)))


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
    small_sample: bool = True,
) -> Estimate:
    """Mean of `values` with a percentile CI from resampling clusters (all members move together).

    Args:
        values: one number per observation (NaNs are dropped together with their cluster labels).
        clusters: a label per observation (e.g. the prompt); None treats each observation as its own cluster.
        n_resamples: bootstrap resamples.
        confidence: interval coverage, e.g. 0.95.
        seed: seeds the resampling, so results are reproducible.
        small_sample: widen the interval for few clusters (see the module docstring); False gives the plain
            percentile interval.

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
    if small_sample:
        low, high = widened(mean, low, high, k, confidence)
    return Estimate(mean, float(low), float(high), k, len(values))


def cluster_sums(values: np.ndarray, clusters: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(sum of values, observations) per cluster, NaNs dropped with their labels; None: each value its own."""
    values = np.asarray(values, dtype=float)
    labels = np.arange(len(values)) if clusters is None else np.asarray(clusters)
    keep = ~np.isnan(values)
    return _sums_by_label(values[keep], labels[keep])


def _sums_by_label(values: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, inverse = np.unique(labels, return_inverse=True)
    return np.bincount(inverse, weights=values), np.bincount(inverse).astype(float)


def cluster_replicates(values: np.ndarray, labels: np.ndarray, *, n_resamples: int = N_RESAMPLES,
                       seed: int = 0) -> tuple[np.ndarray | None, int]:
    """Bootstrap means of `values` resampling whole clusters (`labels`), and the cluster count; None for the
    replicates with fewer than two clusters."""
    sums, counts = _sums_by_label(values, labels)
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
