"""`probe score`: score images made elsewhere (a folder plus a file -> prompt table) into a normal run directory.

The images are keyed by content hash and linked into the run folder, so reports, notebooks and `probe check`
work on them exactly as on generated runs. Every listed file is checked before any scoring starts.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from probe.errors import UsageError, suggest
from probe.run.folder import RunDir
from probe.run.manifest import device_info, now_iso, package_versions
from probe.run.records import SCHEMA_VERSION, RunCounts, RunManifest
from probe.spec.metric_catalog import DEFAULT_CLIP_MODEL, METRICS
from probe.spec.schema import MetricReference, MetricSpec
from probe.store.atomic import write_parquet_atomic
from probe.store.images import link_or_copy

#: Columns of the prompts table with a meaning; any other column is carried as a variable (var_<name>).
KNOWN_COLUMNS = {"file", "prompt", "text", "model", "probe", "seed", "steps"}


@dataclass(frozen=True)
class ScoreRequest:
    """What `probe score` was asked to do."""

    images: Path
    prompts: Path
    metrics: tuple[str, ...] = ("clip_score",)
    reference: Path | None = None
    out: Path = Path("reports")
    name: str | None = None
    clip_model: str = DEFAULT_CLIP_MODEL
    device: str = "cpu"
    cache_dir: Path | None = None
    debug: bool = False


def read_prompt_table(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV, TSV or JSONL file with at least `file` and `prompt` columns."""
    if not path.is_file():
        raise UsageError(f"{path}: prompts file not found")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append({k: "" if v is None else str(v) for k, v in json.loads(line).items()})
                except (json.JSONDecodeError, AttributeError):
                    raise UsageError(f"{path}:{number}: not a JSON object") from None
    else:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    if not rows:
        raise UsageError(f"{path}: no rows")
    for column in ("file", "prompt"):
        if column not in rows[0]:
            raise UsageError(f"{path}: needs a {column!r} column{suggest(column, rows[0])}")
    return rows


def _check_request(request: ScoreRequest, rows: list[dict[str, str]]) -> list[MetricSpec]:
    """Every row is complete and readable, every metric known, set metrics have a reference: before any work."""
    _check_rows(request, rows)
    missing = [(n, r["file"]) for n, r in enumerate(rows, start=2) if not (request.images / r["file"]).is_file()]
    if missing:
        listed = ", ".join(f"row {n}: {f}" for n, f in missing[:5])
        raise UsageError(f"{request.prompts}: {len(missing)} listed image(s) not found in {request.images} ({listed})")
    specs = []
    for text in request.metrics:
        name, args = parse_metric_option(text)
        info = METRICS.get(name)
        if info is None:
            raise UsageError(f"--metrics: unknown metric {name!r}{suggest(name, METRICS)}")
        if info.kind == "set":
            if request.reference is None:
                raise UsageError(f"--metrics: {name} compares sets of images and needs --reference DIR")
            reference = MetricReference(folder=str(request.reference.resolve()))
            specs.append(MetricSpec(name=name, args=args, reference=reference))
        else:
            specs.append(MetricSpec(name=name, args=args))
    return specs


def _check_rows(request: ScoreRequest, rows: list[dict[str, str]]) -> None:
    """Required columns present, seed/steps integers, images decodable; errors name the row."""
    from PIL import Image, UnidentifiedImageError

    for number, row in enumerate(rows, start=2):
        where = f"{request.prompts}: row {number}"
        if not row.get("file") or not row.get("prompt"):
            raise UsageError(f"{where}: needs `file` and `prompt`")
        for column in ("seed", "steps"):
            if row.get(column) and not row[column].strip().isdigit():
                raise UsageError(f"{where}: {column} {row[column]!r} is not a whole number")
        source = request.images / row["file"]
        if source.is_file():
            try:
                with Image.open(source) as image:
                    image.verify()
            except (UnidentifiedImageError, OSError) as exc:
                raise UsageError(f"{where}: {row['file']} is not a readable image ({exc})") from None


