"""`probe score`: score images made elsewhere (a folder plus a file -> prompt table) into a normal run directory.

The images are keyed by content hash and linked into the run folder, so reports, notebooks and `probe check`
work on them exactly as on generated runs. Every listed file is checked before any scoring starts.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import importlib
import inspect
import json
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from probe.errors import UsageError, suggest
from probe.run.folder import RunDir
from probe.run.manifest import device_info, now_iso, package_versions
from probe.run.records import SCHEMA_VERSION, RunCounts, RunManifest
from probe.spec.images import IMAGE_SUFFIXES, image_files
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
    device: str | None = None
    """cpu, cuda, cuda:N, mps; None: CUDA when there is one, else CPU (as `probe run`)."""
    cache_dir: Path | None = None
    debug: bool = False
    score_workers: int | None = None
    """Processes for the CPU-bound metrics; None: one per core, 0: in-process."""
    executor: str = "local"
    """"ray": the CPU-bound metrics run on Ray actors (the cluster's CPUs minus one, or `score_workers`)."""
    address: str | None = None
    """The Ray cluster to join with executor "ray" (None: a local Ray for this command)."""


def read_prompt_table(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV, TSV or JSONL file (UTF-8) with at least `file` and `prompt` columns."""
    if not path.is_file():
        raise UsageError(f"{path}: {'a folder, not a prompts file' if path.is_dir() else 'prompts file not found'}")
    try:
        rows = _jsonl_rows(path) if path.suffix.lower() in (".jsonl", ".ndjson") else _csv_rows(path)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                         "save the prompts table as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not rows:
        raise UsageError(f"{path}: no rows")
    for column in ("file", "prompt"):
        if column not in rows[0]:
            raise UsageError(f"{path}: needs a {column!r} column{suggest(column, rows[0])}")
    return rows


def _jsonl_rows(path: Path) -> list[dict[str, str]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if line.strip():
            try:
                rows.append({k: "" if v is None else str(v) for k, v in json.loads(line).items()})
            except (json.JSONDecodeError, AttributeError):
                raise UsageError(f"{path}:{number}: not a JSON object") from None
    return rows


def _csv_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV/TSV; a header naming a column twice or a row with more values than columns is an error."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",", strict=True)
        try:
            header = list(reader.fieldnames or [])
            twice = sorted({c for c in header if header.count(c) > 1})
            if twice:
                raise UsageError(f"{path}: the header names column(s) {', '.join(map(repr, twice))} more than once")
            for column in ("file", "prompt"):
                if header and column not in header:
                    raise UsageError(f"{path}: needs a {column!r} column{suggest(column, header)}")
            rows = []
            for row in reader:
                if None in row:
                    raise UsageError(f"{path}: line {reader.line_num}: more values than the {len(header)} columns "
                                     "of the header (a comma in an unquoted field?)")
                rows.append({k: "" if v is None else v for k, v in row.items()})
        except csv.Error as exc:
            raise UsageError(f"{path}: not readable as CSV after line {reader.line_num} ({exc})") from None
    return rows


def check_request(request: ScoreRequest) -> tuple[list[dict[str, str]], list[MetricSpec]]:
    """The prompt table's rows and the metric specs, once every input is known to be usable: folders, metric
    names and arguments, every row and every listed image. A UsageError (exit 2) before any work otherwise."""
    _check_folders(request)
    specs = _metric_specs(request)
    rows = read_prompt_table(request.prompts)
    _check_rows(request, rows)
    missing = [(n, r["file"]) for n, r in enumerate(rows, start=2) if not (request.images / r["file"]).is_file()]
    if missing:
        listed = ", ".join(f"row {n}: {f}" for n, f in missing[:5])
        raise UsageError(f"{request.prompts}: {len(missing)} listed image(s) not found in {request.images} ({listed})")
    for number, row in enumerate(rows, start=2):
        _verify_image(request.images / row["file"], f"{request.prompts}: row {number}: {row['file']}")
    return rows, specs


def _check_folders(request: ScoreRequest) -> None:
    """The images folder exists; --out is no file; --reference is a folder of readable images."""
    if not request.images.is_dir():
        raise UsageError(f"{request.images}: {'not a folder' if request.images.exists() else 'no such folder'} "
                         "(give the folder that holds the images the prompts table lists)")
    if request.out.exists() and not request.out.is_dir():
        raise UsageError(f"--out {request.out}: not a folder")
    if request.reference is None:
        return
    if not request.reference.is_dir():
        what = "not a folder" if request.reference.exists() else "no such folder"
        raise UsageError(f"--reference {request.reference}: {what} (give a folder of reference images)")
    files = image_files(request.reference)
    if not files:
        raise UsageError(f"no images in --reference {request.reference} (looked for {', '.join(IMAGE_SUFFIXES)})")
    for file in files:
        _verify_image(file, f"--reference {request.reference}: {file.name}")


def _verify_image(path: Path, where: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UsageError(f"{where} is not a readable image ({exc})") from None


def _check_rows(request: ScoreRequest, rows: list[dict[str, str]]) -> None:
    """`file` and `prompt` in every row, seed/steps whole numbers, each image request listed once; errors name
    the row."""
    seen: dict[tuple[object, ...], int] = {}
    for number, row in enumerate(rows, start=2):
        where = f"{request.prompts}: row {number}"
        if not row.get("file") or not row.get("prompt"):
            raise UsageError(f"{where}: needs `file` and `prompt`")
        for column in ("seed", "steps"):
            if row.get(column) and not re.fullmatch(r"\s*[0-9]+\s*", row[column]):
                raise UsageError(f"{where}: {column} {row[column]!r} is not a whole number")
        item = _item_of(row, request)
        if item in seen:
            what = ("the same image twice" if not row.get("seed") else
                    "two images for one model, prompt and seed (pairing needs one)")
            raise UsageError(f"{request.prompts}: rows {seen[item]} and {number} list {what}: model "
                             f"{row.get('model') or request.images.name!r}, prompt {row['prompt']!r}"
                             + (f", seed {row['seed']}" if row.get("seed") else f", file {row['file']!r}"))
        seen[item] = number


def _item_of(row: dict[str, str], request: ScoreRequest) -> tuple[object, ...]:
    """What one row asks to score: a seeded image is one item per model (probe.analyse.pairing), an unseeded
    one is its file."""
    seed = int(row["seed"]) if row.get("seed") else None
    steps = int(row["steps"]) if row.get("steps") else None
    variables = tuple(sorted((k, v) for k, v in row.items() if k not in KNOWN_COLUMNS))
    image = None if seed is not None else row["file"]
    return (row.get("probe") or "images", row.get("model") or request.images.name, row["prompt"],
            row.get("text") or None, seed, steps, variables, image)


def _metric_specs(request: ScoreRequest) -> list[MetricSpec]:
    """A spec per --metrics: known name, arguments the metric accepts, listed once, a reference for set metrics."""
    specs: list[MetricSpec] = []
    for text in request.metrics:
        name, args = parse_metric_option(text)
        info = METRICS.get(name)
        if info is None:
            raise UsageError(f"--metrics: unknown metric {name!r}{suggest(name, METRICS)}")
        check_metric_args(text, info.name, info.target, args)
        if any(s.name == name and s.args == args for s in specs):
            raise UsageError(f"--metrics {text!r}: listed twice")
        if info.kind == "set":
            if request.reference is None:
                raise UsageError(f"--metrics: {name} compares sets of images and needs --reference DIR")
            reference = MetricReference(folder=str(request.reference.resolve()))
            specs.append(MetricSpec(name=name, args=args, reference=reference))
        else:
            specs.append(MetricSpec(name=name, args=args))
    return specs


def check_metric_args(text: str, name: str, target: str, args: dict[str, Any]) -> None:
    """Every argument is one the metric's constructor takes, with a value of its type; UsageError otherwise.

    A metric whose constructor cannot be inspected (taking **kwargs, or not importable: build_metric then says
    why) is left to check its own arguments when it is built.
    """
    parameters = _parameters(target)
    if parameters is None:
        return
    accepted = {n: p for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    listing = ", ".join(accepted) or "none"
    for key, value in args.items():
        if key not in accepted:
            close = difflib.get_close_matches(key, list(accepted), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UsageError(f"--metrics {text!r}: {name} has no argument {key!r} ({hint}it accepts: {listing})")
        problem = _type_problem(accepted[key].annotation, value)
        if problem:
            raise UsageError(f"--metrics {text!r}: {name} argument {key}={value!r}: {problem}")
    required = [n for n, p in accepted.items() if p.default is p.empty and n not in args]
    if required:
        raise UsageError(f"--metrics {text!r}: {name} needs argument(s) {', '.join(required)}")


def _parameters(target: str) -> dict[str, inspect.Parameter] | None:
    """The constructor parameters of a metric's "module:attr" target, annotations resolved where they can be;
    None when there is no fixed list (**kwargs) or the target cannot be imported (build_metric names why)."""
    module_name, _, attr = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        return None
    try:
        signature = inspect.signature(factory, eval_str=True)
    except (NameError, TypeError, ValueError, SyntaxError):  # an annotation only named under TYPE_CHECKING
        try:
            signature = inspect.signature(factory)
        except (TypeError, ValueError):
            return None
    if any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in signature.parameters.values()):
        return None
    return dict(signature.parameters)


def _type_problem(annotation: Any, value: Any) -> str | None:
    """Why `value` does not fit `annotation`, or None (also for a type pydantic cannot check).

    Strict, as the metric is handed the value unconverted: '50' (quoted) is no int and true no number. Where
    only a conversion to something else fits (a folder given as text for a Path), the metric is trusted with it.
    """
    from pydantic import PydanticSchemaGenerationError, TypeAdapter, ValidationError

    if annotation is inspect.Parameter.empty or isinstance(annotation, str):
        return None
    try:
        adapter = TypeAdapter(annotation)
        adapter.validate_python(value, strict=True)
    except ValidationError as exc:
        try:
            converted = adapter.validate_python(value)
        except ValidationError:
            return str(exc.errors()[0]["msg"])
        return str(exc.errors()[0]["msg"]) if isinstance(converted, bool | int | float) else None
    except (PydanticSchemaGenerationError, TypeError):
        return None
    return None


def parse_metric_option(text: str) -> tuple[str, dict[str, Any]]:
    """'kid:features=clip,subset_size=50' -> ('kid', {'features': 'clip', 'subset_size': 50})."""
    import yaml

    name, _, rest = text.partition(":")
    args: dict[str, Any] = {}
    for part in filter(None, rest.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--metrics {text!r}: arguments look like name:key=value,key=value")
        try:
            args[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            args[key.strip()] = value.strip()
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
            "width": width, "height": height, "status": "cached", "image": relative, "seconds": None, "device_name": None,
            "source_file": row["file"], "variables": json.dumps({k[4:]: v for k, v in extra.items()}, sort_keys=True), **extra,
        })
    frame = pd.DataFrame(records)
    frame["seed"] = frame["seed"].astype("Int64")
    return frame


def score_images(request: ScoreRequest, progress: Any = None) -> tuple[Path, dict[str, Any]]:
    """Build the run directory for `request` and score it; returns the folder and the score counts."""
    from probe.run.driver import resolve_device

    rows, specs = check_request(request)
    if request.executor not in ("local", "ray"):
        raise UsageError(f"--executor must be local or ray, not {request.executor!r}")
    if request.address and request.executor != "ray":
        raise UsageError("--address needs --executor ray")
    device = resolve_device(request.device)
    cluster = None
    if request.executor == "ray":  # joined (or started) for the scoring actors; left as it was found
        from probe.generate.ray_executor import RayExecutor

        cluster = RayExecutor(address=request.address).connect()
    try:
        return _score_on(request, rows, specs, device, cluster, progress)
    finally:
        if cluster is not None:
            cluster.close()


def _score_on(request: ScoreRequest, rows: list[dict[str, str]], specs: list[MetricSpec], device: str, cluster: Any,
              progress: Any) -> tuple[Path, dict[str, Any]]:
    """`score_images` once the devices are known: this machine's, or a Ray cluster's (`cluster`)."""
    from probe.analyse.aggregate import aggregate, paired_deltas
    from probe.run.driver import write_preference
    from probe.score.protocol import ScoringContext
    from probe.score.scorer import cpu_pool_for, prepare_metrics, ray_pools, score_run
    from probe.store.features import FeatureCache
    from probe.store.score_cache import ScoreCache
    from probe.store.tables import ScoresTable, compact_scores

    ctx = ScoringContext(features=FeatureCache(request.cache_dir), device=cluster.device if cluster else device,
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
        device=device_info(device), packages=package_versions(), status="running", started_at=now_iso(),
        counts=RunCounts(planned=len(jobs), cached=len(jobs)),
    )
    run.write_manifest(manifest)
    ctx.run_dir = run.path
    per_probe = [replace(p, probe=probe) for probe in jobs["probe"].unique() for p in prepared]
    device_pool = None
    if cluster is not None:
        pool, device_pool = ray_pools(per_probe, ctx, request.score_workers, len(jobs))
        manifest.device.update(device_pool.describe())
    else:
        pool = cpu_pool_for(per_probe, ctx, request.score_workers, len(jobs))
    try:
        counts = score_run(run.path, jobs, per_probe, ctx, progress,
                           sink=ScoresTable(run.path, ScoreCache(ctx.features.cache_root)), pool=pool,
                           device=device_pool)
    finally:
        pool.close()
        if device_pool is not None:
            device_pool.close()
    scores = compact_scores(run.path)  # the parts of this pass, folded into scores.parquet
    write_parquet_atomic(aggregate(jobs, scores), run.path / "aggregates.parquet")
    models = list(dict.fromkeys(jobs["model"]))
    write_parquet_atomic(paired_deltas(jobs, scores, models[0]), run.path / "deltas.parquet")
    write_preference(run.path, jobs, scores)
    failures = list(getattr(counts, "failures", []))  # images or groups a metric raised on: no row, not complete
    run.write_manifest(manifest.model_copy(update={
        "status": "failed" if failures else "complete", "finished_at": now_iso(),
        "wall_seconds": round(time.time() - started, 3), "metrics": counts.configs,
        **({"score_failures": failures} if failures else {}),
    }))
    run.update_latest()
    from probe.run.driver import render_report

    report, report_error = render_report(run.path, request.debug)
    return run.path, {"computed": counts.computed, "reused": counts.reused, "report": report,
                      "report_error": report_error, "failures": failures}
