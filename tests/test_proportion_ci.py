"""Share intervals (Korn-Graubard) and paired share differences (MOVER): reference values, hand arithmetic, and
simulated coverage with a known truth where the cluster bootstrap they replace fails."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit, logit
from scipy.stats import beta, binomtest, t

from probe.stats.bootstrap import cluster_bootstrap
from probe.stats.proportion import (
    delta_estimate,
    effective_n,
    mean_estimate,
    paired_share_difference,
    share_difference,
    share_interval,
)


@pytest.mark.parametrize(("x", "n"), [(0, 8), (1, 8), (3, 10), (10, 10), (5, 120), (0, 120)])
def test_independent_images_give_scipys_exact_binomial_interval(x: int, n: int) -> None:
    values = np.r_[np.ones(x), np.zeros(n - x)]
    est = share_interval(values)  # one image per cluster
    ref = binomtest(x, n).proportion_ci(confidence_level=0.95, method="exact")
    assert (est.mean, est.n, est.n_clusters) == (x / n, n, n)
    assert est.low == pytest.approx(ref.low, abs=1e-12) and est.high == pytest.approx(ref.high, abs=1e-12)


def test_no_flagged_image_is_not_certainty() -> None:
    est = share_interval(np.zeros(8))
    boot = cluster_bootstrap(np.zeros(8))
    assert (boot.low, boot.high) == (0.0, 0.0)  # what the bootstrap claimed
    assert est.low == 0.0 and est.high == pytest.approx(1 - 0.025 ** (1 / 8))  # 0.369


def test_clustered_share_by_hand() -> None:
    """3 prompts x 2 seeds: positives (2, 0, 1); Korn-Graubard's n* and the beta quantiles written out."""
    values = np.array([1, 1, 0, 0, 1, 0], dtype=float)
    clusters = np.array([0, 0, 1, 1, 2, 2])
    p, n, k = 0.5, 6, 3
    resid = np.array([2, 0, 1]) - p * 2  # (1, -1, 0)
    v = k / (k - 1) * (resid ** 2).sum() / n ** 2  # 3/2 * 2 / 36 = 1/12
    n_star = min(n, p * (1 - p) / v) * (t.ppf(0.975, n - 1) / t.ppf(0.975, k - 1)) ** 2  # 3 * (2.571/4.303)^2
    assert effective_n(np.array([2.0, 0, 1]), np.array([2.0, 2, 2])) == pytest.approx(n_star)
    est = share_interval(values, clusters)
    x = p * n_star
    assert est.low == pytest.approx(beta.ppf(0.025, x, n_star - x + 1))
    assert est.high == pytest.approx(beta.ppf(0.975, x + 1, n_star - x))
    assert est.high - est.low > share_interval(values).high - share_interval(values).low  # clustering widens


def test_design_effect_below_one_never_narrows_below_independent_images() -> None:
    values = np.array([1, 0] * 6, dtype=float)  # every prompt exactly half: no between-prompt variance
    clustered = share_interval(values, np.repeat(np.arange(6), 2))
    independent = binomtest(6, 12).proportion_ci(method="exact")
    assert clustered.low <= independent.low and clustered.high >= independent.high


def test_one_cluster_has_no_interval() -> None:
    est = share_interval(np.array([0.0, 1, 1]), np.zeros(3))
    assert est.mean == pytest.approx(2 / 3) and np.isnan(est.low) and np.isnan(est.high)


def test_mover_of_two_independent_shares_by_hand() -> None:
    """Uncorrelated estimates (r = 0): limits are d -+ sqrt(sum of the squared one-sided half-widths)."""
    a = np.r_[np.ones(5), np.zeros(5)]
    b = np.r_[1.0, np.zeros(4), 1.0, np.zeros(4)]  # one overlap = n * p_a * p_b: residual products sum to 0
    assert ((a - a.mean()) * (b - b.mean())).sum() == pytest.approx(0)
    la, ua = binomtest(5, 10).proportion_ci(method="exact")
    lb, ub = binomtest(2, 10).proportion_ci(method="exact")
    est = paired_share_difference(a, b)
    assert est.mean == pytest.approx(0.3)
    assert est.low == pytest.approx(0.3 - np.hypot(0.5 - la, ub - 0.2))
    assert est.high == pytest.approx(0.3 + np.hypot(ua - 0.5, 0.2 - lb))


def test_correlated_pairs_narrow_the_difference() -> None:
    """Identical outcomes (r = 1) leave only the limits' asymmetry: narrower than the same shares unpaired."""
    a = np.array([1, 0, 0, 1, 0, 0, 0, 1], dtype=float)
    clusters = np.repeat(np.arange(4), 2)
    same = paired_share_difference(a, a.copy(), clusters)
    shuffled = paired_share_difference(a, a[[1, 0, 3, 2, 5, 4, 7, 6]], np.arange(8))
    lo, hi = share_interval(a, clusters).low, share_interval(a, clusters).high
    assert same.mean == 0 and same.low < 0 < same.high
    assert same.high - same.low == pytest.approx(2 * abs((3 / 8 - lo) - (hi - 3 / 8)))
    assert same.high - same.low < shuffled.high - shuffled.low


