"""Aggregates of a run: per probe x model x steps x strength means with prompt-clustered CIs, and paired deltas.

A 0/1 output (a safety flag, an exact match: `binary` in its catalog record) is a share: its interval is
Korn-Graubard's and its deltas' MOVER's (probe.stats.proportion); every other mean has the bootstrap's.

Reads only the run's tables (jobs and scores), never a model. The report, the notebooks API and
`probe check` all call these functions, so they show the same numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from probe.analyse.pairing import pair
from probe.spec.metric_catalog import is_binary
from probe.stats.proportion import delta_estimate, mean_estimate
from probe.store.tables import expand_groups, group_columns, group_of, score_ids

GRID = ["probe", "model", "steps", "strength"]
#: aggregates.parquet's fixed columns; a set row's group adds its `var_<name>` columns, as in scores.parquet.
AGGREGATE_COLUMNS = [*GRID, "series", "metric", "kind", "mean", "low", "high", "n_prompts", "n_images", "n_truncated",
                     "reference"]
DELTA_COLUMNS = ["probe", "series", "metric", "model", "steps", "baseline", "baseline_steps", "strength", "mean", "low",
                 "high", "n_pairs", "n_prompts", "excludes_zero"]


def with_series(frame: pd.DataFrame) -> pd.DataFrame:
    """Aggregate tables of older runs, upgraded on read: a label in `metric` and no `series` (schema 1), a set
    row's group as a JSON string in `group` (schema ≤ 2) rather than `var_*` columns."""
    frame = expand_groups(frame)
    if "series" in frame.columns or "metric" not in frame.columns:
        return frame
    frame = frame.copy()
    frame["series"] = frame["metric"]
    frame["metric"] = frame["metric"].astype(str).str.split("[", n=1).str[0]
    return frame


def latest_config(scores: pd.DataFrame) -> pd.DataFrame:
    """Keep, per series, only rows of the configuration written last (a re-score with a new CLIP wins)."""
    if scores.empty:
        return scores
    last = scores.groupby("series")["config_id"].last()
    return scores[scores["config_id"] == scores["series"].map(last)]


def per_image(jobs: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """Per-image scores joined to their jobs: one row per (job, metric) with value, label and text."""
    rows = latest_config(scores)
    rows = rows[rows["key"].notna()][["series", "metric", "score_id", "value", "label", "text", "extra"]]
    usable = jobs[jobs["image"].notna()]
    usable = usable.assign(score_id=score_ids(usable))  # image + prompt + target text: what each row was scored as
    return usable.merge(rows.rename(columns={"text": "score_text"}), on="score_id", how="inner")


def aggregate(jobs: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """Means with 95% CIs (bootstrap over prompts) for per-image metrics, plus the set-metric rows."""
    records = []
    frame = per_image(jobs, scores)
    frame = frame[frame["value"].notna()]
    for coords, group in frame.groupby([*GRID, "series"], dropna=False, sort=True):
        est = mean_estimate(group["value"].to_numpy(), group["prompt"].to_numpy(),
                            binary=is_binary(str(group["metric"].iloc[0])))
        truncated = sum(isinstance(e, dict) and e.get("truncated") is True for e in group["extra"])
        records.append({**dict(zip([*GRID, "series"], coords, strict=True)), "metric": group["metric"].iloc[0],
                        "kind": "image", "mean": est.mean,
                        "low": est.low, "high": est.high, "n_prompts": est.n_clusters, "n_images": est.n,
                        "n_truncated": truncated, "reference": None})
    sets = latest_config(scores)
    sets = sets[sets["key"].isna()] if not sets.empty else sets
    for _, row in sets.iterrows():
        group = group_of(row)
        records.append({"probe": row["probe"], "model": row["model"], "steps": row["steps"], "strength": row["strength"],
                        "series": row["series"], "metric": row["metric"], "kind": "set", "mean": row["value"], "low": row["low"],
                        "high": row["high"],
                        "n_prompts": _n_prompts(jobs, row, group), "n_images": row["n"], "n_truncated": None,
                        "reference": row["reference"], **group})
    out = pd.DataFrame(records, columns=[*AGGREGATE_COLUMNS, *group_columns(sets)])
    out["steps"] = out["steps"].astype("Int64")  # set rows arrive as floats; steps are counts
    return out


def _same(column: pd.Series, value: object) -> pd.Series:
    """Equality that treats missing as equal to missing (steps/strength are NaN for external images)."""
    return column.isna() if pd.isna(value) else column == value


def _n_prompts(jobs: pd.DataFrame, row: Any, group: dict[str, Any]) -> int:
    """Distinct prompts behind a set-metric row (its probe, model, steps, strength and group)."""
    mask = (jobs["probe"] == row["probe"]) & (jobs["model"] == row["model"])
    mask &= _same(jobs["steps"], row["steps"]) & _same(jobs["strength"], row["strength"])
    for column, value in group.items():
        mask &= jobs[column] == value
    return int(jobs.loc[mask, "prompt"].nunique())


def paired_deltas(jobs: pd.DataFrame, scores: pd.DataFrame, subject: str) -> pd.DataFrame:
    """Subject minus each baseline per series, paired by `probe.analyse.pairing.ITEM`, CI by prompt."""
    frame = per_image(jobs, scores)
    frame = frame[frame["value"].notna()]
    mine = frame[frame["model"] == subject]
    records = []
    for baseline in [m for m in frame["model"].unique() if m != subject]:
        merged = pair(mine, frame[frame["model"] == baseline], extra=["series", "metric"])
        for coords, group in merged.groupby(["probe", "series", "metric", "steps", "steps_b", "strength"], dropna=False):
            probe, series, metric, steps, steps_b, strength = coords
            est = delta_estimate(group["value"].to_numpy(), group["value_b"].to_numpy(), group["prompt"].to_numpy(),
                                 binary=is_binary(str(metric)))
            records.append({"probe": probe, "series": series, "metric": metric, "model": subject, "steps": steps,
                            "baseline": baseline,
                            "baseline_steps": steps_b, "strength": strength, "mean": est.mean, "low": est.low,
                            "high": est.high, "n_pairs": est.n, "n_prompts": est.n_clusters,
                            "excludes_zero": bool(not np.isnan(est.low) and est.excludes_zero)})
    return pd.DataFrame(records, columns=DELTA_COLUMNS)
