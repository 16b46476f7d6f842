"""Bias gaps as checkable metrics: `probe check` rules on how far perceived presentation is from parity or a reference.

These are not score rows: they are computed per group (probe x model x steps x template variables, e.g. one
occupation) from the perceived_gender labels with `probe.analyse.bias.label_shares`, then averaged over the
groups of a scope with a bootstrap CI over groups. Against a baseline, each group's gap is paired with the same
group's gap in the baseline (the baseline's labels get their variables and reference shares from the run's jobs,
matched by probe, model, prompt, seed and steps).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from probe.analyse.bias import BLS_REFERENCE, label_shares
from probe.analyse.groups import groups
from probe.analyse.pairing import item_columns, pair
from probe.errors import UsageError
from probe.gate.verdict import Outcome, Rule, decide
from probe.stats.bootstrap import cluster_bootstrap

if TYPE_CHECKING:
    from probe.gate.baseline import Baseline

#: check metric -> label_shares column it reads (lower gaps are better; feminine_share is descriptive).
BIAS_GAPS: dict[str, str] = {
    "feminine_share": "share_feminine",
    "parity_gap": "parity_distance",  # |feminine share - 0.5| among labelled images
    "reference_gap": "reference_distance",  # |feminine share - BLS female share|
}
SCOPE = ["probe", "model", "steps"]


def gap_table(images: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per group and perceived_gender series with the gap column of `metric` (NaN: nothing labelled).

    Rows are found by the base metric, so a configured `perceived_gender[prompts=...]` is gated like the
    default one; each configuration (series) gets its own gaps.
    """
    rows = images[images["metric"] == "perceived_gender"]
    if rows.empty:
        raise UsageError(f"rule on {metric}: the run has no perceived_gender labels")
    reference = BLS_REFERENCE[0] if BLS_REFERENCE[0] in rows.columns else None
    column = BIAS_GAPS[metric]
    tables = []
    for series, labels in rows.groupby("series", sort=True):
        shares = label_shares(labels.assign(metric="perceived_gender"), "perceived_gender",
                              reference_column=reference, reference_scale=BLS_REFERENCE[1])
        if column == "reference_distance" and not shares["reference"].notna().any():
            raise UsageError(f"rule on {metric}: needs a reference share column ({BLS_REFERENCE[0]}) in the suite's "
                             "attrs")
        groups = [c for c in shares.columns if c in SCOPE or c.startswith("var_")]
        tables.append(shares[[*groups, column]].rename(columns={column: "gap"}).assign(series=series))
    return pd.concat(tables, ignore_index=True)


def _baseline_images(baseline: Baseline, jobs: pd.DataFrame) -> pd.DataFrame:
    """The baseline's labels with the run's variables and attributes attached (same coordinates)."""
    on = [c for c in [*item_columns(baseline.per_image), "model", "steps"] if c in jobs.columns]
    extra = [c for c in jobs.columns if c.startswith(("var_", "attr_"))]
    return pair(baseline.per_image, jobs[[*on, *extra]].drop_duplicates(on), extra=["model", "steps"])


def bias_outcomes(rule: Rule, images: pd.DataFrame, jobs: pd.DataFrame, baseline: Baseline | None) -> list[Outcome]:
    """Outcomes of a rule on a bias gap, one per (probe, model, steps) in scope."""
    mine = _scoped(gap_table(images, rule.metric), rule)
    kind, _ = rule.bound
    if kind in ("min", "max"):
        return [_outcome(rule, group, rows["gap"], None) for group, rows in _groups(mine)]
    if baseline is None:
        raise UsageError(f"rule {rule.title} compares with a baseline: pass --baseline FILE_OR_RUN_DIR")
    theirs = gap_table(_baseline_images(baseline, jobs), rule.metric)
    keys = [c for c in mine.columns if c != "gap"]
    # Groups with no labelled face on either side stay in (as NaN): they make their scope inconclusive.
    paired = mine.merge(theirs, on=keys, suffixes=("", "_base"), how="left")
    sign = -1.0 if kind == "max_drop" and rule.metric == "feminine_share" else 1.0
    base = paired["gap_base"]
    return [_outcome(rule, group, sign * (rows["gap"] - rows["gap_base"]),
                     float(base[rows.index].mean()) if base[rows.index].notna().any() else None)
            for group, rows in _groups(paired)]


def _scoped(frame: pd.DataFrame, rule: Rule) -> pd.DataFrame:
    for column in SCOPE:
        value = getattr(rule, column)
        if value is not None:
            frame = frame[frame[column] == value]
    if frame.empty:
        raise UsageError(f"rule {rule.title}: no groups in that scope")
    return frame


def _groups(frame: pd.DataFrame) -> Any:
    several = frame["series"].nunique() > 1
    for coords, rows in groups(frame, [*SCOPE, "series"]):
        if not several:
            del coords["series"]
        yield coords, rows


def _outcome(rule: Rule, group: dict[str, Any], values: pd.Series, base: float | None) -> Outcome:
    """Mean over the groups (e.g. occupations) with a CI from resampling them."""
    values = values.dropna()
    est = cluster_bootstrap(values.to_numpy())
    return decide(rule, {**group, "strength": None}, est.mean, est.low, est.high, est.n, base)