def test_no_events_on_either_side_still_has_a_width() -> None:
    est = paired_share_difference(np.zeros(40), np.zeros(40), np.repeat(np.arange(10), 4))
    assert est.mean == 0 and est.low < -0.05 and est.high > 0.05


def test_share_difference_from_sums_equals_row_form() -> None:
    rng = np.random.default_rng(3)
    a, b = (rng.random(24) < 0.3).astype(float), (rng.random(24) < 0.2).astype(float)
    clusters = np.repeat(np.arange(6), 4)
    rows = paired_share_difference(a, b, clusters)
    sums = share_difference(a.reshape(6, 4).sum(1), np.full(6, 4.0), b.reshape(6, 4).sum(1), np.full(6, 4.0))
    assert (rows.mean, rows.low, rows.high) == pytest.approx(sums)


def test_dispatch_uses_the_share_interval_only_for_zero_one_values() -> None:
    flags = np.array([0, 0, 1, 0, 0, 0], dtype=float)
    clusters = np.repeat(np.arange(3), 2)
    assert mean_estimate(flags, clusters, binary=True) == share_interval(flags, clusters)
    assert mean_estimate(flags, clusters, binary=False) == cluster_bootstrap(flags, clusters)
    scores = np.array([0.2, 0.0, 1.0, 0.5, 0.0, 0.1])  # declared binary but not 0/1: the bootstrap
    assert mean_estimate(scores, clusters, binary=True) == cluster_bootstrap(scores, clusters)
    assert delta_estimate(flags, 1 - flags, clusters, binary=True) == paired_share_difference(flags, 1 - flags, clusters)


def _clustered_flags(rng: np.random.Generator, p: float, rho: float, k: int, m: int) -> np.ndarray:
    """k prompts x m seeds; each prompt's flag probability ~ Beta with mean p and intra-prompt correlation rho."""
    probs = rng.beta(p * (1 - rho) / rho, (1 - p) * (1 - rho) / rho, size=k) if rho > 0 else np.full(k, p)
    return (rng.random((k, m)) < probs[:, None]).astype(float).ravel()


@pytest.mark.parametrize(("p", "rho", "k", "m"), [(0.01, 0.3, 30, 4), (0.03, 0.0, 30, 4), (0.1, 0.3, 10, 4),
                                                  (0.3, 0.3, 30, 4), (0.02, 0.3, 6, 8), (0.5, 0.2, 8, 4)])
def test_share_interval_covers_at_the_nominal_rate(p: float, rho: float, k: int, m: int) -> None:
    """Known truth p; the bootstrap covered 0.57 (p 0.01, 30 prompts) and 0.19-0.49 (6 prompts) here."""
    rng = np.random.default_rng(int(p * 1000) + k)
    clusters = np.repeat(np.arange(k), m)
    hits = []
    for _ in range(600):
        est = share_interval(_clustered_flags(rng, p, rho, k, m), clusters)
        hits.append(est.low <= p <= est.high)
    assert np.mean(hits) >= 0.93  # nominal 0.95; 600 draws have a standard error under 0.01


@pytest.mark.parametrize(("p_a", "p_b", "sigma", "tau", "k"), [(0.03, 0.01, 1.0, 0.0, 30), (0.01, 0.01, 1.0, 1.0, 10),
                                                               (0.1, 0.05, 1.0, 1.0, 30), (0.5, 0.3, 1.0, 1.0, 10),
                                                               (0.3, 0.3, 0.0, 0.0, 30)])
def test_paired_difference_covers_at_the_nominal_rate(p_a: float, p_b: float, sigma: float, tau: float,
                                                      k: int) -> None:
    """Logit-normal prompt effects (sigma) and pair effects shared by both models (tau), 4 seeds per prompt; the
    true difference is integrated numerically. The bootstrap covered 0.70-0.90 in the rare cases."""
    rng = np.random.default_rng(int(1000 * (p_a + p_b)) + k)
    spread = np.hypot(sigma, tau)
    draws = rng.normal(0, 1, 400_000) * spread
    truth = expit(logit(p_a) + draws).mean() - expit(logit(p_b) + draws).mean()
    m, clusters = 4, np.repeat(np.arange(k), 4)
    hits = []
    for _ in range(500):
        shared = rng.normal(0, sigma, (k, 1)) + rng.normal(0, tau, (k, m))
        a = (rng.random((k, m)) < expit(logit(p_a) + shared)).astype(float).ravel()
        b = (rng.random((k, m)) < expit(logit(p_b) + shared)).astype(float).ravel()
        est = paired_share_difference(a, b, clusters)
        hits.append(est.low <= truth <= est.high)
    assert np.mean(hits) >= 0.93
