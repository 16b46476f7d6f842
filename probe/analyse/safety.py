"""Safety flags as labels: which images a detector flagged, and how often two detectors disagree.

A flag is a per-image score row labelled "flagged" (nsfw, sd_safety, or any metric that labels its rows so);
its value is 1 for flagged and 0 for safe, so the ordinary aggregates are flag rates with prompt-clustered
intervals and the ordinary paired deltas compare them between models. A flagged image is never dropped: it stays
in every table and denominator, and the report only blurs it.
"""

from __future__ import annotations

from itertools import combinations

import pandas as pd

from probe.analyse.aggregate import per_image

FLAGGED = "flagged"
SAFE = "safe"
DISAGREEMENT_COLUMNS = ["probe", "model", "steps", "detector", "other", "images", "both", "only_detector",
                        "only_other", "disagreement"]


DETECTORS = ("nsfw", "sd_safety")


def flag_rows(jobs: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """Per-image rows of flagging metrics, joined to their jobs: nsfw and sd_safety, and any other series whose
    rows are all labelled flagged or safe with at least one flagged."""
    if scores.empty or "label" not in scores.columns:
        return pd.DataFrame(columns=["key", "series", "metric", "probe", "model", "steps", "label", "value"])
    frame = per_image(jobs, scores)
    flags = [series for series, group in frame.groupby("series")
             if group["metric"].iloc[0] in DETECTORS
             or (set(group["label"].dropna()) <= {FLAGGED, SAFE} and (group["label"] == FLAGGED).any())]
    return frame[frame["series"].isin(flags)]


def flagged_keys(jobs: pd.DataFrame, scores: pd.DataFrame) -> dict[str, list[str]]:
    """Image key -> the detectors (series) that flagged it."""
    rows = flag_rows(jobs, scores)
    rows = rows[rows["label"] == FLAGGED]
    return {str(key): sorted(set(group["series"])) for key, group in rows.groupby("key")}


def disagreement(jobs: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """For every two detectors, per probe x model x steps: images both scored, flagged by both, by one only."""
    rows = flag_rows(jobs, scores)
    if rows.empty:
        return pd.DataFrame(columns=DISAGREEMENT_COLUMNS)
    wide = rows.pivot_table(index=["probe", "model", "steps", "key"], columns="series", values="value",
                            aggfunc="first", dropna=False).reset_index()
    detectors = sorted(set(rows["series"]))
    out = []
    for a, b in combinations(detectors, 2):
        both_scored = wide[wide[a].notna() & wide[b].notna()]
        for (probe, model, steps), group in both_scored.groupby(["probe", "model", "steps"], dropna=False):
            fa, fb = group[a] == 1, group[b] == 1
            out.append({"probe": probe, "model": model, "steps": steps, "detector": a, "other": b,
                        "images": len(group), "both": int((fa & fb).sum()), "only_detector": int((fa & ~fb).sum()),
                        "only_other": int((~fa & fb).sum()), "disagreement": float((fa != fb).mean())})
    return pd.DataFrame(out, columns=DISAGREEMENT_COLUMNS)
