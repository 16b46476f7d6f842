"""Intervals for shares of 0/1 outcomes (flag rates, exact-match rates, label shares) and their paired differences.

The cluster bootstrap of `probe.stats.bootstrap` is a poor interval for a share near 0 or 1: with no flagged
image it is [0, 0], and simulated 95% intervals of a 1% rate covered 0.57 (30 prompts x 4 seeds) and 0.19
(6 prompts) of the time. A share is therefore given the Korn-Graubard interval (Korn & Graubard 1998, as R's
`survey::svyciprop(method = "beta")` and NCHS compute it): a Clopper-Pearson interval on the design-effect
sample size n* = p(1 - p) / v, where v is the prompt-clustered (ratio-estimator, with-replacement) variance,
n* is capped at n (never narrower than independent images) and adjusted by (t(n-1) / t(k-1))^2 for k clusters.
With one image per cluster it is exactly Clopper-Pearson (scipy's `binomtest(...).proportion_ci("exact")`).

A difference of two shares on the same prompts (subject minus baseline) is given MOVER (Zou & Donner 2008;
Newcombe 1998's method 10 with Wilson limits): each share's Korn-Graubard limits recovered into limits of the
difference, with the correlation of the two estimates from their cluster residuals (0 when one share has no
variance, which widens the interval).

Written by hand because no maintained Python package offers either for clustered data (statsmodels'
proportion_confint assumes independent observations); scipy's beta quantiles do the arithmetic. Simulated
coverage (tests/test_proportion_ci.py) is at or above 0.95 where the bootstrap fell to 0.19.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import beta, t

from probe.stats.bootstrap import CONFIDENCE, Estimate, cluster_bootstrap, cluster_sums, paired_delta


def all_zero_one(values: np.ndarray) -> bool:
    """Whether every non-missing value is 0 or 1 (and there is at least one)."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return len(values) > 0 and bool(np.isin(values, (0.0, 1.0)).all())


def clopper_pearson(x: float, n: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact binomial interval of x successes in n trials; x and n may be fractional (effective counts)."""
    alpha = (1 - confidence) / 2
    low = 0.0 if x <= 0 else float(beta.ppf(alpha, x, n - x + 1))
    high = 1.0 if x >= n else float(beta.ppf(1 - alpha, x + 1, n - x))
    return low, high


def _residuals(positives: np.ndarray, counts: np.ndarray) -> tuple[float, np.ndarray]:
    """The share and each cluster's linearised residual (positives - share * observations)."""
    share = float(positives.sum() / counts.sum())
    return share, positives - share * counts


def effective_n(positives: np.ndarray, counts: np.ndarray, confidence: float = CONFIDENCE) -> float:
    """Korn-Graubard's degrees-of-freedom-adjusted effective sample size of a clustered share."""
    n, k = float(counts.sum()), len(counts)
    if k == n:  # one observation per cluster: independent, exact Clopper-Pearson on n
        return n
    share, resid = _residuals(positives, counts)
    variance = k / (k - 1) * float((resid ** 2).sum()) / n ** 2
    n_eff = n if variance <= 0 or share in (0.0, 1.0) else min(n, share * (1 - share) / variance)
    q = (1 + confidence) / 2
    return n_eff * float(t.ppf(q, n - 1) / t.ppf(q, k - 1)) ** 2


def share_interval(values: np.ndarray, clusters: np.ndarray | None = None, *,
                   confidence: float = CONFIDENCE) -> Estimate:
    """A share of 0/1 `values` with its Korn-Graubard interval, clustered by `clusters` (e.g. the prompt).

    Returns:
        Estimate; the interval is NaN with fewer than two clusters, as the bootstrap's.
    """
    positives, counts = cluster_sums(values, clusters)
    if len(counts) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, 0)
    share, n = float(positives.sum() / counts.sum()), int(counts.sum())
    if len(counts) < 2:
        return Estimate(share, float("nan"), float("nan"), len(counts), n)
    n_eff = effective_n(positives, counts, confidence)
    low, high = clopper_pearson(share * n_eff, n_eff, confidence)
    return Estimate(share, min(low, share), max(high, share), len(counts), n)


