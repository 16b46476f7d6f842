"""Bias section: perceived-gender shares against the reference share (sorted by gap) and Monk skin-tone
distributions, each with its coverage. Numbers come from probe.analyse.bias, so notebooks see the same.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from probe.analyse.aggregate import per_image
from probe.report.data import RunData
from probe.report.fmt import fmt, fmt_coord, fmt_pct, missing
from probe.spec.monk import MONK_HEX

MONK_COLOURS = MONK_HEX
GENDER, SKIN = "perceived_gender", "skin_tone"
MAX_ROWS = 300


def _variables(row: pd.Series) -> str:
    """The prompt variables of a group ('a nurse'), or its prompt count when it pools prompts."""
    values = [str(row[c]) for c in row.index if c.startswith("var_") and not missing(row[c])]
    return ", ".join(values) if values else f"{int(row['n_prompts'])} prompt(s)"


def _pct_pos(value: Any) -> float:
    """A share as a CSS percentage in [0, 100] (0 when missing)."""
    return 0.0 if missing(value) else max(0.0, min(100.0, 100 * float(value)))


def _pp(difference: Any) -> str:
    """A difference of shares in percentage points ('' when missing)."""
    return "" if missing(difference) else f"{100 * float(difference):+.1f} pp"


def _gender_rows(frame: pd.DataFrame, data: RunData) -> list[dict[str, Any]]:
    from probe.analyse import bias  # scipy.stats: imported only for runs with bias metrics

    reference = bias.BLS_REFERENCE[0] if bias.BLS_REFERENCE[0] in frame else None
    shares = bias.label_shares(frame, GENDER, reference_column=reference, reference_scale=bias.BLS_REFERENCE[1])
    if shares.empty:
        return []
    has_ref = shares["reference"].notna()
    shares = shares.assign(_gap=shares["reference_distance"].where(has_ref, shares["parity_distance"]))
    shares = shares.sort_values("_gap", ascending=False, na_position="last")
    rows = []
    for _, row in shares.head(MAX_ROWS).iterrows():
        ref = row["reference"]
        rows.append({"probe": row["probe"], "group": _variables(row), "model": row["model"], "steps": fmt_coord(row["steps"]),
                     "share": fmt_pct(row["share_feminine"]), "reference": fmt_pct(ref),
                     "ci": "" if missing(row["share_feminine_low"]) else
                     f"[{fmt_pct(row['share_feminine_low'])}, {fmt_pct(row['share_feminine_high'])}]",
                     "gap": _pp(row["share_feminine"] - (0.5 if missing(ref) else ref)),
                     "parity": fmt(row["parity_distance"]),
                     "coverage": fmt_pct(row["coverage"]), "n_labelled": int(row["n_labelled"]),
                     "n_generated": int(row["n_generated"]), "unclear": int(row.get("count_unclear", 0)),
                     "no_person": int(row.get("count_no_person", 0)),
                     "bar": {"share": _pct_pos(row["share_feminine"]), "low": _pct_pos(row["share_feminine_low"]),
                             "high": _pct_pos(row["share_feminine_high"]),
                             "ref": None if missing(ref) else _pct_pos(ref)}})
    return rows


def _gender_deltas(frame: pd.DataFrame, subject: str | None) -> list[dict[str, Any]]:
    from probe.analyse import bias

    if subject is None:
        return []
    deltas = bias.paired_share_deltas(frame, subject, group_by=[])
    return [{"probe": r.probe, "model": r.model, "steps": fmt_coord(r.steps), "baseline": r.baseline,
             "baseline_steps": fmt_coord(r.baseline_steps), "subject_share": fmt_pct(r.subject_share),
             "baseline_share": fmt_pct(r.baseline_share), "delta": _pp(r.delta),
             "ci": "" if missing(r.low) else f"[{100 * r.low:+.1f}, {100 * r.high:+.1f}] pp",
             "sig": bool(r.excludes_zero), "n_pairs": int(r.n_pairs)} for r in deltas.itertuples()]


def _monk_rows(frame: pd.DataFrame, group_by: list[str], order: dict[str, int]) -> list[dict[str, Any]]:
    from probe.analyse import bias

    dist = bias.monk_distribution(frame, group_by)
    rows = []
    for _, row in dist.iterrows():
        segments: list[dict[str, Any]] = [{"tone": i + 1, "colour": colour, "width": _pct_pos(row[f"share_monk_{i + 1}"]),
                     "share": fmt_pct(row[f"share_monk_{i + 1}"])}
                    for i, colour in enumerate(MONK_COLOURS)]
        rows.append({"probe": row["probe"], "model": row["model"], "steps": fmt_coord(row["steps"]),
                     "group": _variables(row) if any(c.startswith("var_") for c in group_by) else "",
                     "segments": [s for s in segments if s["width"] > 0], "coverage": fmt_pct(row["coverage"]),
                     "n_labelled": int(row["n_labelled"]), "n_generated": int(row["n_generated"]),
                     "n_unknown": int(row["n_unknown"]), "entropy": fmt(row["entropy"]),
                     "sort": (str(row["probe"]), order.get(row["model"], 99),
                              -1.0 if missing(row["steps"]) else float(row["steps"]))})
    return sorted(rows, key=lambda r: r["sort"])


def bias_section(data: RunData) -> dict[str, Any] | None:
    """Everything the Bias section shows, or None when the run has no perceived_gender / skin_tone scores."""
    if data.scores.empty or not data.scores["metric"].isin([GENDER, SKIN]).any():
        return None
    frame = per_image(data.jobs, data.scores)
    order = {m: i for i, m in enumerate(data.models)}
    section: dict[str, Any] = {"gender": [], "gender_deltas": [], "monk": [], "monk_groups": [],
                               "colours": list(enumerate(MONK_COLOURS, start=1)), "thresholds": _thresholds(data)}
    # Found by the base metric, one pass per configuration (series), so perceived_gender[prompts=...] shows too.
    for _, rows in frame[frame["metric"] == GENDER].groupby("series", sort=True):
        section["gender"] += _gender_rows(rows, data)
        section["gender_deltas"] += _gender_deltas(rows, data.subject)
        section["has_reference"] = any(r["reference"] != fmt_pct(None) for r in section["gender"])
    by_var = sorted(c for c in frame.columns if c.startswith("var_"))
    for _, rows in frame[frame["metric"] == SKIN].groupby("series", sort=True):
        section["monk"] += _monk_rows(rows, ["probe", "model", "steps"], order)
        if by_var:
            section["monk_groups"] += _monk_rows(rows, ["probe", "model", "steps", *by_var], order)[:MAX_ROWS]
    return section


def _thresholds(data: RunData) -> list[tuple[str, str]]:
    """The bias metrics' configurations (classifier, prompts, thresholds) as recorded in the manifest."""
    items = []
    for name, config in (data.manifest.get("metrics") or {}).items():
        if name.split(":")[0] in (GENDER, SKIN, "faces"):
            items.append((name, json.dumps({k: v for k, v in config.items() if k != "name"}, sort_keys=True,
                                           default=str)))
    return items
