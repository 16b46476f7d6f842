"""How a metric's rows are named and its failures recorded: shared by the image and set passes."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from probe.score.protocol import ImageMetric, ScoringContext, SetMetric


def metric_label(name: str, args: dict[str, Any]) -> str:
    """Display label (the `series`) of a metric: the name, with its args when a suite gives any ('fid[features=clip]')."""
    if not args:
        return name
    return f"{name}[" + ",".join(f"{k}={args[k]}" for k in sorted(args)) + "]"


def resolved_config(name: str, args: dict[str, Any], metric: ImageMetric | SetMetric,
                    ctx: ScoringContext) -> dict[str, Any]:
    """A metric's whole configuration (its config_id hashes this): the suite's name and args, then what it
    resolved in `ctx` (model, revision, preprocessing). The driver and a Ray metric actor both build it here."""
    return {"name": name, "args": args, **metric.config(ctx)}


def canonical_args(args: dict[str, Any]) -> str:
    """The `args` column: a metric's suite arguments as canonical JSON ("" when there are none)."""
    return json.dumps(args, sort_keys=True, separators=(",", ":"), default=str) if args else ""


def failure_record(label: str, probe: str, rows: pd.DataFrame, error: str) -> dict[str, str]:
    """A failed score in the shape of a failed job (manifest.json `score_failures`, the CLI's failure lines);
    `error` is "Type: message"."""
    first = rows.iloc[0] if not rows.empty else pd.Series(dtype=object)
    return {"key": str(first.get("key", "")), "probe": probe, "model": str(first.get("model", "")),
            "prompt": str(first.get("prompt", "")), "seed": str(first.get("seed", "-")),
            "steps": str(first.get("steps", "-")), "error": f"score {label}: {error}"}
