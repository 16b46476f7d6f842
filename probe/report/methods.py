"""Methods section: what produced the run (suite, presets, metric configurations, packages, device, times,
failures) and the warnings its data calls for. Reads the manifest and the tables only.
"""

from __future__ import annotations

import json
from pathlib import PurePath
from typing import Any

from probe.report.data import RunData
from probe.report.fmt import fmt_coord
from probe.spec.presets import PRESETS

#: Below this many images per set, FID is strongly biased upward (Chong & Forsyth 2020; Jayasumana et al. 2024).
FID_MIN_IMAGES = 2000


def display_path(path: Any) -> str:
    """A path as shown in the report: relative paths as given, absolute ones by their last two parts."""
    text = str(path or "")
    pure = PurePath(text)
    return "/".join(pure.parts[-2:]) if pure.is_absolute() else text


def _presets(data: RunData) -> list[dict[str, Any]]:
    rows = []
    for label, record in (data.manifest.get("presets") or {}).items():
        suite_model = _suite_model(data, label)
        preset = PRESETS.get(str(record.get("preset")))
        steps = suite_model.get("steps") or (list(preset.steps) if preset else None)
        guidance = suite_model.get("guidance")
        rows.append({"label": label, "preset": record.get("preset"), "model_id": display_path(record.get("model_id")),
                     "revision": record.get("revision") or "", "lora_id": display_path(record.get("lora_id") or ""),
                     "lora_revision": record.get("lora_revision") or "", "scheduler": record.get("scheduler") or "",
                     "steps": ", ".join(str(s) for s in steps) if steps else "",
                     "guidance": fmt_coord(guidance if guidance is not None else (preset.guidance if preset else None)),
                     "role": "subject" if label == data.subject else "baseline"})
    return rows


def _suite_model(data: RunData, label: str) -> dict[str, Any]:
    for model in (data.manifest.get("suite") or {}).get("models") or []:
        if isinstance(model, dict) and (model.get("name") or model.get("preset")) == label:
            return model
    return {}


def _metric_configs(data: RunData) -> list[dict[str, Any]]:
    rows = []
    for name, config in (data.manifest.get("metrics") or {}).items():
        items = [(k, display_path(v) if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str))
                 for k, v in config.items() if k != "name"]  # absolute paths shortened; manifest.json has them
        rows.append({"name": name, "config": items})
    return rows


def warnings(data: RunData) -> list[str]:
    """Caveats the data calls for: preset notes, small-sample FID, overridden models, failed jobs."""
    notes: list[str] = []
    for record in (data.manifest.get("presets") or {}).values():
        notes.extend(str(n) for n in record.get("notes") or [])
    override = data.manifest.get("model_override")
    if override:
        notes.append(f"Every model of this suite was generated with the {override!r} preset (--model {override}): "
                     "model labels name the suite's models, not what made the images.")
    fid = data.aggregates[data.aggregates["metric"] == "fid"] if not data.aggregates.empty else data.aggregates
    if len(fid) and (fid["n_images"] < FID_MIN_IMAGES).any():
        smallest = int(fid["n_images"].min())
        notes.append(f"FID here is computed on as few as {smallest} images; below about {FID_MIN_IMAGES:,} images FID "
                     "is biased upward and depends on the sample size, so compare models at equal n and prefer "
                     "CMMD or KID.")
    failed = int((data.jobs["status"] == "failed").sum())
    if failed:
        notes.append(f"{failed} job(s) failed: their images are missing from the grids and from every mean "
                     "(n_images counts what remains; errors under Methods).")
    ci_missing = data.aggregates["low"].isna().sum() if "low" in data.aggregates else 0
    if ci_missing:
        notes.append(f"{int(ci_missing)} aggregate(s) have no confidence interval: intervals resample or remove "
                     "whole prompts, so a cell needs at least two prompts.")
    return list(dict.fromkeys(notes))


def methods(data: RunData) -> dict[str, Any]:
    """Everything the Methods section shows."""
    manifest = data.manifest
    counts = manifest.get("counts") or {}
    failures = [{k: str(v) for k, v in f.items() if k != "key"} for f in manifest.get("failures") or []]
    wall = manifest.get("wall_seconds")
    return {
        "run": data.name, "suite_name": manifest.get("suite_name"), "suite_path": display_path(manifest.get("suite_path")),
        "suite_sha256": manifest.get("suite_sha256") or "", "description": (manifest.get("suite") or {}).get("description"),
        "probe_version": manifest.get("probe_version"), "status": manifest.get("status"),
        "started_at": manifest.get("started_at"), "finished_at": manifest.get("finished_at"),
        "wall": f"{wall:.1f} s" if isinstance(wall, int | float) else "",
        "counts": counts, "failures": failures[:50], "n_failures": len(failures),
        "model_override": manifest.get("model_override"), "limit": manifest.get("limit"),
        "seeds": (manifest.get("suite") or {}).get("seeds"),
        "presets": _presets(data), "metrics": _metric_configs(data),
        "packages": sorted((manifest.get("packages") or {}).items()),
        "device": [(k, str(v)) for k, v in (manifest.get("device") or {}).items()],
    }
