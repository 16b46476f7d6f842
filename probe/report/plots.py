"""Quality plots: each metric against steps (one line per model, 95% CI bands), img2img against strength.

matplotlib's object API with the Agg canvas (no pyplot state, no display): PNGs in assets/plots/.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from probe.report.data import RunData
from probe.report.fmt import ARROWS, direction, missing
from probe.report.tables import column_key
from probe.store.atomic import atomic_write_bytes
from probe.store.tables import group_columns

STYLES = ["-", "--", ":", "-."]
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f"]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


def model_colours(models: list[str]) -> dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(models)}


def quality_plots(data: RunData, out: Path) -> dict[str, list[dict[str, str]]]:
    """Write one PNG per (probe, metric); returns per probe [{file, title, alt}] with paths relative to the run."""
    out.mkdir(parents=True, exist_ok=True)
    agg = data.aggregates
    if agg.empty:
        return {}
    groups = group_columns(agg)
    ungrouped = ~agg[groups].notna().any(axis=1) if groups else pd.Series(True, index=agg.index)
    agg = agg[ungrouped & agg["mean"].notna()]
    colours = model_colours(data.models)
    prefix = out.resolve().relative_to(data.path.resolve()).as_posix()
    plots: dict[str, list[dict[str, str]]] = {}
    for probe in data.probes:
        rows = agg[agg["probe"] == probe]
        if rows.empty:
            continue
        img2img = data.probe_kind(probe) == "img2img"
        x = "strength" if img2img else "steps"
        for key, group in rows.groupby(rows.apply(_column, axis=1), sort=True):
            if group[x].isna().all():
                continue  # images made elsewhere carry no step counts: nothing to plot against
            series, metric = str(group["series"].iloc[0]), str(group["metric"].iloc[0])
            name = f"{slug(probe)}--{slug(str(key))}.png"
            title = f"{series} {ARROWS[direction(metric)]}".strip()
            reference = group["reference"].iloc[0]
            if group["kind"].iloc[0] == "set" and not missing(reference):
                title += f" vs {str(reference).split(':', 1)[-1]}"
            _plot(group, img2img, colours, title, out / name)
            plots.setdefault(probe, []).append({"file": f"{prefix}/{name}", "title": title,
                                                "alt": f"{title} against {x} for probe {probe}, one line per model"})
    return plots


def _column(row: pd.Series) -> str:
    return column_key(row["series"], row["reference"] if row["kind"] == "set" else None)


def _line_order(models: list[str], coords: Any) -> tuple[int, str, float]:
    """Legend order: models as in the suite (subject first), then steps."""
    coords = coords if isinstance(coords, tuple) else (coords,)
    model = str(coords[0])
    steps = float(coords[1]) if len(coords) > 1 and not missing(coords[1]) else 0.0
    return (models.index(model) if model in models else len(models), model, steps)


def _plot(group: pd.DataFrame, img2img: bool, colours: dict[str, str], title: str, path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    figure = Figure(figsize=(4.6, 3.0), dpi=100, layout="constrained")
    axes = figure.subplots()
    x = "strength" if img2img else "steps"
    lines = ["model", "steps"] if img2img else ["model"]
    steps_values = sorted(group["steps"].dropna().unique())
    order = list(colours)
    ordered = sorted(group.groupby(lines, sort=False), key=lambda item: _line_order(order, item[0]))
    for coords, line in ordered:
        coords = coords if isinstance(coords, tuple) else (coords,)
        line = line.sort_values(x)
        colour = colours.get(coords[0], "#333333")
        label = str(coords[0]) + (f" ({int(coords[1])} steps)" if img2img else "")
        xs, means = line[x].astype(float).to_numpy(), line["mean"].astype(float).to_numpy()
        low, high = line["low"].astype(float).to_numpy(), line["high"].astype(float).to_numpy()
        style = STYLES[steps_values.index(coords[1]) % len(STYLES)] if img2img else "-"
        axes.plot(xs, means, style, marker="o", color=colour, label=label)
        if len(xs) > 1:
            axes.fill_between(xs, low, high, color=colour, alpha=0.15, linewidth=0)
        elif not (pd.isna(low).any() or pd.isna(high).any()):
            # A CI that does not contain its estimate would be a negative error bar; clip so a bad row still renders.
            yerr = [np.maximum(means - low, 0.0), np.maximum(high - means, 0.0)]
            axes.errorbar(xs, means, yerr=yerr, color=colour, capsize=3, fmt="none")
    values = sorted(group[x].dropna().astype(float).unique())
    if not img2img and values and values[-1] / max(values[0], 1e-9) > 8:
        axes.set_xscale("log", base=2)
    axes.xaxis.set_major_locator(FixedLocator(values))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xticklabels([f"{v:g}" for v in values])
    axes.set_xlabel(x)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, frameon=False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue(), durable=False)  # never a half-written plot under its name
