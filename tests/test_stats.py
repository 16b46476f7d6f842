"""Clustered bootstrap: agrees with scipy where they coincide, and clusters really move together."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from probe.stats.bootstrap import cluster_bootstrap, paired_delta


def test_matches_scipy_percentile_bootstrap_for_singleton_clusters():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=60)
    ours = cluster_bootstrap(x, n_resamples=20000, seed=3, small_sample=False)
    ref = stats.bootstrap((x,), np.mean, n_resamples=20000, method="percentile", random_state=4).confidence_interval
    assert ours.mean == pytest.approx(x.mean())
    assert ours.low == pytest.approx(ref.low, abs=0.05)
    assert ours.high == pytest.approx(ref.high, abs=0.05)


def test_constant_values_give_a_zero_width_interval():
    est = cluster_bootstrap(np.full(10, 7.0), np.repeat(np.arange(5), 2))
    assert (est.mean, est.low, est.high, est.n_clusters, est.n) == (7.0, 7.0, 7.0, 5, 10)


def test_clustering_widens_interval_for_correlated_seeds():
    rng = np.random.default_rng(0)
    prompt_effect = rng.normal(0, 1, size=20)
    values = np.repeat(prompt_effect, 8) + rng.normal(0, 0.01, size=160)  # 8 near-identical seeds per prompt
    clusters = np.repeat(np.arange(20), 8)
    naive = cluster_bootstrap(values)
    clustered = cluster_bootstrap(values, clusters)
    assert clustered.n_clusters == 20 and naive.n_clusters == 160
    assert (clustered.high - clustered.low) > 2 * (naive.high - naive.low)


def test_interval_is_reproducible_and_nan_for_one_cluster():
    x = np.arange(12.0)
    assert cluster_bootstrap(x, seed=5) == cluster_bootstrap(x, seed=5)
    one = cluster_bootstrap(x, np.zeros(12))
    assert one.mean == pytest.approx(5.5) and np.isnan(one.low) and np.isnan(one.high)


def test_nan_values_are_dropped_and_counted_out():
    est = cluster_bootstrap(np.array([1.0, np.nan, 3.0]), np.array([0, 1, 2]))
    assert (est.mean, est.n, est.n_clusters) == (2.0, 2, 2)


def test_paired_delta_sign_and_exclusion_of_zero():
    rng = np.random.default_rng(2)
    base = rng.normal(0, 1, size=50)
    est = paired_delta(base + 0.5, base, np.arange(50))
    assert est.mean == pytest.approx(0.5) and est.excludes_zero
    same = paired_delta(base, base + rng.normal(0, 1, size=50))
    assert not same.excludes_zero
