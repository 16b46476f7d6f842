"""Baselines for `probe check`: a run's per-image scores and aggregates, saved as one portable JSON file.

Per-image scores are stored with their coordinates (model, steps and the pairing item of
probe.analyse.pairing: probe, prompt, target text, variables, seed, strength, init image) as well as the job
key, so a baseline made with one model version pairs with a run of the next version,
whose keys differ (the revision is part of the key) but whose coordinates are the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from probe.analyse.aggregate import latest_config, per_image
from probe.analyse.pairing import ITEM
from probe.errors import UsageError
from probe.store.atomic import atomic_write_bytes
from probe.store.tables import expand_groups, group_columns, load_run_tables

FORMAT = "probe-baseline/1"
COORDINATES = [*ITEM, "model", "steps"]
PER_IMAGE = [*COORDINATES, "key", "series", "metric", "value", "label"]
#: a baseline's set rows; their group adds `var_<name>` columns, as in scores.parquet.
SETS = ["probe", "model", "steps", "strength", "series", "metric", "reference", "value", "low", "high", "se", "df"]


@dataclass(frozen=True)
class Baseline:
    """What a check compares against: per-image scores, set-metric rows and where they came from."""

    suite_name: str
    suite_sha256: str
    provenance: dict[str, Any]
    per_image: pd.DataFrame
    """One row per (job, series): COORDINATES + key, series, metric, value, label."""
    sets: pd.DataFrame
    """Set-metric rows (fid, kid, cmmd): probe, model, steps, strength, series, metric, value, low, high, se, df and
    the group's `var_*` columns."""


def baseline_from_run(run_dir: Path) -> Baseline:
    """Read a run directory as a baseline."""
    if not (Path(run_dir) / "manifest.json").is_file():
        raise UsageError(f"{run_dir} is not a run directory (no manifest.json)")
    run = load_run_tables(run_dir)
    frame = per_image(run.jobs, run.scores)
    frame = frame.reindex(columns=PER_IMAGE).reset_index(drop=True)
    scores = latest_config(run.scores)
    sets = scores[scores["key"].isna()] if not scores.empty else scores
    sets = sets.reindex(columns=[*SETS, *group_columns(sets)])
    manifest = run.manifest
    provenance = {k: manifest.get(k) for k in ("presets", "packages", "device", "started_at", "finished_at", "counts")}
    provenance["run_dir"] = str(run.path)
    return Baseline(manifest["suite_name"], manifest.get("suite_sha256", ""), provenance, frame,
                    sets.reset_index(drop=True))


def save_baseline(run_dir: Path, target: Path) -> Baseline:
    """Write `run_dir`'s scores as a baseline JSON file at `target`."""
    baseline = baseline_from_run(run_dir)
    payload = {
        "format": FORMAT,
        "suite_name": baseline.suite_name,
        "suite_sha256": baseline.suite_sha256,
        "provenance": baseline.provenance,
        "per_image": json.loads(baseline.per_image.to_json(orient="records", double_precision=15)),
        "sets": json.loads(baseline.sets.to_json(orient="records", double_precision=15)),
        "aggregates": _aggregates(run_dir),
    }
    atomic_write_bytes(target, json.dumps(payload, indent=1, default=str).encode("utf-8"))
    return baseline


def _aggregates(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "aggregates.parquet"
    return json.loads(pd.read_parquet(path).to_json(orient="records", double_precision=15)) if path.is_file() else []


def load_baseline(path: Path) -> Baseline:
    """A baseline from a JSON file written by `probe baseline save`, or from a run directory."""
    if path.is_dir():
        return baseline_from_run(path)
    if not path.is_file():
        raise UsageError(f"--baseline {path}: no such file or run directory")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"--baseline {path}: not JSON ({exc})") from None
    if payload.get("format") != FORMAT:
        raise UsageError(f"--baseline {path}: not a probe baseline (format {payload.get('format')!r})")
    stored = pd.DataFrame(payload["per_image"])
    # Pair only on the item columns the file has: one saved before `text` and `variables` were stored must
    # not fail to match every run because those came back as None.
    columns = [c for c in PER_IMAGE if c not in ITEM or c in stored.columns or stored.empty]
    per_image_rows = _upgrade(stored.reindex(columns=columns))
    stored_sets = expand_groups(pd.DataFrame(payload["sets"]))  # saved before schema 3: a JSON `group`
    sets = _upgrade(stored_sets.reindex(columns=[*SETS, *group_columns(stored_sets)]))
    return Baseline(payload["suite_name"], payload.get("suite_sha256", ""), payload.get("provenance", {}),
                    per_image_rows, sets)


def _upgrade(frame: pd.DataFrame) -> pd.DataFrame:
    """Baselines saved before metric identity was data hold the label in `metric` and no `series`."""
    missing = frame["series"].isna()
    labels = frame["metric"].astype(object)
    frame["series"] = frame["series"].astype(object).where(~missing, labels)
    frame["metric"] = labels.where(~missing, labels.astype(str).str.split("[", n=1).str[0])
    return frame
