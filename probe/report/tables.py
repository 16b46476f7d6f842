"""Summary tables: per probe, model x steps (x strength) rows with every metric's mean, CI and sample sizes,
plus the subject's paired deltas against each baseline. Frames in, plain dicts out (templates only format).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from probe.report.data import RunData
from probe.report.fmt import ARROWS, DASH, better, description, direction, fmt, fmt_ci, fmt_coord, fmt_count, fmt_signed, missing
from probe.store.tables import group_columns, group_label, group_of

COORDS = ["model", "steps", "strength"]


def column_key(metric: str, reference: Any) -> str:
    """A summary column: the metric, plus its reference for set metrics (cmmd vs tiny-cfg)."""
    return metric if missing(reference) or not reference else f"{metric}|{reference}"


def cell_key(probe: str, model: str, steps: Any, strength: Any, column: str) -> str:
    """`data-cell` attribute of a summary cell: how tests find the number of one aggregate row."""
    return "|".join([probe, model, fmt_coord(steps), fmt_coord(strength), column])


def _reference_label(reference: str) -> str:
    kind, _, name = str(reference).partition(":")
    return f"vs {name}" if kind in ("model", "folder") else f"vs {reference}"


def _column(series: str, metric: str, reference: Any, kind: str) -> dict[str, Any]:
    """A column shows a series (its label) and takes its arrow and description from the base metric."""
    way = direction(metric)
    return {"key": column_key(series, reference), "metric": series, "arrow": ARROWS[way], "direction": way,
            "base": metric, "description": description(metric), "kind": kind,
            "reference": None if missing(reference) else _reference_label(reference)}


def _order(models: list[str]) -> dict[str, int]:
    return {m: i for i, m in enumerate(models)}


def _sort_key(order: dict[str, int], model: Any, steps: Any, strength: Any) -> tuple[Any, ...]:
    return (order.get(model, len(order)), str(model), -1 if missing(steps) else float(steps),
            -1 if missing(strength) else float(strength))


def job_cells(jobs: pd.DataFrame, probe: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Per (model, steps, strength) of a probe: prompts and images generated, seconds per image."""
    rows = jobs[(jobs["probe"] == probe) & jobs["image"].notna()]
    cells: dict[tuple[Any, ...], dict[str, Any]] = {}
    for coords, group in rows.groupby(COORDS, dropna=False, sort=False):
        seconds = pd.to_numeric(group["seconds"], errors="coerce").dropna()
        cells[_norm(coords)] = {"n_prompts": int(group["prompt"].nunique()), "n_images": len(group),
                                "seconds": float(seconds.mean()) if len(seconds) else None}
    return cells


def _norm(coords: tuple[Any, ...]) -> tuple[Any, ...]:
    """Coordinates as hashable, NaN-free keys (NaN != NaN would split rows)."""
    return tuple(None if missing(c) else (float(c) if isinstance(c, int | float) else c) for c in coords)


def summary(data: RunData, probe: str) -> dict[str, Any]:
    """The summary table of one probe (ungrouped aggregates) and its grouped set-metric rows."""
    agg = data.aggregates[data.aggregates["probe"] == probe]
    groups = group_columns(agg)
    grouped = agg[agg[groups].notna().any(axis=1)] if groups else agg.iloc[0:0]
    agg = agg.drop(grouped.index)
    columns: dict[str, dict[str, Any]] = {}
    for row in agg.itertuples():
        reference = row.reference if row.kind == "set" else None
        columns.setdefault(column_key(row.series, reference), _column(row.series, row.metric, reference, row.kind))
    counts = job_cells(data.jobs, probe)
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for coords, info in counts.items():
        rows[coords] = _row(coords, info)
    for row in agg.itertuples():
        coords = _norm((row.model, row.steps, row.strength))
        entry = rows.setdefault(coords, _row(coords, {"n_prompts": row.n_prompts, "n_images": row.n_images,
                                                      "seconds": None}))
        key = column_key(row.series, row.reference if row.kind == "set" else None)
        note = "" if row.n_images == entry["n_images_raw"] else f"n={fmt_count(row.n_images)}"
        entry["cells"][key] = {"mean": fmt(row.mean), "ci": fmt_ci(row.low, row.high), "note": note,
                               "data": cell_key(probe, row.model, row.steps, row.strength, key)}
    order = _order(data.models)
    ordered = [rows[k] for k in sorted(rows, key=lambda k: _sort_key(order, *k))]
    return {"columns": sorted(columns.values(), key=lambda c: (c["kind"] == "set", c["metric"], c["key"])),
            "rows": ordered, "has_strength": any(r["strength"] for r in ordered),
            "grouped": _grouped_rows(grouped, order)}


def _row(coords: tuple[Any, ...], info: dict[str, Any]) -> dict[str, Any]:
    model, steps, strength = coords
    seconds = info.get("seconds")
    return {"model": model, "steps": fmt_coord(steps), "strength": fmt_coord(strength),
            "n_prompts": fmt_count(info["n_prompts"]), "n_images": fmt_count(info["n_images"]),
            "n_images_raw": info["n_images"],
            "seconds": DASH if seconds is None else f"{seconds:.3g} s", "cells": {}}



def _grouped_rows(grouped: pd.DataFrame, order: dict[str, int]) -> list[dict[str, Any]]:
    """Set metrics computed per group (group_by variables): one line each."""
    rows = []
    for _, row in grouped.iterrows():
        rows.append({"sort": _sort_key(order, row["model"], row["steps"], row["strength"]), "model": row["model"],
                     "steps": fmt_coord(row["steps"]), "strength": fmt_coord(row["strength"]), "metric": row["series"],
                     "arrow": ARROWS[direction(row["metric"])], "group": group_label(group_of(row)),
                     "reference": row["reference"],
                     "mean": fmt(row["mean"]), "ci": fmt_ci(row["low"], row["high"]), "n_images": fmt_count(row["n_images"])})
    return sorted(rows, key=lambda r: (r["metric"], r["group"], r["sort"]))


def paired(data: RunData, probe: str) -> dict[str, Any]:
    """The subject's paired deltas (subject - baseline, same prompt and seed) per metric, CI by prompt."""
    deltas = data.deltas[data.deltas["probe"] == probe] if not data.deltas.empty else data.deltas
    if deltas.empty:
        return {"columns": [], "rows": []}
    series = dict(sorted(zip(deltas["series"], deltas["metric"], strict=True)))
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in deltas.itertuples():
        key = (row.model, _num(row.steps), row.baseline, _num(row.baseline_steps), _num(row.strength))
        entry = rows.setdefault(key, {"model": row.model, "steps": fmt_coord(row.steps), "baseline": row.baseline,
                                      "baseline_steps": fmt_coord(row.baseline_steps),
                                      "strength": fmt_coord(row.strength), "n_pairs": int(row.n_pairs),
                                      "n_prompts": int(row.n_prompts), "cells": {}})
        significant = bool(row.excludes_zero)
        entry["cells"][row.series] = {"mean": fmt_signed(row.mean), "ci": fmt_ci(row.low, row.high),
                                      "sig": significant, "better": better(row.metric, row.mean) if significant else None}
    order = _order(data.models)
    keys = sorted(rows, key=lambda k: (order.get(k[2], 99), _sort_key(order, k[0], k[1], k[4]), k[3] or 0))
    return {"columns": [_column(name, base, None, "image") for name, base in series.items()],
            "rows": [rows[k] for k in keys]}


def _num(value: Any) -> float | None:
    return None if missing(value) else float(value)
