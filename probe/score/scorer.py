"""Scoring stage: run directory images -> scores.parquet (long format), incrementally.

Per-image metrics score each image key once per metric configuration; set metrics score each group
(probe x model x steps x strength, plus any `group_by` variables) against its reference, with a jackknife
CI over prompts from the feature rows (probe.stats.jackknife). Scores already in scores.parquet with the same
configuration are never recomputed, so an interrupted or repeated run only does what is missing. Rows go to a
`ScoreSink` the caller owns (the run driver passes probe.store.tables.ScoresTable): the pass reads images and
hands rows over, it does not pick the file.

A metric's identity is data: every row carries `metric` (the base name the metric writes: fid, ocr_cer,
perceived_gender), `args` (the suite's arguments as canonical JSON, "" for none), `config_id` (a hash of the
whole resolved configuration) and `series`, the display label derived from the first two
(`fid[features=clip]`). Results group by series; directions, bias sections and gates look up `metric`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from probe.errors import ProbeError
from probe.score.protocol import ImageItem, ImageMetric, Score, ScoringContext, SetMetric, build_metric
from probe.spec.loader import image_files
from probe.spec.schema import MetricSpec
from probe.stats.jackknife import METHOD, make_design
from probe.store.tables import group_columns, group_label, group_of, score_ids

log = logging.getLogger(__name__)

CHUNK = 64



@dataclass
class ScoreCounts:
    """How many score rows a pass computed and reused, per metric."""

    computed: dict[str, int] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    """Scores that could not be computed (the metric raised on an image or a group): the pass goes on, the
    image or group has no row (so the next run tries again), and the run ends listing them (exit 1)."""


def metric_label(name: str, args: dict[str, Any]) -> str:
    """Display label (the `series`) of a metric: the name, with its args when a suite gives any ('fid[features=clip]')."""
    if not args:
        return name
    return f"{name}[" + ",".join(f"{k}={args[k]}" for k in sorted(args)) + "]"


def canonical_args(args: dict[str, Any]) -> str:
    """The `args` column: a metric's suite arguments as canonical JSON ("" when there are none)."""
    return json.dumps(args, sort_keys=True, separators=(",", ":"), default=str) if args else ""


