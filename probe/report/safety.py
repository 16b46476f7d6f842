"""The report's Safety section: flagged-image rates per detector and model x steps with their intervals, the
subject's paired differences, how often two detectors disagree, and the flagged images, blurred.

Rates are the ordinary aggregates of the flag rows (1 flagged, 0 safe): flagged images stay in every
denominator. Blurring is decided once, here, and handed to the thumbnails, so no grid or table of the report
shows a flagged image unblurred unless the suite says `report: {blur_flagged: false}`.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from probe.analyse.safety import disagreement, flag_rows, flagged_keys
from probe.report.data import RunData
from probe.report.fmt import fmt_coord, fmt_pct, missing
from probe.report.grids import Thumbnails, image_cell

GALLERY = 24


def blur_flagged(data: RunData) -> bool:
    options = ((data.manifest.get("suite") or {}).get("report") or {})
    return bool(options.get("blur_flagged", True))


def safety_thumbnails(data: RunData) -> Thumbnails:
    """The report's thumbnails, knowing which images are flagged and whether to blur them."""
    return Thumbnails(data.path, flagged=flagged_keys(data.jobs, data.scores), blur=blur_flagged(data))


def safety_section(data: RunData, thumbs: Thumbnails) -> dict[str, Any] | None:
    """What _safety.html.j2 shows; None when no image was scored by a flagging metric."""
    rows = flag_rows(data.jobs, data.scores)
    if rows.empty:
        return None
    series = sorted(set(rows["series"]))
    rates = data.aggregates[data.aggregates["series"].isin(series)] if not data.aggregates.empty else data.aggregates
    deltas = data.deltas[data.deltas["series"].isin(series)] if not data.deltas.empty else data.deltas
    flagged = rows[rows["label"] == "flagged"].drop_duplicates("key")
    gallery = [{"cell": image_cell(r, data.path, thumbs), "model": r.model, "steps": fmt_coord(r.steps),
                "prompt": r.prompt} for r in flagged.head(GALLERY).itertuples()]
    return {"detectors": series, "rates": _rates(rates), "deltas": _deltas(deltas),
            "disagreement": _disagreement(disagreement(data.jobs, data.scores)), "gallery": gallery,
            "n_flagged": len(flagged), "n_images": int(rows["key"].nunique()), "blur": thumbs.blur}


def _rates(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"probe": r.probe, "detector": r.series, "model": r.model, "steps": fmt_coord(r.steps),
             "strength": fmt_coord(r.strength), "rate": fmt_pct(r.mean), "ci": _pct_ci(r.low, r.high),
             "flagged": round(float(r.mean) * int(r.n_images)), "images": int(r.n_images),
             "prompts": int(r.n_prompts)} for r in frame.itertuples()]


def _pct_ci(low: Any, high: Any) -> str:
    """An interval of a share (or of a difference of shares) in percent (points)."""
    return "" if missing(low) or missing(high) else f"[{100 * float(low):.1f}, {100 * float(high):.1f}]"


def _points(value: Any) -> str:
    return "" if missing(value) else f"{100 * float(value):+.1f} pp"


def _deltas(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"probe": r.probe, "detector": r.series, "model": r.model, "steps": fmt_coord(r.steps),
             "baseline": r.baseline, "baseline_steps": fmt_coord(r.baseline_steps),
             "delta": _points(r.mean), "ci": _pct_ci(r.low, r.high), "pairs": int(r.n_pairs),
             "excludes_zero": bool(r.excludes_zero), "worse": bool(r.excludes_zero and r.mean > 0)}
            for r in frame.itertuples()]


def _disagreement(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"probe": r.probe, "model": r.model, "steps": fmt_coord(r.steps), "detector": r.detector,
             "other": r.other, "images": int(r.images), "both": int(r.both), "only_detector": int(r.only_detector),
             "only_other": int(r.only_other), "rate": fmt_pct(r.disagreement)} for r in frame.itertuples()]
