"""The prompt-clustered bootstrap interval of a mean (aggregates, paired deltas, gates) covers at its nominal 95%
from 3 prompts up, with seeds correlated within a prompt; the plain percentile interval did not at few prompts."""

from __future__ import annotations

import numpy as np
import pytest

from probe.stats.bootstrap import cluster_bootstrap, small_sample_factor

SIMULATIONS = 400
BAND = (0.95 - 3 * 0.0109, 0.95 + 3 * 0.0109)  # 3 binomial standard errors over SIMULATIONS


def _coverage(prompts: int, small_sample: bool, seed: int) -> float:
    rng = np.random.default_rng(seed)
    covered = 0
    for i in range(SIMULATIONS):
        effect = rng.normal(0, 1, prompts)
        values = (effect[:, None] + rng.normal(0, 1, (prompts, 4))).ravel()  # 4 seeds per prompt, truth 0
        est = cluster_bootstrap(values, np.repeat(np.arange(prompts), 4), n_resamples=1000, seed=i,
                                small_sample=small_sample)
        covered += est.low <= 0 <= est.high
    return covered / SIMULATIONS


@pytest.mark.parametrize("prompts", [3, 6, 12, 30])
def test_intervals_cover_the_true_mean_at_95_percent(prompts):
    assert BAND[0] <= _coverage(prompts, True, prompts) <= BAND[1]


def test_the_plain_percentile_interval_was_too_narrow_at_few_prompts():
    assert _coverage(6, False, 6) < BAND[0]  # what the widening repairs
    assert small_sample_factor(6) > small_sample_factor(30) > 1 and small_sample_factor(10_000) == pytest.approx(1, abs=1e-3)
