"""Win rates, Bradley-Terry Elo and Holm: intervals checked by simulation with a known truth (coverage at the
nominal 95%), the fit against its closed form, Holm against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from probe.stats.preference import ELO_SCALE, elo_ratings, fit_bradley_terry, holm, outcomes, to_elo, win_rate

SIMULATIONS = 300
# Coverage of a 95% interval over SIMULATIONS runs: 0.95 +- 3 binomial standard errors (0.0126 each).
BAND = (0.95 - 3 * 0.0126, 0.95 + 3 * 0.0126)


def test_outcomes_count_ties_half_and_follow_the_direction():
    assert outcomes(np.array([2.0, 1.0, 3.0]), np.array([1.0, 1.0, 4.0])).tolist() == [1.0, 0.5, 0.0]
    assert outcomes(np.array([2.0, 1.0]), np.array([1.0, 3.0]), higher_is_better=False).tolist() == [0.0, 1.0]


def _metric_study(rng, gap: float, prompts: int = 30, seeds: int = 4, tau: float = 0.7, sigma: float = 1.0):
    """Per-image scores of two configurations, paired by (prompt, seed), with a prompt x configuration effect
    (so seeds of one prompt are correlated); the true win probability is Phi(gap / sqrt(2 (sigma^2 + tau^2)))."""
    u = rng.normal(0, tau, size=(prompts, 2))
    a = gap + u[:, [0]] + rng.normal(0, sigma, size=(prompts, seeds))
    b = u[:, [1]] + rng.normal(0, sigma, size=(prompts, seeds))
    labels = np.repeat(np.arange(prompts), seeds)
    return a.ravel(), b.ravel(), labels


@pytest.mark.parametrize(("gap", "prompts"), [(0.0, 30), (0.6, 30), (0.6, 12)])
def test_win_rate_intervals_cover_the_true_preference_probability_at_95_percent(gap, prompts):
    rng = np.random.default_rng(1)
    truth = float(norm.cdf(gap / np.sqrt(2 * (1.0 + 0.7**2))))
    covered = 0
    for i in range(SIMULATIONS):
        a, b, labels = _metric_study(rng, gap, prompts=prompts)
        result = win_rate(outcomes(a, b), labels, n_resamples=1000, seed=i)
        covered += result.low <= truth <= result.high
    assert BAND[0] <= covered / SIMULATIONS <= BAND[1], covered / SIMULATIONS


def test_the_win_rate_p_value_rejects_at_its_level_when_nothing_differs_and_finds_a_real_gap():
    rng = np.random.default_rng(2)
    null = [win_rate(outcomes(*_metric_study(rng, 0.0)[:2]), _metric_study(rng, 0.0)[2], n_resamples=1000,
                     seed=i).p_value for i in range(200)]
    assert 0.01 <= np.mean(np.array(null) < 0.05) <= 0.10  # about 5% false positives
    a, b, labels = _metric_study(rng, 1.5)
    assert win_rate(outcomes(a, b), labels).p_value < 0.01


def test_bradley_terry_recovers_a_two_player_closed_form():
    # Two players, 30 wins to 10: the MLE gap is log(3) (the ridge moves it by well under a percent).
    beta = fit_bradley_terry(np.array([[0.0, 30.0], [10.0, 0.0]]))
    assert beta[0] - beta[1] == pytest.approx(np.log(3), rel=5e-3)
    assert beta.sum() == pytest.approx(0.0, abs=1e-12)
    assert to_elo(beta)[0] - to_elo(beta)[1] == pytest.approx(ELO_SCALE * np.log(3), rel=5e-3)
    unbeaten = fit_bradley_terry(np.array([[0.0, 12.0], [0.0, 0.0]]))
    assert np.isfinite(unbeaten).all() and unbeaten[0] > unbeaten[1] + 2  # finite, and far apart


def _tournament(rng, beta, prompts=30, seeds=3):
    """Every pair of players compared once per (prompt, seed), outcomes from Bradley-Terry with strengths `beta`."""
    a, b, s, p = [], [], [], []
    for prompt in range(prompts):
        for _ in range(seeds):
            for i in range(len(beta)):
                for j in range(i + 1, len(beta)):
                    win = rng.random() < 1 / (1 + np.exp(-(beta[i] - beta[j])))
                    a.append(i), b.append(j), s.append(1.0 if win else 0.0), p.append(prompt)
    return np.array(a), np.array(b), np.array(s), np.array(p)


@pytest.mark.parametrize("prompts", [30, 12])
def test_elo_intervals_cover_the_true_ratings_at_95_percent(prompts):
    beta = np.array([0.6, 0.0, -0.6])
    truth = to_elo(beta - beta.mean())
    rng = np.random.default_rng(3)
    covered = np.zeros(3)
    for i in range(SIMULATIONS):
        ratings = elo_ratings(*_tournament(rng, beta, prompts=prompts), n_players=3, n_resamples=500, seed=i)
        covered += (ratings.low <= truth) & (truth <= ratings.high)
    rates = covered / SIMULATIONS
    assert ((BAND[0] <= rates) & (rates <= BAND[1])).all(), rates


def test_holm_matches_hand_computed_adjustments():
    # m = 4: sorted p 0.01, 0.02, 0.03, 0.5 -> 0.04, 0.06, 0.06 (monotone), 0.5.
    adjusted = holm(np.array([0.03, 0.01, 0.5, 0.02, np.nan]))
    np.testing.assert_allclose(adjusted[:4], [0.06, 0.04, 0.5, 0.06])
    assert np.isnan(adjusted[4])
    assert holm(np.array([0.4, 0.3])).tolist() == [0.6, 0.6]