def parse_metric_option(text: str) -> tuple[str, dict[str, Any]]:
    """'kid:features=clip,subset_size=50' -> ('kid', {'features': 'clip', 'subset_size': 50})."""
    import yaml

    name, _, rest = text.partition(":")
    args: dict[str, Any] = {}
    for part in filter(None, rest.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--metrics {text!r}: arguments look like name:key=value,key=value")
        args[key.strip()] = yaml.safe_load(value)
    return name.strip(), args


def _job_rows(rows: list[dict[str, str]], request: ScoreRequest, run: RunDir) -> pd.DataFrame:
    from PIL import Image

    records = []
    for row in rows:
        source = request.images / row["file"]
        key = hashlib.sha256(source.read_bytes()).hexdigest()
        relative = f"images/{key[:2]}/{key}{source.suffix.lower()}"
        link_or_copy(source, run.path / relative)
        with Image.open(source) as image:
            width, height = image.size
        extra = {f"var_{k}": v for k, v in row.items() if k not in KNOWN_COLUMNS}
        records.append({
            "key": key, "probe": row.get("probe") or "images", "model": row.get("model") or request.images.name,
            "mode": "external", "prompt": row["prompt"], "text": row.get("text") or None,
            # No seed given: no seed recorded. The image is then its own item: never paired with another model's
            # image, and a grid cell of its own (probe.analyse.pairing).
            "seed": int(row["seed"]) if row.get("seed") else None,
            "steps": int(row["steps"]) if row.get("steps") else None, "strength": None, "init_image": None,
            "width": width, "height": height, "status": "cached", "image": relative, "seconds": None,
            "source_file": row["file"], "variables": json.dumps({k[4:]: v for k, v in extra.items()}, sort_keys=True), **extra,
        })
    frame = pd.DataFrame(records)
    frame["seed"] = frame["seed"].astype("Int64")
    return frame


def score_images(request: ScoreRequest, progress: Any = None) -> tuple[Path, dict[str, Any]]:
    """Build the run directory for `request` and score it; returns the folder and the score counts."""
    from probe.analyse.aggregate import aggregate, paired_deltas
    from probe.score.protocol import ScoringContext
    from probe.score.scorer import prepare_metrics, score_run
    from probe.store.features import FeatureCache
    from probe.store.score_cache import ScoreCache
    from probe.store.tables import ScoresTable, read_scores

    rows = read_prompt_table(request.prompts)
    specs = _check_request(request, rows)
    ctx = ScoringContext(features=FeatureCache(request.cache_dir), device=request.device,
                         clip_model=request.clip_model, base_dir=Path.cwd())
    prepared = prepare_metrics({"*": specs}, ctx)  # loads the models: fails before any folder is made
    started = time.time()
    name = request.name or f"score-{request.images.resolve().name}"
    run = RunDir.create(request.out / name)
    jobs = _job_rows(rows, request, run)
    write_parquet_atomic(jobs, run.path / "jobs.parquet")
    manifest = RunManifest(
        probe_version=package_versions().get("probe", "unknown"), schema_version=SCHEMA_VERSION, suite_name=name,
        suite_path=str(request.prompts),
        suite_sha256="", suite={"images": str(request.images), "prompts": str(request.prompts),
                                "metrics": list(request.metrics), "reference": str(request.reference or "")},
        plan_sha256=hashlib.sha256("".join(jobs["key"]).encode()).hexdigest(), presets={},
        device=device_info(request.device), packages=package_versions(), status="running", started_at=now_iso(),
        counts=RunCounts(planned=len(jobs), cached=len(jobs)),
    )
    run.write_manifest(manifest)
    ctx.run_dir = run.path
    per_probe = [replace(p, probe=probe) for probe in jobs["probe"].unique() for p in prepared]
    counts = score_run(run.path, jobs, per_probe, ctx, progress, sink=ScoresTable(run.path, ScoreCache(ctx.features.root.parent)))
    scores = read_scores(run.path)
    write_parquet_atomic(aggregate(jobs, scores), run.path / "aggregates.parquet")
    models = list(dict.fromkeys(jobs["model"]))
    write_parquet_atomic(paired_deltas(jobs, scores, models[0]), run.path / "deltas.parquet")
    run.write_manifest(manifest.model_copy(update={
        "status": "complete", "finished_at": now_iso(), "wall_seconds": round(time.time() - started, 3),
        "metrics": counts.configs,
    }))
    run.update_latest()
    from probe.run.driver import render_report

    report, report_error = render_report(run.path, request.debug)
    return run.path, {"computed": counts.computed, "reused": counts.reused, "report": report,
                      "report_error": report_error}