def share_difference(pos_a: np.ndarray, n_a: np.ndarray, pos_b: np.ndarray, n_b: np.ndarray, *,
                     confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(difference, low, high) of share a minus share b from per-cluster sums over the same clusters (MOVER).

    Both shares' clusters must be the same and in the same order (pairs of one prompt together); a cluster may
    hold no observation of one side (its count is 0). NaN limits with fewer than two clusters on either side.
    """
    nan = float("nan")
    if n_a.sum() == 0 or n_b.sum() == 0:
        return nan, nan, nan
    p_a, resid_a = _residuals(pos_a, n_a)
    p_b, resid_b = _residuals(pos_b, n_b)
    seen_a, seen_b = n_a > 0, n_b > 0
    if seen_a.sum() < 2 or seen_b.sum() < 2:
        return p_a - p_b, nan, nan
    l_a, u_a = clopper_pearson(p_a * (m := effective_n(pos_a[seen_a], n_a[seen_a], confidence)), m, confidence)
    l_b, u_b = clopper_pearson(p_b * (m := effective_n(pos_b[seen_b], n_b[seen_b], confidence)), m, confidence)
    l_a, u_a, l_b, u_b = min(l_a, p_a), max(u_a, p_a), min(l_b, p_b), max(u_b, p_b)
    scale = float(np.sqrt((resid_a ** 2).sum() * (resid_b ** 2).sum()))
    r = float((resid_a * resid_b).sum()) / scale if scale > 0 else 0.0
    d = p_a - p_b
    low = d - np.sqrt(max(0.0, (p_a - l_a) ** 2 + (u_b - p_b) ** 2 - 2 * r * (p_a - l_a) * (u_b - p_b)))
    high = d + np.sqrt(max(0.0, (u_a - p_a) ** 2 + (p_b - l_b) ** 2 - 2 * r * (u_a - p_a) * (p_b - l_b)))
    return d, float(low), float(high)


def paired_share_difference(subject: np.ndarray, baseline: np.ndarray, clusters: np.ndarray | None = None, *,
                            confidence: float = CONFIDENCE) -> Estimate:
    """Mean of subject - baseline over pairs of 0/1 outcomes (same prompt and seed), MOVER interval by cluster."""
    subject = np.asarray(subject, dtype=float)
    baseline = np.asarray(baseline, dtype=float)
    if subject.shape != baseline.shape:
        raise ValueError("paired values must have the same shape")
    keep = ~(np.isnan(subject) | np.isnan(baseline))
    subject, baseline = subject[keep], baseline[keep]
    labels = np.arange(len(subject)) if clusters is None else np.asarray(clusters)[keep]
    if len(subject) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, 0)
    pos_a, n_a = cluster_sums(subject, labels)
    pos_b, n_b = cluster_sums(baseline, labels)
    d, low, high = share_difference(pos_a, n_a, pos_b, n_b, confidence=confidence)
    return Estimate(d, low, high, len(n_a), len(subject))


def mean_estimate(values: np.ndarray, clusters: np.ndarray | None, *, binary: bool) -> Estimate:
    """The mean and interval a table shows: a share's Korn-Graubard interval for a 0/1 output whose values are
    all 0 or 1, the prompt-clustered bootstrap otherwise."""
    if binary and all_zero_one(values):
        return share_interval(values, clusters)
    return cluster_bootstrap(values, clusters)


def delta_estimate(subject: np.ndarray, baseline: np.ndarray, clusters: np.ndarray | None, *,
                   binary: bool) -> Estimate:
    """A paired difference and its interval: MOVER for two 0/1 outputs, the clustered bootstrap otherwise."""
    if binary and all_zero_one(subject) and all_zero_one(baseline):
        return paired_share_difference(subject, baseline, clusters)
    return paired_delta(subject, baseline, clusters)
