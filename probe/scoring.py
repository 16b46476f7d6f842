"""Scoring stage: run directory images -> scores.parquet (long format), incrementally.

Per-image metrics score each image key once per metric configuration; set metrics score each group
(probe x model x steps x strength, plus any `group_by` variables) against its reference, with a bootstrap
CI over prompts from resampled feature rows. Scores already in scores.parquet with the same configuration
are never recomputed, so an interrupted or repeated run only does what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from probe.analysis.stats import CONFIDENCE
from probe.loader import image_files
from probe.metrics.base import ImageItem, ImageMetric, Score, ScoringContext, SetMetric, build_metric
from probe.score_cache import ScoreCache
from probe.suite import MetricSpec
from probe.tables import score_ids, write_parquet_atomic

log = logging.getLogger(__name__)

SCORES = "scores.parquet"
CHUNK = 64
SCORE_COLUMNS = ["metric", "config_id", "score_id", "key", "value", "low", "high", "label", "text", "probe", "model", "steps",
                 "strength", "group", "reference", "set_hash", "n", "n_reference", "extra"]


@dataclass
class ScoreCounts:
    """How many score rows a pass computed and reused, per metric."""

    computed: dict[str, int] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)


def metric_label(name: str, args: dict[str, Any]) -> str:
    """Row name of a metric in results: the name, with its args when a suite gives any ('fid[features=clip]')."""
    if not args:
        return name
    return f"{name}[" + ",".join(f"{k}={args[k]}" for k in sorted(args)) + "]"


def config_id(config: dict[str, Any]) -> str:
    """Short hash of a metric configuration: scores are reused only under the same configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_scores(run_dir: Path) -> pd.DataFrame:
    path = run_dir / SCORES
    return pd.read_parquet(path) if path.is_file() else pd.DataFrame(columns=SCORE_COLUMNS)


