"""Confidence intervals for set metrics (FID, KID, CMMD): a delete-a-group jackknife over prompts (pure numpy).

Why not the bootstrap. Resampling a set with replacement duplicates images, and an image is at distance 0 from
its copy, so every distance estimator (FID's covariance, MMD's kernel means) moves on duplicated data: the
bootstrap distribution is shifted away from the estimate, percentile intervals miss it and reflected ("basic")
intervals land below it (on Gaussian features from one distribution the basic interval excluded its own
estimate in 10 of 10 draws). Deleting never duplicates a row: every replicate is the same estimator on real,
distinct images, only slightly fewer of them.

What the interval covers: E[metric at this n], the mean of the same estimator over fresh draws of sets of the
same sizes. FID is biased upwards at finite n (Chong & Forsyth 2020) and that bias is part of the estimand,
not corrected: compare FIDs at equal n. The interval is `estimate ± t · se`, where se² is the delete-a-group
jackknife variance (G-1)/G · Σ_g (θ_(g) - θ̄)² over G groups of prompts (at most `MAX_GROUPS`, so FID needs
at most G factorisations), and t the Student quantile with G - 1 degrees of freedom. The jackknife variance is
conservative in expectation (Efron & Stein 1981); a coverage simulation with a known truth checks it
(tests/test_set_ci.py). It always contains the estimate and never has low > high.

- Paired reference (another model's images of the same prompts and seeds): a group of prompts is removed from
  both sets at once, so the pairing is kept (holding the reference fixed would ignore half the noise).
- Folder reference (independent images): the two-sample jackknife (Arvesen 1969), variance from removing groups
  of evaluated prompts plus variance from removing groups of reference images, degrees of freedom by
  Welch-Satterthwaite.
- KID averages MMD² over random subsets. Its replicates use the full-set unbiased U-statistic, whose mean KID
  shares, and the subset-sampling variance std²/n_subsets is added (it is 0 when each subset is a whole set).
  Bińkowski et al. 2018 give a closed-form variance for the U-statistic; the jackknife estimates the same
  quantity without per-kernel algebra and works for all three metrics alike.

MMD replicates never recompute a kernel: probe.score.metrics.kernel_sums.GroupKernel sums the kernel matrix once
per pair of groups, and each replicate is a quadratic form in group weights (O(G²)). Written by hand: no
library offers a clustered, two-sample jackknife for U/V-statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

from probe.stats.bootstrap import CONFIDENCE

#: most jackknife groups: each group's replicate is one metric evaluation (an SVD for FID).
MAX_GROUPS = 30
METHOD = "delete-a-group jackknife over prompts (t interval)"

#: A replicate: the metric with some groups removed (`keep_x[g]`: evaluated group g kept; `keep_y` likewise).
Replicate = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class Design:
    """Which rows of the evaluated set (x) and the reference (y) are removed together."""

    x_groups: np.ndarray
    """Group index (0..n_x_groups-1) of every evaluated row."""
    y_groups: np.ndarray
    """Group index of every reference row (the same index space as x when paired)."""
    n_x_groups: int
    n_y_groups: int
    paired: bool
    """True when group g names the same prompts in both sets (a model reference)."""


def _assign(labels: np.ndarray, max_groups: int, seed: int) -> tuple[np.ndarray, int]:
    """Group index per row: distinct labels shuffled (seeded) and dealt round-robin into at most max_groups."""
    distinct, inverse = np.unique(labels.astype(str), return_inverse=True)
    n_groups = min(len(distinct), max_groups)
    order = np.random.default_rng(seed).permutation(len(distinct))
    group_of_label = np.empty(len(distinct), dtype=int)
    group_of_label[order] = np.arange(len(distinct)) % max(n_groups, 1)
    return group_of_label[inverse], n_groups


def make_design(x_prompts: np.ndarray, y_prompts: np.ndarray | None, *, max_groups: int = MAX_GROUPS,
                seed: int = 0, n_reference: int | None = None) -> Design:
    """A paired design when the reference rows' prompts are given, else an independent (folder) one.

    Args:
        x_prompts: the prompt (cluster) of each evaluated row.
        y_prompts: the prompt of each reference row for a model reference; None for a folder reference,
            whose rows are independent images (each its own cluster).
        max_groups: at most this many jackknife groups per set.
        seed: seeds the assignment of prompts to groups.
        n_reference: the number of reference rows (required when y_prompts is None).
    """
    x_prompts = np.asarray(x_prompts)
    if y_prompts is not None:
        y_prompts = np.asarray(y_prompts)
        groups, n_groups = _assign(np.concatenate([x_prompts, y_prompts]), max_groups, seed)
        return Design(groups[: len(x_prompts)], groups[len(x_prompts):], n_groups, n_groups, True)
    if n_reference is None:
        raise ValueError("make_design: a folder reference needs n_reference")
    x_groups, n_x = _assign(x_prompts, max_groups, seed)
    y_groups, n_y = _assign(np.arange(n_reference), max_groups, seed + 1)
    return Design(x_groups, y_groups, n_x, n_y, False)


@dataclass(frozen=True)
class Interval:
    """A set metric's confidence interval and how it was made (None ends when it could not be estimated)."""

    low: float | None
    high: float | None
    se: float | None
    df: float | None
    reason: str | None = None
    """Why there is no interval (e.g. one prompt), None when there is one."""


