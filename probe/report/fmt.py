"""Number formatting shared by every report table (tests format aggregates with these to compare)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from probe.spec import metric_catalog as catalog

DASH = "\u2014"
ARROWS = {"higher": "\u2191", "lower": "\u2193", "none": ""}


def missing(value: Any) -> bool:
    """None, NaN or pandas' NA (parquet brings all three back)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def fmt(value: Any) -> str:
    """A number to 4 significant digits, trailing zeros kept ('—' when missing); thousands without decimals."""
    if missing(value):
        return DASH
    number = float(value)
    if number == 0:
        return "0"
    if abs(number) >= 1000:
        return f"{number:,.0f}"
    if abs(number) < 1e-3:
        return f"{number:.2e}"
    return f"{number:#.4g}".rstrip(".")


def fmt_signed(value: Any) -> str:
    """A difference with its sign: '+0.3201', '-1.2'."""
    if missing(value):
        return DASH
    text = fmt(value)
    return text if text.startswith("-") or text == "0" else f"+{text}"


def fmt_ci(low: Any, high: Any) -> str:
    """'[low, high]', or '' when the interval is missing (e.g. fewer than two prompts)."""
    if missing(low) or missing(high):
        return ""
    return f"[{fmt(low)}, {fmt(high)}]"


def fmt_coord(value: Any) -> str:
    """Steps or strength as a label: 4, 0.25; '' when missing (txt2img has no strength)."""
    if missing(value):
        return ""
    number = float(value)
    return str(int(number)) if number.is_integer() and abs(number) >= 1 else f"{number:g}"


def fmt_count(value: Any) -> str:
    """A count as an integer ('—' when missing)."""
    return DASH if missing(value) else str(int(value))


def fmt_pct(value: Any) -> str:
    """A share in [0, 1] as a percentage with one decimal."""
    return DASH if missing(value) else f"{100 * float(value):.1f}%"


#: Rows the runs being rendered recorded in their manifests (row -> (direction, description)), for metrics whose
#: package is not installed here: a report reads its files alone.
_RECORDED: dict[str, tuple[str, str]] = {}


def remember_outputs(manifest: dict[str, Any]) -> None:
    """Note the directions a run's manifest recorded for the rows its metrics wrote (see `direction`)."""
    for config in (manifest.get("metrics") or {}).values():
        for row, output in ((config or {}).get("outputs") or {}).items():
            if isinstance(output, dict) and output.get("direction") in ARROWS:
                _RECORDED[row] = (str(output["direction"]), str(output.get("description") or ""))


def direction(metric: str) -> str:
    """higher | lower | none for a score row: the metric registry (where each row's direction is declared
    once), else what the run's manifest recorded when the metric's package is not installed here."""
    if catalog.METRICS.writer_of(metric) is None and metric in _RECORDED:
        return _RECORDED[metric][0]
    return catalog.direction_of(metric)


def description(metric: str) -> str:
    """What a score row means, for a column's tooltip ("" for a row no installed metric declares)."""
    if catalog.METRICS.writer_of(metric) is None and metric in _RECORDED:
        return _RECORDED[metric][1]
    return catalog.description_of(metric)


def better(metric: str, delta: Any) -> bool | None:
    """Whether a positive/negative change is an improvement for this metric (None: no direction)."""
    way = direction(metric)
    if way == "none" or missing(delta) or float(delta) == 0:
        return None
    return (float(delta) > 0) == (way == "higher")