class _ScoreWriter:
    """Accumulates new rows and rewrites scores.parquet atomically after each chunk (nothing lost)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.frame = read_scores(run_dir)

    def add(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        new = pd.DataFrame(rows, columns=SCORE_COLUMNS)
        self.frame = new if self.frame.empty else pd.concat([self.frame, new], ignore_index=True)
        write_parquet_atomic(self.frame, self.run_dir / SCORES)


@dataclass(frozen=True)
class PreparedMetric:
    """A metric built and configured for one probe: loading happens here, before any generation or scoring."""

    probe: str
    spec: MetricSpec
    metric: ImageMetric | SetMetric
    config: dict[str, Any]
    config_id: str


def prepare_metrics(specs: dict[str, list[MetricSpec]], ctx: ScoringContext) -> list[PreparedMetric]:
    """Build every metric and resolve its configuration (loads CLIP / Inception): fails fast on missing weights."""
    prepared = []
    for probe, probe_specs in specs.items():
        for spec in probe_specs:
            metric = build_metric(spec.name, spec.args)
            config = {"name": spec.name, "args": spec.args, **metric.config(ctx)}
            prepared.append(PreparedMetric(probe, spec, metric, config, config_id(config)))
    return prepared


def score_run(
    run_dir: Path, jobs: pd.DataFrame, prepared: list[PreparedMetric], ctx: ScoringContext, progress: Any = None
) -> ScoreCounts:
    """Score the images of `jobs` with the prepared metrics; see the module docstring."""
    writer = _ScoreWriter(run_dir)
    counts = ScoreCounts()
    usable = jobs[jobs["image"].notna()]
    for item in prepared:
        rows = usable[usable["probe"] == item.probe]
        name = metric_label(item.spec.name, item.spec.args)
        counts.configs[name] = {**item.config, "config_id": item.config_id}
        if isinstance(item.metric, SetMetric):
            done = _score_sets(item.metric, item.spec, item.config_id, name, item.probe, rows, run_dir, ctx, writer,
                               progress)
        else:
            done = _score_images(item.metric, item.config_id, name, item.probe, rows, run_dir, ctx, writer, progress)
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


def _score_images(metric: ImageMetric, cid: str, label: str, probe: str, rows: pd.DataFrame, run_dir: Path,
                  ctx: ScoringContext, writer: _ScoreWriter, progress: Any) -> tuple[int, int]:
    existing = writer.frame
    have = set(existing.loc[existing["config_id"] == cid, "score_id"])  # a config id names one configuration
    items = _scored_items(rows, run_dir)
    cache = ScoreCache(ctx.features.root.parent)
    cached = cache.rows(label, cid)
    writer.add([row for sid in items if sid not in have and sid in cached for row in cached[sid]])
    todo = [(sid, item) for sid, item in items.items() if sid not in have and sid not in cached]
    if progress is not None and todo:
        progress.group(f"score {label} ({probe})", len(todo))
    for chunk in _rounds(todo):
        by_key = {item.key: sid for sid, item in chunk}
        scores = metric.score([item for _, item in chunk], ctx)
        new_rows = [_image_row(s, cid, label, by_key[s.key]) for s in scores if s.key is not None]
        writer.add(new_rows)
        cache.add(label, cid, new_rows)
        if progress is not None:
            progress.advance(len(chunk))
    return len(todo), len(items) - len(todo)


def _image_row(score: Score, cid: str, label: str, sid: str) -> dict[str, Any]:
    """A scores.parquet row; a metric writing several rows (ocr) keeps their names, suffixed like its label."""
    name = score.metric + label[len(label.split("[")[0]):]
    return {"metric": name, "config_id": cid, "score_id": sid, "key": score.key, "value": score.value,
            "label": score.label, "text": score.text, "extra": json.dumps(score.extra, default=str) if score.extra else None}


def _score_sets(metric: SetMetric, spec: MetricSpec, cid: str, label: str, probe: str, rows: pd.DataFrame, run_dir: Path,
                ctx: ScoringContext, writer: _ScoreWriter, progress: Any) -> tuple[int, int]:
    """One row per group: value, bootstrap CI over prompts, sizes; skipped if already there unchanged."""
    assert spec.reference is not None
    by = ["model", "steps", "strength", *(f"var_{g}" for g in spec.group_by)]
    groups = list(rows.groupby(by, dropna=False, sort=False))
    if progress is not None and groups:
        progress.group(f"score {label} ({probe})", len(groups))
    computed = reused = 0
    existing = writer.frame
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
        if ((existing["metric"] == label) & (existing["config_id"] == cid) & (existing["set_hash"] == set_hash)
                & (existing["probe"] == probe)).any():
            reused += 1
            continue
        ref_id = _set_hash([], reference_items)
        if ref_id not in references:
            references[ref_id] = metric.embed(reference_items, ctx)
        writer.add([_set_row(metric, cid, label, probe, coords, group, items, references[ref_id], reference_items,
                             reference_name, set_hash, ctx)])
        computed += 1
    return computed, reused


def _set_row(metric: SetMetric, cid: str, label: str, probe: str, coords: dict[str, Any], group: pd.DataFrame,
             items: list[ImageItem], reference: np.ndarray, reference_items: list[ImageItem], reference_name: str,
             set_hash: str, ctx: ScoringContext) -> dict[str, Any]:
    features = metric.embed(items, ctx)
    value: float | None = None
    low: float | None = None
    high: float | None = None
    try:
        point, extra = metric.compare(features, reference)
    except ValueError as exc:  # e.g. a group too small for the metric: recorded, not fatal
        log.warning("%s for %s/%s steps=%s: %s", metric.name, probe, coords["model"], coords["steps"], exc)
        extra = {"error": str(exc)}
    else:
        prompts = group.drop_duplicates("key").set_index("key").loc[[i.key for i in items], "prompt"].to_numpy()
        value = point
        low, high = _bootstrap_set(metric, features, reference, prompts, point)
        extra = {**extra, "ci_resamples": metric.ci_resamples, "ci": "basic bootstrap over prompts of the evaluated set"}
    variables = {k: v for k, v in coords.items() if k.startswith("var_")}
    return {"metric": label, "config_id": cid, "key": None, "value": value, "low": low, "high": high,
            "probe": probe, "model": coords["model"], "steps": coords["steps"],
            "strength": None if pd.isna(coords["strength"]) else coords["strength"],
            "group": json.dumps(variables) if variables else None,
            "reference": reference_name, "set_hash": set_hash, "n": len(items),
            "n_reference": len(reference_items), "extra": json.dumps(extra, default=str)}


def _bootstrap_set(metric: SetMetric, features: np.ndarray, reference: np.ndarray, prompts: np.ndarray,
                   value: float) -> tuple[float | None, float | None]:
    """Percentile CI of the set metric, resampling the evaluated set's prompts (clusters) with replacement."""
    labels, inverse = np.unique(prompts, return_inverse=True)
    if len(labels) < 2 or metric.ci_resamples < 2:
        return None, None
    members = [np.flatnonzero(inverse == c) for c in range(len(labels))]
    rng = np.random.default_rng(0)
    stats = []
    for _ in range(metric.ci_resamples):
        picks = rng.integers(0, len(labels), size=len(labels))
        index = np.concatenate([members[p] for p in picks])
        try:
            stats.append(metric.compare(features[index], reference)[0])
        except ValueError:
            continue  # a resample too small for the metric (e.g. KID subsets); skip it
    if len(stats) < 2:
        return None, None
    # Basic (reverse-percentile) interval: resampling with replacement duplicates images, which biases
    # distance estimators such as biased MMD or FID upwards; reflecting the quantiles around the point
    # estimate cancels that shift. Distances are >= 0, so the lower end is clipped at 0.
    alpha = (1 - CONFIDENCE) / 2
    q_low, q_high = np.quantile(stats, [alpha, 1 - alpha])
    return max(0.0, float(2 * value - q_high)), float(2 * value - q_low)


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
