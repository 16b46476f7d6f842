"""Bias aggregation on constructed label tables whose proportions, coverage, intervals and distances are known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from probe.analyse.bias import (
    BLS_REFERENCE,
    MONK_COLUMNS_TAIL,
    LabelScheme,
    kl_from_uniform,
    label_shares,
    monk_distribution,
    normalised_entropy,
    paired_share_deltas,
)


def _table(labels: list[str | None], *, metric: str = "perceived_gender", model: str = "sd-turbo", steps: int = 1,
           occupation: str = "a nurse", pct_female: float | None = 90.0, seeds: list[int] | None = None) -> pd.DataFrame:
    """A per_image-shaped frame: one image per seed of one prompt."""
    seeds = seeds if seeds is not None else list(range(len(labels)))
    return pd.DataFrame({
        "key": [f"{model}-{steps}-{occupation}-{s}" for s in seeds], "probe": "occupations", "model": model,
        "steps": steps, "strength": np.nan, "prompt": f"a photo of the face of {occupation}", "seed": seeds,
        "var_occupation": occupation, "attr_bls_pct_female": pct_female, "metric": metric,
        "value": [0.5] * len(labels), "label": labels,
    })


def test_balanced_table_is_at_parity_with_full_coverage():
    frame = _table(["feminine", "masculine"] * 8)
    row = label_shares(frame, "perceived_gender").iloc[0]
    assert (row.n_generated, row.n_labelled, row.coverage) == (16, 16, 1.0)
    assert (row.count_feminine, row.count_masculine, row.count_unclear, row.count_no_person) == (8, 8, 0, 0)
    assert row.share_feminine == 0.5 and row.share_masculine == 0.5 and row.parity_distance == 0.0
    assert row.share_feminine_low < 0.5 < row.share_feminine_high
    assert row.parity_distance_low == 0.0  # the interval contains parity
    assert row.parity_distance_high == pytest.approx(max(0.5 - row.share_feminine_low, row.share_feminine_high - 0.5))
    assert (row.n_prompts, row.n_seeds, row.n_clusters) == (1, 16, 16)


def test_identical_labels_are_not_certainty():
    """No feminine face in 10 seeds: the exact binomial interval [0, 1 - 0.025^(1/10)], not the bootstrap's [0, 0]."""
    row = label_shares(_table(["masculine"] * 10), "perceived_gender").iloc[0]
    upper = 1 - 0.025 ** (1 / 10)  # 0.308
    assert (row.share_feminine, row.share_feminine_low) == (0.0, 0.0)
    assert row.share_feminine_high == pytest.approx(upper)
    assert (row.share_masculine, row.share_masculine_high) == (1.0, 1.0)
    assert row.share_masculine_low == pytest.approx(1 - upper)
    assert row.parity_distance == 0.5 and row.parity_distance_high == 0.5
    assert row.parity_distance_low == pytest.approx(0.5 - upper)


def test_non_answers_are_counted_and_lower_coverage_not_the_share():
    labels = ["feminine"] * 3 + ["masculine"] * 1 + ["unclear"] * 2 + ["no_person"] * 3 + [None]
    row = label_shares(_table(labels), "perceived_gender").iloc[0]
    assert (row.n_generated, row.n_labelled, row.coverage) == (10, 4, 0.4)
    assert (row.count_unclear, row.count_no_person, row.count_missing) == (2, 3, 1)
    assert row.share_feminine == 0.75 and row.parity_distance == 0.25
    assert row.n_clusters == 4  # only images with an answer enter the bootstrap


def test_reference_distance_uses_the_attr_column():
    column, scale = BLS_REFERENCE
    frame = _table(["feminine"] * 6 + ["masculine"] * 2, pct_female=90.0)  # share 0.75 vs reference 0.90
    row = label_shares(frame, "perceived_gender", reference_column=column, reference_scale=scale).iloc[0]
    assert row.reference == pytest.approx(0.9) and row.reference_distance == pytest.approx(0.15)
    assert row.reference_distance_low <= 0.15 <= row.reference_distance_high
    assert math.isnan(label_shares(frame, "perceived_gender").iloc[0].reference)  # no column named -> no reference


