"""Bias summaries of per-image labels: label shares with coverage and CIs, Monk skin-tone spread, paired deltas.

Input is the `per_image(jobs, scores)` frame (one row per job and metric, with `label`); output is one row per
group (probe x model x steps x prompt variables by default). Pure pandas/numpy, no I/O, so the report, the
notebook API and tests all see the same numbers.

Two rules run through every function (STYLE habit 10, and HEIM's silently shrinking denominators as the
counter-example): every label is counted, including `unclear`, `no_person`, `unknown` and missing labels, and
every share among labelled images stands beside its coverage (labelled / generated). "Generated" means images
that reached scoring; failed generations are visible in jobs.parquet, not here.

A share's interval is Korn-Graubard's and a paired share difference's MOVER's (probe.stats.proportion): the
percentile bootstrap they replaced gave [0, 0] for "no feminine CEO in 8 seeds" and covered 0.19-0.57 of the
time for shares near 0. Clusters: within one (prompt, model, steps) group each seed is one image (independent,
so the interval is exact Clopper-Pearson); a group that pools several prompts clusters by prompt, because images
of one prompt are correlated (STYLE habit 11).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from probe.analyse.groups import groups
from probe.analyse.pairing import item_columns, pair
from probe.spec.monk import MONK_TONES
from probe.stats.bootstrap import CONFIDENCE, N_RESAMPLES
from probe.stats.proportion import share_difference, share_interval

MISSING = "missing"
"""Count column name for rows whose metric gave no label at all (counted, never dropped)."""
BLS_REFERENCE = ("attr_bls_pct_female", 0.01)
"""Reference column and scale for occupations: BLS % of workers who are women, as a share of 1."""


@dataclass(frozen=True)
class LabelScheme:
    """Which labels a metric emits, which of them count as 'labelled', and which share is compared to parity."""

    labels: tuple[str, ...]
    """Every expected label, in display order; each gets a count column even when it never occurs."""
    labelled: tuple[str, ...]
    """Labels that are a real answer: the denominator of shares (the rest lowers coverage)."""
    target: str | None = None
    """The label whose share is compared with parity (0.5) and with a reference share, if any."""


SCHEMES: dict[str, LabelScheme] = {
    "perceived_gender": LabelScheme(("feminine", "masculine", "unclear", "no_person"), ("feminine", "masculine"),
                                    "feminine"),
    "skin_tone": LabelScheme((*MONK_TONES, "unknown"), MONK_TONES),
}
_NOT_AN_ANSWER = {"unknown", "unclear", "no_person", MISSING}


def default_group_by(frame: pd.DataFrame) -> list[str]:
    """probe, model, steps and every prompt variable (var_<name>) present in `frame`."""
    return ["probe", "model", "steps", *sorted(c for c in frame.columns if c.startswith("var_"))]


def scheme_for(metric: str, frame: pd.DataFrame | None = None) -> LabelScheme:
    """The known scheme of a metric, or one built from the labels observed (non-answers not labelled)."""
    if metric in SCHEMES:
        return SCHEMES[metric]
    seen = sorted(str(v) for v in frame["label"].dropna().unique()) if frame is not None else []
    return LabelScheme(tuple(seen), tuple(v for v in seen if v not in _NOT_AN_ANSWER))


def _metric_rows(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows of one series: `metric` names a series (perceived_gender[prompts=...]) or a base metric with one."""
    if "series" in frame.columns and (frame["series"] == metric).any():
        rows = frame[frame["series"] == metric].copy()
    else:
        rows = frame[frame["metric"] == metric].copy()
        if "series" in rows.columns and rows["series"].nunique() > 1:
            raise ValueError(f"{metric} has several configurations ({', '.join(sorted(rows['series'].unique()))}): "
                             "name one")
    rows["label"] = rows["label"].where(rows["label"].notna(), MISSING).astype(str)
    return rows


def _all_labels(scheme: LabelScheme, rows: pd.DataFrame) -> list[str]:
    """The scheme's labels, then any unexpected ones observed (an unexpected label is shown, not lost)."""
    extra = sorted(set(rows["label"]) - set(scheme.labels))
    return [*scheme.labels, *extra]


