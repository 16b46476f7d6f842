"""Comparison of two runs (`--baseline OTHER_RUN`): the same aggregates side by side, with differences.

Rows are matched by probe, model, steps, strength, metric (and reference / group for set metrics). The two
runs' images are not paired, so a difference is marked only when the two 95% intervals do not overlap.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from probe.report.data import RunData
from probe.report.fmt import ARROWS, better, direction, fmt, fmt_ci, fmt_coord, fmt_signed, missing
from probe.store.tables import group_label, group_of

MATCH = ["probe", "model", "steps", "strength", "series", "reference", "group"]


def _keyed(aggregates: pd.DataFrame) -> pd.DataFrame:
    """Aggregates with the match columns as strings (NaN-free, so rows with no strength still match)."""
    frame = aggregates.copy()
    frame["group"] = [group_label(group_of(row)) for _, row in frame.iterrows()]  # the var_* columns, as one key
    for column in MATCH:
        if column not in frame:
            frame[column] = None
        frame[f"k_{column}"] = [fmt_coord(v) if column in ("steps", "strength") else ("" if missing(v) else str(v))
                                for v in frame[column]]
    return frame


def compare_runs(current: RunData, baseline: RunData) -> dict[str, Any]:
    """Per probe, rows of (this run, baseline run, difference) for every aggregate found in both runs."""
    keys = [f"k_{c}" for c in MATCH]
    mine, theirs = _keyed(current.aggregates), _keyed(baseline.aggregates)
    merged = mine.merge(theirs[[*keys, "mean", "low", "high", "n_images"]], on=keys, suffixes=("", "_b"), how="inner")
    order = {m: i for i, m in enumerate(current.models)}
    probe_order = {p: i for i, p in enumerate(current.probes)}
    probes: dict[str, list[dict[str, Any]]] = {}
    for row in merged.itertuples():
        delta = float(row.mean) - float(row.mean_b) if not (missing(row.mean) or missing(row.mean_b)) else None
        separated = not any(missing(v) for v in (row.low, row.high, row.low_b, row.high_b)) and (
            float(row.low) > float(row.high_b) or float(row.high) < float(row.low_b))
        probes.setdefault(str(row.probe), []).append({
            "sort": (order.get(row.model, 99), str(row.model), row.k_steps, row.k_strength, row.series, row.k_group),
            "model": row.model, "steps": row.k_steps, "strength": row.k_strength, "metric": row.series,
            "arrow": ARROWS[direction(row.metric)], "detail": " ".join(x for x in (row.k_reference, row.k_group) if x),
            "this": fmt(row.mean), "this_ci": fmt_ci(row.low, row.high), "other": fmt(row.mean_b),
            "other_ci": fmt_ci(row.low_b, row.high_b), "delta": fmt_signed(delta), "sig": separated,
            "better": better(row.metric, delta) if separated else None,
            "data": "|".join([str(row.probe), *(getattr(row, k) for k in keys[1:])]),
        })
    only_here = len(mine) - len(merged)
    only_there = len(theirs) - len(merged)
    return {"name": baseline.name, "suite": baseline.manifest.get("suite_name"),
            "started_at": baseline.manifest.get("started_at"),
            "probes": [{"probe": p, "rows": sorted(probes[p], key=lambda r: r["sort"])}
                       for p in sorted(probes, key=lambda p: (probe_order.get(p, 99), p))],
            "only_here": only_here, "only_there": only_there}
