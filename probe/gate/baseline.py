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
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError, field_validator

from probe.analyse.aggregate import latest_config, per_image
from probe.analyse.pairing import ITEM
from probe.errors import UsageError
from probe.gate.complete import require_complete, score_problems, state_problems
from probe.gate.files import RunState, first_error, read_json, read_run, read_table
from probe.store.atomic import atomic_write_bytes
from probe.store.tables import expand_groups, group_columns

FORMAT = "probe-baseline/1"
COORDINATES = [*ITEM, "model", "steps"]
PER_IMAGE = [*COORDINATES, "key", "series", "metric", "value", "label"]
#: a baseline's set rows; their group adds `var_<name>` columns, as in scores.parquet.
SETS = ["probe", "model", "steps", "strength", "series", "metric", "reference", "value", "low", "high", "se", "df"]
#: what a baseline keeps of its run's manifest.
PROVENANCE = ("presets", "packages", "device", "started_at", "finished_at", "status", "counts", "score_failures")

Number = StrictFloat | StrictInt


class _Row(BaseModel):
    """Columns every stored row shares; others (group `var_*` columns, newer ones) are kept as they are."""

    model_config = ConfigDict(extra="allow")

    metric: str
    series: str | None = None
    model: str | None = None
    steps: Number | None = None
    strength: Number | None = None
    value: Number | None = None


class PerImageRow(_Row):
    """One per-image score of a baseline: its coordinates (pairing), job key, series, value and label."""

    probe: str
    prompt: str
    model: str
    seed: Number | None = None
    text: str | None = None
    variables: str | None = None
    init_image: str | None = None
    key: str | None = None
    label: str | None = None


class SetRow(_Row):
    """One set-metric row (fid, kid, cmmd) of a baseline; files saved before schema 3 hold `group` as JSON."""

    probe: str | None = None
    reference: str | None = None
    low: Number | None = None
    high: Number | None = None
    se: Number | None = None
    df: Number | None = None
    group: str | None = None

    @field_validator("group")
    @classmethod
    def _json_object(cls, value: str | None) -> str | None:
        if value:
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = None
            if not isinstance(parsed, dict):
                raise ValueError("must be a JSON object of group variables")
        return value


class BaselineFile(BaseModel):
    """The file `probe baseline save` writes (FORMAT); `probe check` validates a file against it before use."""

    model_config = ConfigDict(extra="allow")

    format: Literal["probe-baseline/1"]
    suite_name: str
    suite_sha256: str = ""
    provenance: RunState = Field(default_factory=RunState)
    """Where it came from; its run's status and counts say whether that run was complete."""
    per_image: list[PerImageRow]
    sets: list[SetRow] = Field(default_factory=list)
    aggregates: list[dict[str, Any]] = Field(default_factory=list)


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
    warnings: tuple[str, ...] = ()
    """Why it is incomplete, when it was allowed to be (`allow_incomplete`)."""


def baseline_from_run(run_dir: Path, *, allow_incomplete: bool = False, what: str = "baseline run") -> Baseline:
    """Read a run directory as a baseline; an incomplete run is a UsageError unless `allow_incomplete`."""
    run = read_run(Path(run_dir), what)
    problems = state_problems(run.manifest, run.jobs) + score_problems(run.manifest, run.jobs, run.scores)
    warnings = require_complete(problems, f"{what} {run_dir}", allow=allow_incomplete)
    frame = per_image(run.jobs, run.scores)
    frame = frame.reindex(columns=PER_IMAGE).reset_index(drop=True)
    scores = latest_config(run.scores)
    sets = scores[scores["key"].isna()] if not scores.empty else scores
    sets = sets.reindex(columns=[*SETS, *group_columns(sets)])
    manifest = run.manifest
    provenance = {k: manifest.get(k) for k in PROVENANCE}
    provenance["run_dir"] = str(run.path)
    return Baseline(manifest["suite_name"], manifest.get("suite_sha256", ""), provenance, frame,
                    sets.reset_index(drop=True), tuple(warnings))


def save_baseline(run_dir: Path, target: Path, *, allow_incomplete: bool = False) -> Baseline:
    """Write `run_dir`'s scores as a baseline JSON file at `target` (refusing an incomplete run unless allowed:
    the file records the run's status and counts, so `probe check` refuses it in turn)."""
    baseline = baseline_from_run(run_dir, allow_incomplete=allow_incomplete, what="run")
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
    if not path.is_file():
        return []
    return json.loads(read_table(path, "run").to_json(orient="records", double_precision=15))


def load_baseline(path: Path, *, allow_incomplete: bool = False) -> Baseline:
    """A baseline from a JSON file written by `probe baseline save`, or from a run directory.

    Raises:
        UsageError: no such file; not UTF-8, not JSON or not a baseline (naming the first bad field); made from
            an incomplete run (unless `allow_incomplete`).
    """
    if path.is_dir():
        return baseline_from_run(path, allow_incomplete=allow_incomplete, what="--baseline")
    if not path.is_file():
        raise UsageError(f"--baseline {path}: no such file or run directory")
    payload = read_json(path, "--baseline")
    if not isinstance(payload, dict):
        raise UsageError(f"--baseline {path}: not a probe baseline (a JSON {type(payload).__name__}, expected the "
                         "object `probe baseline save` writes)")
    if payload.get("format") != FORMAT:
        raise UsageError(f"--baseline {path}: not a probe baseline (format {payload.get('format')!r})")
    try:
        checked = BaselineFile.model_validate(payload)
    except ValidationError as exc:
        raise UsageError(f"--baseline {path}: not a valid probe baseline ({first_error(exc)})") from None
    provenance = payload.get("provenance") or {}
    warnings = require_complete(state_problems(provenance), f"--baseline {path}", "the run it was saved from",
                                allow=allow_incomplete)
    stored = pd.DataFrame(payload["per_image"])
    # Pair only on the item columns the file has: one saved before `text` and `variables` were stored must
    # not fail to match every run because those came back as None.
    columns = [c for c in PER_IMAGE if c not in ITEM or c in stored.columns or stored.empty]
    per_image_rows = _upgrade(stored.reindex(columns=columns))
    stored_sets = expand_groups(pd.DataFrame(payload.get("sets", [])))  # saved before schema 3: a JSON `group`
    sets = _upgrade(stored_sets.reindex(columns=[*SETS, *group_columns(stored_sets)]))
    return Baseline(checked.suite_name, checked.suite_sha256, provenance, per_image_rows, sets, tuple(warnings))


def _upgrade(frame: pd.DataFrame) -> pd.DataFrame:
    """Baselines saved before metric identity was data hold the label in `metric` and no `series`."""
    missing = frame["series"].isna()
    labels = frame["metric"].astype(object)
    frame["series"] = frame["series"].astype(object).where(~missing, labels)
    frame["metric"] = labels.where(~missing, labels.astype(str).str.split("[", n=1).str[0])
    return frame