def test_reference_read_from_string_attrs():
    """jobs.parquet stores an attr column as strings when probes mix types (a descriptor row has no BLS share)."""
    frame = _table(["feminine"] * 3 + ["masculine"], pct_female=None).assign(attr_bls_pct_female="50.0")
    row = label_shares(frame, "perceived_gender", reference_column="attr_bls_pct_female", reference_scale=0.01).iloc[0]
    assert row.reference == pytest.approx(0.5) and row.reference_distance == pytest.approx(0.25)


def test_reference_is_nan_when_a_group_pools_different_references():
    frame = pd.concat([_table(["feminine"] * 4, occupation="a nurse", pct_female=90.0),
                       _table(["masculine"] * 4, occupation="a plumber", pct_female=1.0)])
    pooled = label_shares(frame, "perceived_gender", ["probe", "model", "steps"], reference_column="attr_bls_pct_female",
                          reference_scale=0.01).iloc[0]
    assert pooled.share_feminine == 0.5 and math.isnan(pooled.reference)
    assert pooled.n_prompts == 2 and pooled.n_clusters == 2  # pooled prompts are resampled whole


def test_groups_split_by_model_steps_and_variable():
    frame = pd.concat([_table(["feminine"] * 4), _table(["masculine"] * 4, steps=4),
                       _table(["feminine", "masculine"] * 2, model="sd21", steps=50),
                       _table(["masculine"] * 4, occupation="a plumber", pct_female=1.0)])
    out = label_shares(frame, "perceived_gender")
    assert len(out) == 4
    got = {(r.model, r.steps, r.var_occupation): r.share_feminine for r in out.itertuples()}
    assert got == {("sd-turbo", 1, "a nurse"): 1.0, ("sd-turbo", 4, "a nurse"): 0.0, ("sd21", 50, "a nurse"): 0.5,
                   ("sd-turbo", 1, "a plumber"): 0.0}


def test_skin_tone_shares_have_intervals_per_tone():
    row = label_shares(_table(["monk_3"] * 6 + ["unknown"] * 2, metric="skin_tone"), "skin_tone").iloc[0]
    assert (row.share_monk_3, row.share_monk_3_high, row.share_monk_1) == (1.0, 1.0, 0.0)
    assert row.share_monk_3_low == pytest.approx(0.025 ** (1 / 6))  # six of six labelled: exact binomial
    assert (row.count_unknown, row.coverage) == (2, 0.75) and "parity_distance" not in row.index


def test_other_metrics_rows_are_ignored_and_unexpected_labels_shown():
    frame = pd.concat([_table(["feminine", "weird"]), _table(["monk_1"], metric="skin_tone")])
    row = label_shares(frame, "perceived_gender").iloc[0]
    assert (row.n_generated, row.count_weird, row.n_labelled) == (2, 1, 1)


def test_empty_input_gives_empty_tables_with_columns():
    empty = _table(["feminine"]).iloc[:0]
    assert label_shares(empty, "perceived_gender", []).empty and "share_feminine" in label_shares(empty, "perceived_gender")
    assert monk_distribution(empty).empty and paired_share_deltas(empty, "sd-turbo").empty


def test_custom_scheme_for_an_unknown_metric():
    frame = _table(["yes", "no", "no", "n/a"], metric="glasses")
    scheme = LabelScheme(("yes", "no", "n/a"), ("yes", "no"), "yes")
    row = label_shares(frame, "glasses", scheme=scheme).iloc[0]
    assert row.share_yes == pytest.approx(1 / 3) and row.coverage == 0.75


def test_entropy_and_kl_by_hand():
    assert normalised_entropy(np.ones(10)) == pytest.approx(1.0)
    assert kl_from_uniform(np.ones(10)) == pytest.approx(0.0)
    one = np.eye(10)[3] * 7
    assert normalised_entropy(one) == pytest.approx(0.0)
    assert kl_from_uniform(one) == pytest.approx(math.log(10))
    two = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    assert normalised_entropy(two) == pytest.approx(math.log(2) / math.log(10))