def _jackknife_variance(replicates: list[float]) -> float:
    values = np.asarray(replicates, dtype=float)
    n = len(values)
    return float((n - 1) / n * np.sum((values - values.mean()) ** 2))


def _deletions(n_groups: int) -> list[np.ndarray]:
    keeps = []
    for g in range(n_groups):
        keep = np.ones(n_groups, dtype=bool)
        keep[g] = False
        keeps.append(keep)
    return keeps


def jackknife_interval(replicate: Replicate, design: Design, estimate: float, *, extra_variance: float = 0.0,
                       floor: float | None = None, confidence: float = CONFIDENCE) -> Interval:
    """`estimate ± t·se` from delete-a-group replicates of the metric (see the module docstring).

    Args:
        replicate: the metric with groups removed; may raise ValueError (a replicate too small to compute).
        design: the groups of both sets.
        estimate: the metric on all rows (the interval's centre).
        extra_variance: variance known apart from the jackknife (KID's subset sampling).
        floor: the smallest value the metric's expectation can take (0 for FID and biased MMD), or None.
        confidence: e.g. 0.95.
    """
    all_x, all_y = np.ones(design.n_x_groups, dtype=bool), np.ones(design.n_y_groups, dtype=bool)
    try:
        if design.paired:
            if design.n_x_groups < 2:
                return Interval(None, None, None, None, "fewer than 2 prompts")
            variance = _jackknife_variance([replicate(keep, keep) for keep in _deletions(design.n_x_groups)])
            df = design.n_x_groups - 1.0
        else:
            if design.n_x_groups < 2 or design.n_y_groups < 2:
                return Interval(None, None, None, None, "fewer than 2 prompts or reference images")
            v_x = _jackknife_variance([replicate(keep, all_y) for keep in _deletions(design.n_x_groups)])
            v_y = _jackknife_variance([replicate(all_x, keep) for keep in _deletions(design.n_y_groups)])
            variance = v_x + v_y
            df = _satterthwaite(v_x, design.n_x_groups - 1, v_y, design.n_y_groups - 1)
    except ValueError as exc:  # a replicate too small for the metric (e.g. one image left)
        return Interval(None, None, None, None, f"a jackknife replicate failed: {exc}")
    se = float(np.sqrt(variance + max(extra_variance, 0.0)))
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    low, high = estimate - half, estimate + half
    if floor is not None:  # a rounding error below the floor (FID -1e-12) must stay inside its own interval
        floor = min(floor, estimate)
        low, high = max(low, floor), max(high, floor)
    return Interval(float(low), float(high), se, df)


def _satterthwaite(v_x: float, df_x: float, v_y: float, df_y: float) -> float:
    """Welch-Satterthwaite degrees of freedom of a sum of two variance estimates."""
    denominator = v_x**2 / df_x + v_y**2 / df_y
    return float((v_x + v_y) ** 2 / denominator) if denominator > 0 else min(df_x, df_y)
