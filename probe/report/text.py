"""Text-rendering section: per image the requested text beside what OCR read back, and OCR aggregates."""

from __future__ import annotations

from typing import Any

import pandas as pd

from probe.analyse.aggregate import per_image
from probe.report.data import RunData
from probe.report.fmt import fmt, fmt_coord, missing
from probe.report.grids import Thumbnails, image_cell
from probe.spec.metric_catalog import METRICS

SAMPLE_ROWS = 200


def ocr_rows() -> list[str]:
    """The score rows the ocr metric writes, as its catalog record declares them (ocr_exact, ocr_cer, ...)."""
    return list(METRICS["ocr"].outputs)


def text_section(data: RunData, probe: str, summary: dict[str, Any], thumbs: Thumbnails) -> dict[str, Any]:
    """Aggregates of the OCR metrics (from the probe's summary) and up to SAMPLE_ROWS per-image read-backs."""
    names = ocr_rows()
    columns = [c for c in summary["columns"] if c["base"] in names]
    jobs = data.jobs[data.jobs["probe"] == probe]
    scores = per_image(jobs, data.scores) if not data.scores.empty else pd.DataFrame()
    ocr = scores[scores["metric"].isin(names)] if not scores.empty else scores
    values = {(r.key, r.metric): r.value for r in ocr.itertuples()} if not ocr.empty else {}
    read: dict[str, str] = {}
    for row in ocr.itertuples() if not ocr.empty else []:
        if row.key not in read and not missing(row.score_text):
            read[row.key] = str(row.score_text)
    order = {m: i for i, m in enumerate(data.models)}
    usable = jobs.assign(_order=jobs["model"].map(order).fillna(99)).sort_values(["_order", "steps", "prompt", "seed"])
    samples = []
    for row in usable.head(SAMPLE_ROWS).itertuples():
        samples.append({"cell": image_cell(row, data.path, thumbs), "model": row.model, "steps": fmt_coord(row.steps),
                        "seed": fmt_coord(row.seed), "target": "" if missing(row.text) else str(row.text),
                        "read": read.get(row.key), "exact": fmt(values.get((row.key, "ocr_exact"))),
                        "cer": fmt(values.get((row.key, "ocr_cer"))), "f1": fmt(values.get((row.key, "ocr_f1")))})
    return {"probe": probe, "columns": columns, "rows": summary["rows"], "samples": samples,
            "has_ocr": bool(columns) or bool(values), "n_jobs": len(jobs), "capped": len(jobs) > SAMPLE_ROWS}
