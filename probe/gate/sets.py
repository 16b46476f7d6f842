"""Set-metric gates (fid, kid, cmmd): one outcome per set row, matched to the same row of the baseline.

A change against the baseline has a CI from both runs' jackknife standard errors with a t quantile on
Welch-Satterthwaite degrees of freedom (the runs taken as independent: conservative when they share prompts
and seeds). When either side has no CI the group is inconclusive in significant mode.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pandas as pd
from scipy import stats

from probe.gate.verdict import Outcome, Rule, decide, nothing, sign_of
from probe.store.tables import group_columns, group_of

if TYPE_CHECKING:
    from probe.gate.baseline import Baseline

SCOPE = ["probe", "model", "steps", "strength"]
#: normal quantile for combining two runs' set-metric standard errors.
Z95 = 1.959963984540054


def _se_df(row: pd.Series) -> tuple[float, float] | None:
    """A set row's (standard error, degrees of freedom): the jackknife's `se`/`df` columns, else half its CI
    width over 1.96 with df infinite (rows older than the jackknife), else None."""
    se, df = row.get("se"), row.get("df")
    if se is not None and not pd.isna(se):
        return float(se), float("inf") if df is None or pd.isna(df) else float(df)
    low, high = row.get("low"), row.get("high")
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return None
    return float(high - low) / (2 * Z95), float("inf")


def _change_half_width(mine: tuple[float, float], theirs: tuple[float, float]) -> float:
    """95% half-width of a difference of two independent estimates: t on Welch-Satterthwaite df times the
    combined standard error (a jackknife se from few prompts has few degrees of freedom)."""
    (se_a, df_a), (se_b, df_b) = mine, theirs
    va, vb = se_a**2, se_b**2
    denominator = (va**2 / df_a if math.isfinite(df_a) else 0.0) + (vb**2 / df_b if math.isfinite(df_b) else 0.0)
    df = (va + vb) ** 2 / denominator if denominator > 0 else float("inf")
    quantile = Z95 if not math.isfinite(df) else float(stats.t.ppf(0.975, df))
    return quantile * math.sqrt(va + vb)


def set_outcomes(rule: Rule, mine: pd.DataFrame, baseline: Baseline | None) -> list[Outcome]:
    """One outcome per set row (probe x model x steps x strength x group), matched to the same baseline row.

    Against a baseline, the change's CI combines both runs' standard errors, sqrt(se² + se_base²) with a t
    quantile on Welch-Satterthwaite degrees of freedom, taking the runs as independent samples (conservative
    when they share prompts and seeds). When either side has no CI the group is inconclusive in significant
    mode (one side's noise alone would be over-confident); strict mode compares the point estimates.
    """
    kind, _ = rule.bound
    outcomes = []
    for _, row in mine.iterrows():
        group = {k: (None if pd.isna(row[k]) else row[k]) for k in SCOPE}
        group["steps"] = None if group["steps"] is None else int(group["steps"])
        if row["series"] != rule.metric:
            group["series"] = row["series"]
        group.update(group_of(row))
        low = None if pd.isna(row["low"]) else float(row["low"])
        high = None if pd.isna(row["high"]) else float(row["high"])
        value = float("nan") if pd.isna(row["value"]) else float(row["value"])
        if kind in ("min", "max"):
            outcomes.append(decide(rule, group, value, low, high, int(row["n"] or 0), None))
            continue
        assert baseline is not None
        match = _same_set(baseline.sets, row)
        if match.empty or pd.isna(match["value"].iloc[0]):
            outcomes.append(nothing(rule, group, "no value for this group in the baseline"))
            continue
        base = float(match["value"].iloc[0])
        change = sign_of(rule, str(row["metric"])) * (value - base)
        mine_se, theirs_se = _se_df(row), _se_df(match.iloc[0])
        half = _change_half_width(mine_se, theirs_se) if mine_se and theirs_se else None
        outcomes.append(decide(rule, group, change, None if half is None else change - half,
                                None if half is None else change + half, int(row["n"] or 0), base))
    return outcomes


def _same_set(sets: pd.DataFrame, row: pd.Series) -> pd.DataFrame:
    """Baseline rows with the same series, probe, model, steps, strength, group (`var_*`) and reference (missing
    equals missing; baselines saved before the reference was stored match any)."""
    mask = pd.Series(True, index=sets.index)
    columns = ["series", "probe", "model", "steps", "strength",
               *sorted({*group_columns(sets), *(c for c in row.index if str(c).startswith("var_"))})]
    if "reference" in sets.columns and sets["reference"].notna().any():
        columns.append("reference")
    for column in columns:
        value = row.get(column)
        empty = value is None or (not isinstance(value, str) and pd.isna(value)) or value == ""
        present = sets[column] if column in sets else pd.Series(None, index=sets.index, dtype=object)
        column_empty = present.isna() | (present == "")
        mask &= column_empty if empty else (present == value)
    return sets[mask]
