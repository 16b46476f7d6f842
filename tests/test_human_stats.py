"""Human-vote statistics: the prompt x rater interval covers a known win probability at (at least) its nominal
rate in simulated crossed studies, and Krippendorff's alpha matches the published example and a hand count."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

from probe.stats.human import crossed_win_rate, krippendorff_alpha
from probe.stats.preference import win_rate


def _study(rng, prompts, raters, mu, prompt_sd, rater_sd, answered=1.0):
    """Votes of every rater on every prompt's pair: P(subject) = expit(mu + prompt effect + rater effect)."""
    a, b = rng.normal(0, prompt_sd, prompts), rng.normal(0, rater_sd, raters)
    p_index, r_index = np.repeat(np.arange(prompts), raters), np.tile(np.arange(raters), prompts)
    keep = rng.random(len(p_index)) < answered  # raters who stop early: an unbalanced design
    p_index, r_index = p_index[keep], r_index[keep]
    votes = (rng.random(len(p_index)) < expit(mu + a[p_index] + b[r_index])).astype(float)
    return votes, p_index, r_index


def _truth(mu, prompt_sd, rater_sd):
    rng = np.random.default_rng(123)
    return float(expit(mu + rng.normal(0, prompt_sd, 1_000_000) + rng.normal(0, rater_sd, 1_000_000)).mean())


@pytest.mark.parametrize(("prompts", "raters", "rater_sd", "answered"),
                         [(30, 5, 0.5, 1.0), (12, 5, 0.5, 1.0), (30, 10, 1.0, 0.7), (60, 5, 0.5, 1.0)])
def test_crossed_interval_covers_the_population_win_rate(prompts, raters, rater_sd, answered):
    mu, prompt_sd, runs = 0.4, 0.8, 300
    truth = _truth(mu, prompt_sd, rater_sd)
    rng = np.random.default_rng(prompts * 100 + raters)
    covered = 0
    for i in range(runs):
        votes, p, r = _study(rng, prompts, raters, mu, prompt_sd, rater_sd, answered)
        rate = crossed_win_rate(votes, p, r, n_resamples=1000, seed=i)
        covered += rate.low <= truth <= rate.high
    coverage = covered / runs
    se = np.sqrt(0.95 * 0.05 / runs)
    assert 0.95 - 3 * se <= coverage <= 0.995, coverage  # nominal or a little above (the bootstrap is conservative)


def test_a_prompt_only_interval_is_too_narrow_when_raters_differ():
    """Why raters are a cluster: with 5 raters whose biases differ, resampling prompts alone misses often."""
    mu, prompt_sd, rater_sd, runs = 0.4, 0.3, 1.0, 200
    truth = _truth(mu, prompt_sd, rater_sd)
    rng = np.random.default_rng(5)
    prompt_only = crossed = 0
    for i in range(runs):
        votes, p, r = _study(rng, 30, 5, mu, prompt_sd, rater_sd)
        plain = win_rate(votes, p, n_resamples=1000, seed=i)
        both = crossed_win_rate(votes, p, r, n_resamples=1000, seed=i)
        prompt_only += plain.low <= truth <= plain.high
        crossed += both.low <= truth <= both.high
    assert prompt_only / runs < 0.85 < 0.93 <= crossed / runs


def test_crossed_win_rate_counts_and_p_value():
    rng = np.random.default_rng(0)
    votes, p, r = _study(rng, 20, 4, 1.5, 0.2, 0.2)
    rate = crossed_win_rate(votes, p, r)
    assert rate.rate == pytest.approx(votes.mean())
    assert (rate.n_pairs, rate.n_prompts) == (80, 20)
    assert rate.low < rate.rate < rate.high and rate.p_value < 0.01  # a strong preference is significant
    even = crossed_win_rate(np.tile([1.0, 0.0], 40), p, r)
    assert even.rate == 0.5 and even.p_value > 0.5
    assert np.isnan(crossed_win_rate(np.array([1.0]), np.array([0]), np.array([0])).low)


def _alpha_by_hand(data: np.ndarray) -> float:
    """Nominal alpha from its coincidence matrix (Krippendorff 2011, 'Computing Krippendorff's alpha')."""
    values = sorted({v for v in data.ravel() if not np.isnan(v)})
    o = np.zeros((len(values), len(values)))
    for unit in data.T:
        rated = [values.index(v) for v in unit if not np.isnan(v)]
        m = len(rated)
        if m < 2:
            continue
        for i, c in enumerate(rated):
            for j, k in enumerate(rated):
                if i != j:
                    o[c, k] += 1 / (m - 1)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    observed = o.sum() - np.trace(o)
    expected = (n_c.sum() ** 2 - np.sum(n_c ** 2)) / (n - 1)
    return float(1 - observed / expected)


def test_krippendorff_alpha_matches_the_published_example_and_a_hand_count():
    nan = np.nan
    published = np.array([  # Krippendorff (2011), 4 observers x 12 units, nominal alpha 0.743
        [1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
        [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan]])
    assert krippendorff_alpha(published) == pytest.approx(0.743, abs=5e-4)
    votes = np.array([[1, 1, 0, 0, 1, 1], [1, 0, 0, 0, 1, nan], [1, 1, 0, nan, 0, 1]], dtype=float)
    assert krippendorff_alpha(votes) == pytest.approx(_alpha_by_hand(votes), abs=1e-12)
    assert krippendorff_alpha(np.ones((3, 4))) != krippendorff_alpha(np.ones((3, 4)))  # one value only: NaN
    assert np.isnan(krippendorff_alpha(np.array([[1.0, 0.0, 1.0]])))  # one rater: undefined


@pytest.mark.parametrize(("prompts", "raters"), [(30, 5), (20, 10)])
def test_crossed_elo_interval_covers_the_population_rating(prompts, raters):
    """Two configurations: Bradley-Terry's Elo gap is 400 log10(p / (1 - p)) of the pooled win rate, so the
    population's p gives the true ratings (centred on 1000)."""
    from probe.stats.human import crossed_elo

    mu, prompt_sd, rater_sd, runs = 0.4, 0.8, 0.5, 200
    truth_p = _truth(mu, prompt_sd, rater_sd)
    truth = 1000 + 200 * np.log10(truth_p / (1 - truth_p))
    rng = np.random.default_rng(prompts + raters)
    covered = 0
    for i in range(runs):
        votes, p, r = _study(rng, prompts, raters, mu, prompt_sd, rater_sd)
        zeros = np.zeros(len(votes), dtype=int)
        ratings = crossed_elo(zeros, zeros + 1, votes, p, r, 2, n_resamples=500, seed=i)
        assert ratings.elo[0] + ratings.elo[1] == pytest.approx(2000)
        covered += ratings.low[0] <= truth <= ratings.high[0]
    coverage = covered / runs
    assert 0.95 - 3 * np.sqrt(0.95 * 0.05 / runs) <= coverage <= 0.995, coverage