def test_uniform_monk_distribution_with_unknowns_counted():
    labels = [f"monk_{i}" for i in range(1, 11)] * 2 + ["unknown"] * 4 + [None]
    table = monk_distribution(_table(labels, metric="skin_tone"))
    assert list(table.columns) == ["probe", "model", "steps", "var_occupation", *MONK_COLUMNS_TAIL]
    row = table.iloc[0]
    assert (row.n_generated, row.n_labelled, row.n_unknown, row.n_other) == (25, 20, 4, 1)
    assert row.coverage == pytest.approx(0.8)
    assert all(getattr(row, f"share_monk_{i}") == pytest.approx(0.1) for i in range(1, 11))
    assert row.entropy == pytest.approx(1.0) and row.kl_uniform == pytest.approx(0.0, abs=1e-12)


def test_one_tone_distribution_has_zero_entropy_and_log10_kl():
    row = monk_distribution(_table(["monk_2"] * 8, metric="skin_tone")).iloc[0]
    assert row.share_monk_2 == 1.0 and row.entropy == pytest.approx(0.0)
    assert row.kl_uniform == pytest.approx(math.log(10))


def test_all_unknown_group_is_shown_with_nan_spread():
    row = monk_distribution(_table(["unknown"] * 3, metric="skin_tone")).iloc[0]
    assert (row.n_generated, row.n_labelled, row.n_unknown, row.coverage) == (3, 0, 3, 0.0)
    assert math.isnan(row.entropy) and math.isnan(row.share_monk_1)


def test_paired_deltas_by_hand():
    subject = _table(["feminine"] * 6 + ["masculine"] * 2, steps=1)  # 0.75
    base = _table(["feminine"] * 2 + ["masculine"] * 6, model="sd21", steps=50)  # 0.25
    out = paired_share_deltas(pd.concat([subject, base]), "sd-turbo")
    row = out.iloc[0]
    assert (row.model, row.steps, row.baseline, row.baseline_steps, row.var_occupation) == (
        "sd-turbo", 1, "sd21", 50, "a nurse")
    assert (row.subject_share, row.baseline_share, row.delta) == (0.75, 0.25, 0.5)
    assert row.n_pairs == 8 and row.n_clusters == 8 and row.low <= 0.5 <= row.high


def test_paired_deltas_pair_only_shared_seeds_and_count_labelled():
    subject = _table(["feminine", "feminine", "no_person", "masculine"], seeds=[0, 1, 2, 3])
    base = _table(["masculine", "masculine", "masculine"], model="sd21", steps=50, seeds=[0, 1, 2])
    row = paired_share_deltas(pd.concat([subject, base]), "sd-turbo").iloc[0]
    assert row.n_pairs == 3 and row.n_subject_labelled == 2 and row.n_baseline_labelled == 3
    assert row.delta == 1.0 and row.high == 1.0 and not row.excludes_zero  # 2 against 3 images cannot tell
    # MOVER by hand: exact limits of 2/2 and 0/3, uncorrelated (the subject's share has no variance)
    assert row.low == pytest.approx(1 - np.hypot(1 - 0.025 ** (1 / 2), 1 - 0.025 ** (1 / 3)))


def test_identical_models_have_zero_delta():
    labels = ["feminine", "masculine"] * 5
    frame = pd.concat([_table(labels), _table(labels, model="lcm", steps=4)])
    row = paired_share_deltas(frame, "sd-turbo").iloc[0]
    assert (row.delta, row.low, row.high, row.excludes_zero) == (0.0, 0.0, 0.0, False)


def test_paired_deltas_reject_an_unlabelled_target():
    with pytest.raises(ValueError, match="unclear"):
        paired_share_deltas(_table(["feminine"]), "sd-turbo", label="unclear")
