"""Set-metric intervals: the jackknife's pieces against direct computations, and its coverage by simulation.

The simulation is the claim: on Gaussian features with a known shift, the nominal 95% interval must cover
E[metric at that n] (a Monte Carlo mean over fresh draws) in 88-99% of 200 simulated experiments, for FID,
KID and CMMD, at two sample sizes, with a folder reference and with a paired model reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from probe.score.metrics.clip import Cmmd, mmd_rbf, rbf_kernel
from probe.score.metrics.distribution import kid, mmd2_unbiased, poly_kernel
from probe.score.metrics.fid import Fid, Kid
from probe.score.metrics.kernel_sums import GroupKernel
from probe.stats.jackknife import jackknife_interval, make_design

DIM, SEEDS, PROMPT_SD = 4, 2, 0.7
SHIFT = np.array([0.6, 0.0, 0.0, 0.0])
METRICS = {"fid": lambda: Fid(features="clip"), "kid": lambda: Kid(features="clip", n_subsets=10), "cmmd": Cmmd}


def draw(rng: np.random.Generator, prompts: int, paired: bool):
    """One experiment's sets: `prompts` x SEEDS evaluated images with a prompt effect, and a reference.

    Paired: the reference is another "model" of the same prompts (same prompt effects, own noise). Folder:
    independent reference images from the reference distribution (prompt effect marginalised).
    """
    effect = rng.normal(0, PROMPT_SD, (prompts, DIM))
    labels = np.repeat(np.arange(prompts), SEEDS)
    x = effect[labels] + rng.normal(0, 1, (len(labels), DIM)) + SHIFT
    x[:, 1] *= 1.3
    if paired:
        return x, effect[labels] + rng.normal(0, 1, (len(labels), DIM)), labels, labels
    return x, rng.normal(0, np.sqrt(1 + PROMPT_SD**2), (len(labels), DIM)), labels, None


def interval_of(metric, x, y, x_prompts, y_prompts):
    estimate, extra = metric.compare(x, y)
    design = make_design(x_prompts, y_prompts, n_reference=len(y))
    return estimate, metric.interval(x, y, design, estimate, extra)


@pytest.mark.parametrize("name", sorted(METRICS))
@pytest.mark.parametrize("prompts", [20, 80])
@pytest.mark.parametrize("paired", [False, True], ids=["folder", "paired"])
def test_nominal_95_interval_covers_the_expected_value(name, prompts, paired):
    rng = np.random.default_rng([len(name), prompts, paired])
    metric = METRICS[name]()
    truth = np.mean([metric.compare(*draw(rng, prompts, paired)[:2])[0] for _ in range(1000)])
    covered = 0
    for _ in range(200):
        x, y, x_prompts, y_prompts = draw(rng, prompts, paired)
        estimate, interval = interval_of(metric, x, y, x_prompts, y_prompts)
        assert interval.low <= interval.high
        assert interval.low <= estimate <= interval.high
        covered += interval.low <= truth <= interval.high
    assert 0.88 <= covered / 200 <= 0.99, f"{name} n={prompts * SEEDS} {'paired' if paired else 'folder'}: {covered}/200"


def test_the_old_bootstrap_failure_case_now_holds_its_estimate():
    """One distribution, n=200: the basic bootstrap excluded the estimate in 10 of 10 draws (KID low > high)."""
    rng = np.random.default_rng(0)
    for metric in (Fid(features="clip"), Kid(features="clip", n_subsets=10), Cmmd()):
        for _ in range(10):
            x, y = rng.normal(size=(200, DIM)), rng.normal(size=(200, DIM))
            estimate, interval = interval_of(metric, x, y, np.arange(200), None)
            assert interval.low <= interval.high
            assert interval.low <= estimate <= interval.high


def test_group_kernel_gives_the_direct_mmd_for_every_deletion():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 3)), rng.normal(size=(24, 3)) + 0.3
    design = make_design(np.repeat(np.arange(10), 3), np.repeat(np.arange(12), 2) % 10, max_groups=5)
    gamma = 1 / (2 * 10.0**2)
    sums = GroupKernel.of(lambda a, b: rbf_kernel(a, b, gamma), x, y, design, chunk=7)
    everything = np.ones(design.n_x_groups, dtype=bool)
    assert sums.mmd2(everything, everything, unbiased=False) * 1000 == pytest.approx(mmd_rbf(x, y), rel=1e-10)
    poly = GroupKernel.of(poly_kernel, x, y, design, chunk=4)
    for g in range(design.n_x_groups):
        keep = everything.copy()
        keep[g] = False
        kx, ky = x[keep[design.x_groups]], y[keep[design.y_groups]]
        assert sums.mmd2(keep, keep, unbiased=False) * 1000 == pytest.approx(mmd_rbf(kx, ky), rel=1e-10)
        if len(kx) == len(ky):
            direct = mmd2_unbiased(poly_kernel(kx, kx), poly_kernel(ky, ky), poly_kernel(kx, ky))
            assert poly.mmd2(keep, keep, unbiased=True) == pytest.approx(direct, rel=1e-10)


def test_kid_interval_is_centred_on_kid_and_its_full_set_statistic_is_kid_at_full_subsets():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 3)), rng.normal(size=(40, 3)) + 0.2
    design = make_design(np.arange(40), None, n_reference=40)
    full = GroupKernel.of(poly_kernel, x, y, design).mmd2(np.ones(design.n_x_groups, bool),
                                                          np.ones(design.n_y_groups, bool), unbiased=True)
    assert full == pytest.approx(kid(x, y, subset_size=40, n_subsets=3)[0], rel=1e-10)
    estimate, interval = interval_of(Kid(features="clip", n_subsets=10), x, y, np.arange(40), None)
    assert interval.low < estimate < interval.high
    assert estimate - interval.low == pytest.approx(interval.high - estimate)


def test_paired_design_removes_a_prompt_from_both_sets():
    design = make_design(np.array(["a", "a", "b", "c"]), np.array(["b", "a", "c", "c"]))
    assert design.paired and design.n_x_groups == 3
    group_of = dict(zip(["a", "a", "b", "c"], design.x_groups, strict=True))
    assert [group_of[p] for p in ["b", "a", "c", "c"]] == list(design.y_groups)


def test_no_interval_from_one_prompt_and_a_failed_replicate_is_reported():
    x = np.random.default_rng(3).normal(size=(4, 2))
    one_prompt = make_design(np.zeros(4), np.zeros(4))
    assert jackknife_interval(lambda kx, ky: 1.0, one_prompt, 1.0).low is None

    def broken(kx: np.ndarray, ky: np.ndarray) -> float:
        raise ValueError("too small")

    interval = jackknife_interval(broken, make_design(np.arange(4), np.arange(4)), float(x.sum()))
    assert interval.low is None and "too small" in (interval.reason or "")
