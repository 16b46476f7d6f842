"""Paired preference statistics: win rates with a prompt-clustered bootstrap, Bradley-Terry (Elo) ratings with
bootstrap intervals over prompts, and Holm's step-down correction.

Written here rather than taken from a library: scipy's bootstrap resamples observations, not clusters (prompts),
`choix` fits Bradley-Terry but has no clustered bootstrap and is not a dependency, and statsmodels (which has
Holm in `multipletests`) would be a large dependency for six lines. Each is checked by a simulation with a known
truth (tests/test_preference_stats.py: intervals cover at their nominal rate) or by hand-computed values.

Small numbers of prompts: a percentile bootstrap over k clusters is too narrow (its variance is (k-1)/k of the
unbiased one, and its quantiles are normal where a t with k-1 degrees of freedom belongs): simulated Elo intervals
covered 92% at 30 prompts and 92% at 12. Both intervals are therefore widened about the estimate by
t(k-1) / z * sqrt(k / (k-1)) (`small_sample_factor`), which brought simulated coverage to 94-96% from 12 prompts up.

Bradley-Terry: P(i beats j) = sigmoid(b_i - b_j); a tie counts half a win to each side. The fit maximises the
likelihood with a weak ridge (`RIDGE`, like a fraction of a drawn game against the average), which keeps the
ratings finite when one configuration wins every game, and centres them (mean 0). Elo is the same scale in Elo's
units, 1000 + 400 * log10(e) * b, so a 400-point gap means 10:1 odds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from probe.stats.bootstrap import CONFIDENCE, N_RESAMPLES, cluster_replicates, widened

RIDGE = 0.01
ELO_BASE = 1000.0
ELO_SCALE = 400.0 / np.log(10.0)
NEWTON_STEPS = 30


@dataclass(frozen=True)
class WinRate:
    """How often one configuration's image beats its pair (ties half), with its bootstrap interval."""

    rate: float
    low: float
    high: float
    p_value: float
    """Two-sided bootstrap p-value against 0.5 (no preference); never below 1 / (resamples + 1)."""
    n_pairs: int
    n_prompts: int
    ties: int


def outcomes(subject: np.ndarray, opponent: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """1 where the subject's value is better, 0 where worse, 0.5 for a tie."""
    subject, opponent = np.asarray(subject, dtype=float), np.asarray(opponent, dtype=float)
    better = subject > opponent if higher_is_better else subject < opponent
    return np.where(subject == opponent, 0.5, better.astype(float))


def win_rate(results: np.ndarray, prompts: np.ndarray, *, n_resamples: int = N_RESAMPLES,
             confidence: float = CONFIDENCE, seed: int = 0) -> WinRate:
    """Mean of `results` (1 / 0.5 / 0 per pair) with a percentile interval from resampling prompts.

    The p-value is the centred bootstrap test: how often a resampled rate lies as far from the estimate as the
    estimate lies from 0.5.
    """
    results = np.asarray(results, dtype=float)
    ties = int(np.sum(results == 0.5))
    if len(results) == 0:
        return WinRate(float("nan"), float("nan"), float("nan"), float("nan"), 0, 0, 0)
    rate = float(results.mean())
    replicates, k = cluster_replicates(results, np.asarray(prompts), n_resamples=n_resamples, seed=seed)
    if replicates is None:
        return WinRate(rate, float("nan"), float("nan"), float("nan"), len(results), k, ties)
    alpha = (1 - confidence) / 2
    q_low, q_high = np.quantile(replicates, [alpha, 1 - alpha])
    low, high = widened(rate, q_low, q_high, k, confidence)
    low, high = np.clip(low, 0.0, 1.0), np.clip(high, 0.0, 1.0)
    extreme = np.sum(np.abs(replicates - rate) >= abs(rate - 0.5) - 1e-12)
    p_value = min(1.0, (extreme + 1) / (len(replicates) + 1))
    return WinRate(rate, float(low), float(high), float(p_value), len(results), k, ties)


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control; NaNs stay NaN and do not count)."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    present = np.flatnonzero(~np.isnan(p))
    m = len(present)
    order = present[np.argsort(p[present], kind="stable")]
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def fit_bradley_terry(wins: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """Centred Bradley-Terry strengths from win matrices: wins[..., i, j] = (half-)wins of i over j.

    Any leading dimensions are fitted at once (bootstrap replicates): Newton's method on the ridge-penalised
    log-likelihood, whose Hessian is negative definite, so a few steps converge.
    """
    wins = np.asarray(wins, dtype=float)
    k = wins.shape[-1]
    games = wins + np.swapaxes(wins, -1, -2)
    beta = np.zeros(wins.shape[:-1])
    eye = np.eye(k)
    for _ in range(NEWTON_STEPS):
        p = 1.0 / (1.0 + np.exp(-(beta[..., :, None] - beta[..., None, :])))
        grad = np.sum(wins - games * p, axis=-1) - ridge * beta
        curvature = games * p * (1 - p)
        hessian = curvature - eye * (np.sum(curvature, axis=-1)[..., :, None] + ridge)
        step = np.linalg.solve(hessian, grad[..., None])[..., 0]
        beta = beta - step
        if np.max(np.abs(step)) < 1e-10:
            break
    return beta - beta.mean(axis=-1, keepdims=True)


def to_elo(beta: np.ndarray) -> np.ndarray:
    return ELO_BASE + ELO_SCALE * np.asarray(beta)


@dataclass(frozen=True)
class Ratings:
    """Elo per player with percentile intervals from resampling prompts."""

    elo: np.ndarray
    low: np.ndarray
    high: np.ndarray
    games: np.ndarray
    n_prompts: int


def elo_ratings(player_a: np.ndarray, player_b: np.ndarray, score_a: np.ndarray, prompts: np.ndarray, n_players: int,
                *, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0) -> Ratings:
    """Bradley-Terry Elo of `n_players` from games (a, b, a's score 1 / 0.5 / 0), intervals over prompts."""
    player_a, player_b = np.asarray(player_a, dtype=int), np.asarray(player_b, dtype=int)
    score_a = np.asarray(score_a, dtype=float)
    _, cluster = np.unique(np.asarray(prompts), return_inverse=True)
    k = int(cluster.max()) + 1 if len(cluster) else 0
    per_prompt = np.zeros((k, n_players, n_players))  # each prompt's win matrix, summed over its games
    np.add.at(per_prompt, (cluster, player_a, player_b), score_a)
    np.add.at(per_prompt, (cluster, player_b, player_a), 1 - score_a)
    games = np.zeros(n_players)
    np.add.at(games, player_a, 1)
    np.add.at(games, player_b, 1)
    elo = to_elo(fit_bradley_terry(per_prompt.sum(axis=0)))
    if k < 2:
        nan = np.full(n_players, np.nan)
        return Ratings(elo, nan, nan, games, k)
    rng = np.random.default_rng(seed)
    replicates = []
    for start in range(0, n_resamples, 250):  # 250 fits at once: memory stays small for many players
        picks = rng.integers(0, k, size=(min(250, n_resamples - start), k))
        replicates.append(to_elo(fit_bradley_terry(per_prompt[picks].sum(axis=1))))
    stacked = np.concatenate(replicates)
    alpha = (1 - confidence) / 2
    q_low, q_high = np.quantile(stacked, [alpha, 1 - alpha], axis=0)
    low, high = widened(elo, q_low, q_high, k, confidence)
    return Ratings(elo, low, high, games, k)