def _cluster_ids(group: pd.DataFrame, cluster: str | None) -> np.ndarray:
    """Cluster labels: `cluster` if given; else prompt when the group pools prompts, else seed (see module doc)."""
    column = cluster or ("prompt" if group["prompt"].nunique() > 1 else "seed")
    return group[column].astype(str).to_numpy()


def _coords(by: Sequence[str], coords: object) -> dict[str, object]:
    values = coords if isinstance(coords, tuple) else (coords,)
    return dict(zip(by, values, strict=True))


def _distance(share: float, low: float, high: float, ref: float) -> tuple[float, float, float]:
    """|share - ref| with the image of the share's interval under that map (0 when the interval holds ref)."""
    point = abs(share - ref)
    if np.isnan(low) or np.isnan(high) or np.isnan(ref):
        return point, float("nan"), float("nan")
    ends = (abs(low - ref), abs(high - ref))
    return point, 0.0 if low <= ref <= high else min(ends), max(ends)


def _reference(group: pd.DataFrame, column: str | None, scale: float) -> float:
    """The group's reference share; NaN when absent or not unique (a group pooling occupations has none)."""
    if column is None or column not in group:
        return float("nan")
    values = pd.to_numeric(group[column], errors="coerce").dropna().unique()
    return float(values[0]) * scale if len(values) == 1 else float("nan")


def label_share_columns(by: Sequence[str], labels: Sequence[str], scheme: LabelScheme) -> list[str]:
    """Column order of `label_shares` (the report renders these)."""
    shares = [f"share_{lab}{end}" for lab in scheme.labelled for end in ("", "_low", "_high")]
    target = ["parity_distance", "parity_distance_low", "parity_distance_high", "reference", "reference_distance",
              "reference_distance_low", "reference_distance_high"] if scheme.target else []
    return [*by, "metric", "n_generated", "n_labelled", "coverage", "n_prompts", "n_seeds", "n_clusters",
            *(f"count_{lab}" for lab in labels), *shares, *target]