def config_id(config: dict[str, Any]) -> str:
    """Short hash of a metric configuration: scores are reused only under the same configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ScoreSink(Protocol):
    """Where a scoring pass's rows go: the caller (the run driver) owns the files; the pass only hands rows over.

    `frame` is every row written so far (what is already scored); `reuse` takes rows computed before under
    the same configuration (by another run: the cross-run score cache) and says which score ids it had;
    `add` appends rows, dropping the rows `replace` selects in the same write (a set row whose images
    changed replaces its stale row).
    """

    @property
    def frame(self) -> pd.DataFrame: ...

    def reuse(self, config_id: str, wanted: list[str], outputs: frozenset[str] = frozenset()) -> set[str]: ...

    def add(self, rows: list[dict[str, Any]], replace: pd.Series | None = None) -> None: ...


@dataclass(frozen=True)
class PreparedMetric:
    """A metric built and configured for one probe: loading happens here, before any generation or scoring."""

    probe: str
    spec: MetricSpec
    metric: ImageMetric | SetMetric
    config: dict[str, Any]
    config_id: str


def prepare_metrics(specs: dict[str, list[MetricSpec]], ctx: ScoringContext) -> list[PreparedMetric]:
    """Build every metric and resolve its configuration (loads CLIP / Inception): fails fast on missing weights.

    Every metric is tried, and all their ProbeErrors come back as one (each distinct problem once, with the
    metrics that need it), so one attempt shows everything that is missing.
    """
    prepared = []
    failures: dict[str, list[str]] = {}  # message -> metric@probe names that hit it
    first: ProbeError | None = None
    for probe, probe_specs in specs.items():
        for spec in probe_specs:
            try:
                metric = build_metric(spec.name, spec.args)
                config = {"name": spec.name, "args": spec.args, **metric.config(ctx)}
            except ProbeError as error:
                first = first or error
                failures.setdefault(str(error), []).append(f"{metric_label(spec.name, spec.args)} in {probe}")
                continue
            prepared.append(PreparedMetric(probe, spec, metric, config, config_id(config)))
    if first is not None and len(failures) == 1:
        raise first  # one problem: keep its type (a UsageError exits 2) and its message as they were
    if failures:
        lines = [f"  - {message} (needed by {', '.join(users)})" for message, users in failures.items()]
        raise ProbeError(f"{len(failures)} metric problems:\n" + "\n".join(lines))
    return prepared


def _outputs(metric: object) -> dict[str, dict[str, str]]:
    """The rows a metric writes with their directions, for the manifest: a report re-rendered where the metric's
    package is not installed still knows which way is better."""
    info = getattr(metric, "info", None)
    outputs = getattr(info, "outputs", None) or {}
    return {row: {"direction": out.direction, "description": out.description} for row, out in outputs.items()}


def score_run(
    run_dir: Path, jobs: pd.DataFrame, prepared: list[PreparedMetric], ctx: ScoringContext, progress: Any = None,
    *, sink: ScoreSink,
) -> ScoreCounts:
    """Score the images of `jobs` (read from `run_dir`) with the prepared metrics, handing rows to `sink`."""
    writer = sink
    counts = ScoreCounts()
    usable = jobs[jobs["image"].notna()]
    for item in prepared:
        rows = usable[usable["probe"] == item.probe]
        name = metric_label(item.spec.name, item.spec.args)
        counts.configs[name] = {**item.config, "config_id": item.config_id, "outputs": _outputs(item.metric)}
        if isinstance(item.metric, SetMetric):
            done = _score_sets(item, name, rows, run_dir, ctx, writer, progress, counts.failures)
        else:
            done = _score_images(item, name, rows, run_dir, ctx, writer, progress, counts.failures)
        counts.computed[name] = counts.computed.get(name, 0) + done[0]
        counts.reused[name] = counts.reused.get(name, 0) + done[1]
    return counts


def _items(rows: pd.DataFrame, run_dir: Path) -> list[ImageItem]:
    """One ImageItem per distinct key (for set metrics, which only look at pixels)."""
    unique = rows.drop_duplicates("key")
    return [ImageItem(key=r.key, path=run_dir / r.image, prompt=r.prompt, text=None if pd.isna(r.text) else r.text)
            for r in unique.itertuples()]


def _scored_items(rows: pd.DataFrame, run_dir: Path) -> dict[str, ImageItem]:
    """One ImageItem per distinct score id (image + prompt + target text)."""
    unique = rows.assign(score_id=score_ids(rows)).drop_duplicates("score_id")
    return {r.score_id: ImageItem(key=r.key, path=run_dir / r.image, prompt=r.prompt,
                                  text=None if pd.isna(r.text) else r.text) for r in unique.itertuples()}


def _rounds(todo: list[tuple[str, ImageItem]]) -> list[list[tuple[str, ImageItem]]]:
    """Chunks in which every image key appears once, so each returned Score maps back to one score id."""
    rounds: list[list[tuple[str, ImageItem]]] = []
    for sid, item in todo:
        for chunk in rounds:
            if len(chunk) < CHUNK and all(other.key != item.key for _, other in chunk):
                chunk.append((sid, item))
                break
        else:
            rounds.append([(sid, item)])
    return rounds


def _score_images(item: PreparedMetric, label: str, rows: pd.DataFrame, run_dir: Path, ctx: ScoringContext,
                  writer: ScoreSink, progress: Any, failures: list[dict[str, str]]) -> tuple[int, int]:
    assert isinstance(item.metric, ImageMetric)
    cid = item.config_id
    existing = writer.frame
    have = set(existing.loc[existing["config_id"] == cid, "score_id"])  # a config id names one configuration
    items = _scored_items(rows, run_dir)
    outputs = frozenset(getattr(getattr(item.metric, "info", None), "outputs", None) or ())
    cached = writer.reuse(cid, [sid for sid in items if sid not in have], outputs)
    todo = [(sid, image) for sid, image in items.items() if sid not in have and sid not in cached]
    if progress is not None and todo:
        progress.group(f"score {label} ({item.probe})", len(todo))
    for chunk in _rounds(todo):
        by_key = {image.key: sid for sid, image in chunk}
        scores = _score_chunk(item, label, [image for _, image in chunk], ctx, rows, failures)
        new_rows = [_image_row(s, item, by_key[s.key]) for s in scores if s.key is not None]
        writer.add(new_rows)
        if progress is not None:
            progress.advance(len(chunk))
    return len(todo), len(items) - len(todo)


def _score_chunk(item: PreparedMetric, label: str, images: list[ImageItem], ctx: ScoringContext, rows: pd.DataFrame,
                 failures: list[dict[str, str]]) -> list[Score]:
    """A chunk's scores; when the metric raises, each image is tried alone and only the ones that fail are
    recorded as failures (any exception: one bad image must not stop the other images or metrics)."""
    try:
        return list(item.metric.score(images, ctx))  # type: ignore[union-attr]
    except Exception as exc:  # noqa: BLE001 - recorded per image below, with its error
        if len(images) == 1:
            log.debug("%s failed on %s", label, images[0].key, exc_info=True)
            failures.append(_failure(label, item.probe, rows[rows["key"] == images[0].key], exc))
            return []
    return [score for image in images for score in _score_chunk(item, label, [image], ctx, rows, failures)]


def _failure(label: str, probe: str, rows: pd.DataFrame, exc: BaseException) -> dict[str, str]:
    """A failed score in the shape of a failed job (manifest.json `score_failures`, the CLI's failure lines)."""
    first = rows.iloc[0] if not rows.empty else pd.Series(dtype=object)
    return {"key": str(first.get("key", "")), "probe": probe, "model": str(first.get("model", "")),
            "prompt": str(first.get("prompt", "")), "seed": str(first.get("seed", "-")),
            "steps": str(first.get("steps", "-")), "error": f"score {label}: {type(exc).__name__}: {exc}"}


def _image_row(score: Score, item: PreparedMetric, sid: str) -> dict[str, Any]:
    """A scores.parquet row; a metric writing several rows (ocr) keeps their names as `metric`, one config."""
    return {"metric": score.metric, "args": canonical_args(item.spec.args),
            "series": metric_label(score.metric, item.spec.args), "config_id": item.config_id, "score_id": sid,
            "key": score.key, "value": score.value, "label": score.label, "text": score.text,
            "extra": dict(score.extra) if score.extra else None}


def _score_sets(item: PreparedMetric, label: str, rows: pd.DataFrame, run_dir: Path, ctx: ScoringContext,
                writer: ScoreSink, progress: Any, failures: list[dict[str, str]]) -> tuple[int, int]:
    """One row per group: value, jackknife CI over prompts, sizes; skipped if already there unchanged."""
    spec = item.spec
    assert spec.reference is not None and isinstance(item.metric, SetMetric)
    by = ["model", "steps", "strength", *(f"var_{g}" for g in spec.group_by)]
    groups = list(rows.groupby(by, dropna=False, sort=False))
    if progress is not None and groups:
        progress.group(f"score {label} ({item.probe})", len(groups))
    computed = reused = 0
    references: dict[str, np.ndarray] = {}  # one array per reference set, so metrics reuse its statistics
    for values, group in groups:
        coords = dict(zip(by, values if isinstance(values, tuple) else (values,), strict=True))
        reference_items, reference_name = _reference(spec, rows, coords, run_dir, ctx)
        items = _items(group, run_dir)
        set_hash = _set_hash(items, reference_items)
        if progress is not None:
            progress.advance(1)
        if {i.key for i in items} == {i.key for i in reference_items} or not reference_items:
            continue  # the reference itself, or nothing to compare with
        existing = writer.frame
        same_group = _same_group(existing, label, item.probe, coords, reference_name)
        if (same_group & (existing["config_id"] == item.config_id) & (existing["set_hash"] == set_hash)).any():
            reused += 1
            continue
        ref_id = _set_hash([], reference_items)
        try:
            if ref_id not in references:
                references[ref_id] = item.metric.embed(reference_items, ctx)
            row = _set_row(item, label, coords, items, references[ref_id], reference_items, reference_name,
                           set_hash, ctx)
        except Exception as exc:  # noqa: BLE001 - one group's failure is recorded; the other groups go on
            log.debug("%s failed on group %s", label, coords, exc_info=True)
            where = {"model": str(coords["model"]), "steps": str(coords["steps"]),
                     "prompt": group_label(group_of(coords)) or "all prompts"}
            failures.append(_failure(label, item.probe, group.iloc[0:0], exc) | where)
            continue
        writer.add([row], replace=same_group)  # a group whose images changed replaces its stale row
        computed += 1
    return computed, reused


def _same_group(frame: pd.DataFrame, label: str, probe: str, coords: dict[str, Any], reference: str) -> pd.Series:
    """Set rows of this series, group and reference (any configuration), missing coordinates equal to missing.

    One metric listed twice with two references (cmmd vs sd21 and vs a folder) keeps both rows.
    """
    mask = (frame["series"] == label) & (frame["probe"] == probe) & frame["key"].isna()
    mask &= frame["reference"] == reference
    for column in ("model", "steps", "strength"):
        value = coords[column]
        mask &= frame[column].isna() if pd.isna(value) else frame[column] == value
    variables = {k: v for k, v in coords.items() if k.startswith("var_")}
    for column in sorted({*group_columns(frame), *variables}):
        present = frame[column] if column in frame else pd.Series(None, index=frame.index, dtype=object)
        mask &= present.isna() if column not in variables else present == variables[column]
    return mask


def _set_row(item: PreparedMetric, label: str, coords: dict[str, Any], items: list[ImageItem], reference: np.ndarray,
             reference_items: list[ImageItem], reference_name: str, set_hash: str, ctx: ScoringContext) -> dict[str, Any]:
    metric = item.metric
    assert isinstance(metric, SetMetric)
    features = metric.embed(items, ctx)
    value: float | None = None
    low: float | None = None
    high: float | None = None
    se: float | None = None
    df: float | None = None
    try:
        point, extra = metric.compare(features, reference)
    except ValueError as exc:  # e.g. a group too small for the metric: recorded, not fatal
        log.warning("%s for %s/%s steps=%s: %s", metric.name, item.probe, coords["model"], coords["steps"], exc)
        extra = {"error": str(exc)}
    else:
        paired = item.spec.reference is not None and item.spec.reference.model is not None
        design = make_design(np.array([i.prompt for i in items]),
                             np.array([i.prompt for i in reference_items]) if paired else None,
                             max_groups=metric.ci_groups, n_reference=len(reference_items))
        interval = metric.interval(features, reference, design, point, extra)
        value, low, high, se, df = point, interval.low, interval.high, interval.se, interval.df
        extra = {**extra, "ci": METHOD, "ci_groups": design.n_x_groups,
                 "ci_design": "paired prompts" if paired else "independent reference",
                 **({"ci_reason": interval.reason} if interval.reason else {})}
    variables = {k: v for k, v in coords.items() if k.startswith("var_")}
    return {"metric": item.spec.name, "args": canonical_args(item.spec.args), "series": label,
            "config_id": item.config_id, "key": None, "value": value, "low": low, "high": high, "se": se, "df": df,
            "probe": item.probe, "model": coords["model"], "steps": coords["steps"],
            "strength": None if pd.isna(coords["strength"]) else coords["strength"],
            **{k: str(v) for k, v in variables.items()},
            "reference": reference_name, "set_hash": set_hash, "n": len(items),
            "n_reference": len(reference_items), "extra": extra}


def _reference(spec: MetricSpec, rows: pd.DataFrame, coords: dict[str, Any], run_dir: Path,
               ctx: ScoringContext) -> tuple[list[ImageItem], str]:
    """The reference images for one group: another model's images (same group_by values) or a folder."""
    ref = spec.reference
    assert ref is not None
    if ref.folder is not None:
        return _folder_items(ctx.base_dir / ref.folder), f"folder:{ref.folder}"
    mask = rows["model"] == ref.model
    if ref.steps is not None:
        mask &= rows["steps"] == ref.steps
    if not pd.isna(coords["strength"]) and (rows.loc[mask, "strength"] == coords["strength"]).any():
        mask &= rows["strength"] == coords["strength"]  # img2img: the reference at the same strength, not pooled
    for column, value in coords.items():
        if column.startswith("var_"):
            mask &= rows[column] == value
    name = f"model:{ref.model}" + (f"@{ref.steps}" if ref.steps is not None else "")
    return _items(rows[mask], run_dir), name


def _folder_items(folder: Path) -> list[ImageItem]:
    """Images of a reference folder, keyed by content hash (so a changed file is a different item)."""
    return [ImageItem(key=hashlib.sha256(p.read_bytes()).hexdigest(), path=p, prompt="")
            for p in image_files(folder)]


def _set_hash(items: Sequence[ImageItem], reference: Sequence[ImageItem]) -> str:
    digest = hashlib.sha256()
    for key in sorted(i.key for i in items):
        digest.update(key.encode())
    digest.update(b"|")
    for key in sorted(i.key for i in reference):
        digest.update(key.encode())
    return digest.hexdigest()[:16]