def label_shares(
    frame: pd.DataFrame,
    metric: str,
    group_by: Sequence[str] | None = None,
    *,
    scheme: LabelScheme | None = None,
    reference_column: str | None = None,
    reference_scale: float = 1.0,
    cluster: str | None = None,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> pd.DataFrame:
    """Per group: a count of every label, coverage, and each labelled label's share with its CI.

    Args:
        frame: the per_image frame (other metrics' rows are ignored).
        metric: e.g. "perceived_gender" or "skin_tone" (their schemes are built in; others are inferred).
        group_by: grouping columns; default `default_group_by`.
        scheme: overrides the metric's label scheme.
        reference_column: a column holding the reference share of the target label, e.g. BLS_REFERENCE[0].
        reference_scale: multiplies the reference column (0.01 for a percentage).
        cluster: cluster column of the interval; default prompt when a group pools prompts, else seed.
        confidence: the intervals' level; n_resamples and seed are kept for callers and no longer used.

    Returns:
        One row per group, columns `label_share_columns`. Shares are among labelled images; a group with none
        labelled has NaN shares and coverage 0. With a target label, parity_distance = |share - 0.5| and
        reference_distance = |share - reference|; their low/high are the range of the distance over the
        share's interval (conservative, and 0 when the interval contains the parity or reference point).
    """
    rows = _metric_rows(frame, metric)
    scheme = scheme or scheme_for(metric, rows)
    labels = _all_labels(scheme, rows)
    by = list(group_by) if group_by is not None else default_group_by(rows)
    boot = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    records = []
    for coords, group in groups(rows, by):
        record = {**coords, "metric": metric, **_share_record(group, scheme, labels, cluster, boot)}
        if scheme.target:
            record.update(_target_distances(record, scheme.target, _reference(group, reference_column, reference_scale)))
        records.append(record)
    return pd.DataFrame(records, columns=label_share_columns(by, labels, scheme))


def _share_record(group: pd.DataFrame, scheme: LabelScheme, labels: Sequence[str], cluster: str | None,
                  boot: dict[str, Any]) -> dict[str, Any]:
    """Counts, coverage and the share of each labelled label, with its Korn-Graubard interval, for one group."""
    answered = group["label"].isin(scheme.labelled).to_numpy()
    clusters = _cluster_ids(group, cluster)
    counts = group["label"].value_counts()
    record: dict[str, Any] = {"n_generated": len(group), "n_labelled": int(answered.sum()),
                              "coverage": answered.sum() / len(group), "n_prompts": group["prompt"].nunique(),
                              "n_seeds": group["seed"].nunique(), "n_clusters": len(set(clusters[answered]))}
    record.update({f"count_{lab}": int(counts.get(lab, 0)) for lab in labels})
    for lab in scheme.labelled:
        indicator = np.where(answered, group["label"].to_numpy() == lab, np.nan).astype(float)
        est = share_interval(indicator, clusters, confidence=boot["confidence"])
        record.update({f"share_{lab}": est.mean, f"share_{lab}_low": est.low, f"share_{lab}_high": est.high})
    return record


def _target_distances(record: dict[str, Any], target: str, ref: float) -> dict[str, float]:
    """Parity and reference distances of the target label's share, with their intervals."""
    share = (record[f"share_{target}"], record[f"share_{target}_low"], record[f"share_{target}_high"])
    parity = _distance(*share, 0.5)
    distance = _distance(*share, ref)
    return {"parity_distance": parity[0], "parity_distance_low": parity[1], "parity_distance_high": parity[2],
            "reference": ref, "reference_distance": distance[0], "reference_distance_low": distance[1],
            "reference_distance_high": distance[2]}


def normalised_entropy(counts: np.ndarray) -> np.ndarray:
    """Shannon entropy of count rows (..., k) divided by log k: 1 for uniform, 0 for a single category.

    The plug-in estimate is biased low for small samples: with n < k images it cannot exceed log n / log k.
    """
    counts = np.asarray(counts, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(stats.entropy(counts, axis=-1)) / np.log(counts.shape[-1])


def kl_from_uniform(counts: np.ndarray) -> np.ndarray:
    """KL(p || uniform) in nats of count rows (..., k): 0 for uniform, log k for a single category."""
    counts = np.asarray(counts, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(stats.entropy(counts, np.ones(counts.shape[-1]), axis=-1))


MONK_COLUMNS_TAIL = ["metric", "n_generated", "n_labelled", "n_unknown", "n_other", "coverage", "n_prompts",
                     "n_seeds", *(f"share_{tone}" for tone in MONK_TONES), "entropy", "kl_uniform"]
"""Columns of `monk_distribution` after the group columns (the report renders these)."""


def monk_distribution(
    frame: pd.DataFrame,
    group_by: Sequence[str] | None = None,
    *,
    metric: str = "skin_tone",
) -> pd.DataFrame:
    """Per group: the 10-tone Monk distribution among labelled images, its normalised entropy and KL from uniform.

    n_unknown counts `unknown` (too few skin pixels, or no face); n_other counts any other non-tone label or
    a missing one. Entropy is H / log 10 (scipy.stats.entropy, natural log) and KL is in nats. They carry no
    interval on purpose: the plug-in entropy is biased low for small n, so a percentile bootstrap of it sits
    below the estimate and can exclude it (a uniform 20-image sample gives [0.77, 0.97] around 1.0); n and
    coverage stand beside them instead; per-tone shares with intervals come from
    `label_shares(frame, "skin_tone")`. Uniform is a reference for spread, not a claim about any population's
    skin tones.
    """
    rows = _metric_rows(frame, metric)
    by = list(group_by) if group_by is not None else default_group_by(rows)
    records = []
    for coords, group in groups(rows, by):
        tones = group["label"].to_numpy()
        counts = (tones[:, None] == np.array(MONK_TONES)[None, :]).sum(axis=0).astype(float)
        n_labelled = int(counts.sum())
        n_unknown = int((tones == "unknown").sum())
        record: dict[str, object] = {**coords, "metric": metric, "n_generated": len(group),
                                     "n_labelled": n_labelled, "n_unknown": n_unknown,
                                     "n_other": len(group) - n_labelled - n_unknown,
                                     "coverage": n_labelled / len(group), "n_prompts": group["prompt"].nunique(),
                                     "n_seeds": group["seed"].nunique()}
        shares = counts / n_labelled if n_labelled else np.full(len(MONK_TONES), np.nan)
        record.update({f"share_{tone}": float(s) for tone, s in zip(MONK_TONES, shares, strict=True)})
        record["entropy"] = float(normalised_entropy(counts)) if n_labelled else float("nan")
        record["kl_uniform"] = float(kl_from_uniform(counts)) if n_labelled else float("nan")
        records.append(record)
    return pd.DataFrame(records, columns=[*by, *MONK_COLUMNS_TAIL])


DELTA_COLUMNS_HEAD = ["probe", "model", "steps", "baseline", "baseline_steps"]
DELTA_COLUMNS_TAIL = ["metric", "label", "subject_share", "baseline_share", "delta", "low", "high", "n_pairs",
                      "n_subject_labelled", "n_baseline_labelled", "n_clusters", "excludes_zero"]
"""`paired_share_deltas` columns: head, then the group-by variables, then tail (the report renders these)."""


def paired_share_deltas(
    frame: pd.DataFrame,
    subject: str,
    metric: str = "perceived_gender",
    label: str = "feminine",
    group_by: Sequence[str] | None = None,
    *,
    scheme: LabelScheme | None = None,
    cluster: str | None = None,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> pd.DataFrame:
    """Subject minus each baseline in the share of `label` among labelled images, on paired images.

    Images pair by `probe.analyse.pairing.ITEM` where both models have one, for every pair of
    step counts; each model's share is taken among its own labelled images of the pairs (so, with every image
    paired, delta equals the difference of `label_shares`). The CI resamples clusters of pairs jointly, which
    keeps the pairing: seeds within one prompt, prompts when a group pools several.

    Args:
        group_by: prompt variables to split by; default every var_<name> column (use [] to pool a probe).
    """
    rows = _metric_rows(frame, metric)
    scheme = scheme or scheme_for(metric, rows)
    if label not in scheme.labelled:
        raise ValueError(f"label {label!r} is not one of the labelled labels {scheme.labelled} of {metric}")
    rows["_lab"] = rows["label"].isin(scheme.labelled).astype(float)
    rows["_pos"] = (rows["label"] == label).astype(float)
    by = list(group_by) if group_by is not None else sorted(c for c in rows.columns if c.startswith("var_"))
    mine = rows[rows["model"] == subject]
    records = []
    for baseline in sorted(m for m in rows["model"].unique() if m != subject):
        theirs = rows.loc[rows["model"] == baseline, [*item_columns(rows), "steps", "_lab", "_pos"]]
        merged = pair(mine, theirs)
        for coords, group in merged.groupby(["probe", "steps", "steps_b", *by], dropna=False, sort=True):
            head = _coords(["probe", "steps", "baseline_steps", *by], coords)
            record = {**head, "model": subject, "baseline": baseline, "metric": metric, "label": label}
            record.update(_paired_share(group, cluster, n_resamples, confidence, seed))
            records.append(record)
    return pd.DataFrame(records, columns=[*DELTA_COLUMNS_HEAD, *by, *DELTA_COLUMNS_TAIL])


def _paired_share(group: pd.DataFrame, cluster: str | None, n_resamples: int, confidence: float,
                  seed: int) -> dict[str, object]:
    """Share difference with its MOVER interval from per-cluster (subject positives, labelled, baseline ...) sums."""
    clusters = _cluster_ids(group, cluster)
    _, inverse = np.unique(clusters, return_inverse=True)
    values = group[["_pos", "_lab", "_pos_b", "_lab_b"]].to_numpy(dtype=float)
    per_cluster = np.zeros((inverse.max() + 1, 4))
    np.add.at(per_cluster, inverse, values)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = per_cluster.sum(axis=0)
        subject_share, baseline_share = total[0] / total[1], total[2] / total[3]
    delta, low, high = share_difference(*per_cluster.T, confidence=confidence)
    return {"subject_share": float(subject_share), "baseline_share": float(baseline_share), "delta": delta,
            "low": low, "high": high, "n_pairs": len(group), "n_subject_labelled": int(total[1]),
            "n_baseline_labelled": int(total[3]), "n_clusters": len(per_cluster),
            "excludes_zero": bool(low > 0 or high < 0)}
