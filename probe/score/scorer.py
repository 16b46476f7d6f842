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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from probe.errors import ProbeError
from probe.score.cpu_pool import POOL_MIN_IMAGES, CpuPool, PooledMetric, poolable
from probe.score.image_pass import score_images
from probe.score.labels import canonical_args, failure_record, metric_label, resolved_config
from probe.score.protocol import ImageItem, ImageMetric, ScoringContext, SetMetric, build_metric
from probe.spec.loader import image_files
from probe.spec.schema import MetricSpec
from probe.stats.jackknife import METHOD, make_design
from probe.store.tables import group_columns, group_label, group_of

if TYPE_CHECKING:
    from probe.score.ray_device import RayDevicePool

log = logging.getLogger(__name__)

@dataclass
class ScoreCounts:
    """How many score rows a pass computed and reused, per metric."""

    computed: dict[str, int] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    """Scores that could not be computed (the metric raised on an image or a group): the pass goes on, the
    image or group has no row (so the next run tries again), and the run ends listing them (exit 1)."""


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
                config = resolved_config(spec.name, spec.args, metric, ctx)
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


def cpu_pool_for(prepared: list[PreparedMetric], ctx: ScoringContext, workers: int | None, images: int,
                 on_ray: bool = False, shipper: Any = None) -> CpuPool:
    """A (lazily started) pool of `workers` processes for the CPU-bound metrics among `prepared`; None: one per
    core, or none when the run has fewer than POOL_MIN_IMAGES `images` for them (in-process is quicker).
    `on_ray`: Ray actors across the cluster instead (None: the cluster's CPUs minus one), sending images through
    `shipper` (probe.score.ray_pool.Shipper, shared with the metric actors)."""
    pooled = {}
    for item in prepared:
        if poolable(item.spec.name, item.metric):
            label = metric_label(item.spec.name, item.spec.args)
            pooled[label] = PooledMetric(label, item.spec.name, dict(item.spec.args))
    if workers is None and images < POOL_MIN_IMAGES:
        workers = 0
    if on_ray and workers != 0:
        from probe.score.ray_pool import RayCpuPool

        return RayCpuPool(list(pooled.values()), ctx, workers, shipper)
    return CpuPool(list(pooled.values()), ctx, workers)


def ray_pools(prepared: list[PreparedMetric], ctx: ScoringContext,
              workers: int | None, images: int) -> tuple[CpuPool, RayDevicePool]:
    """Under `--executor ray`: the CPU metrics' actors and the device metrics' actors (started and checked now,
    so a cluster that configures a metric differently stops the run before any image is made)."""
    from probe.score.ray_device import RayDevicePool, device_poolable
    from probe.score.ray_pool import Shipper

    shipper = Shipper()
    metrics: dict[str, PooledMetric] = {}
    expected: dict[str, dict[str, Any]] = {}
    for item in prepared:
        if device_poolable(item.spec.name, item.metric):
            label = metric_label(item.spec.name, item.spec.args)
            metrics[label] = PooledMetric(label, item.spec.name, dict(item.spec.args))
            expected[label] = item.config
    device = RayDevicePool(list(metrics.values()), ctx, expected, shipper)
    device.start()
    return cpu_pool_for(prepared, ctx, workers, images, on_ray=True, shipper=shipper), device


def _outputs(metric: object) -> dict[str, dict[str, str]]:
    """The rows a metric writes with their directions, for the manifest: a report re-rendered where the metric's
    package is not installed still knows which way is better."""
    info = getattr(metric, "info", None)
    outputs = getattr(info, "outputs", None) or {}
    return {row: {"direction": out.direction, "description": out.description} for row, out in outputs.items()}


def score_run(
    run_dir: Path, jobs: pd.DataFrame, prepared: list[PreparedMetric], ctx: ScoringContext, progress: Any = None,
    *, sink: ScoreSink, pool: CpuPool | None = None, kinds: frozenset[str] = frozenset({"image", "set"}),
    ready: set[str] | None = None, stop: Callable[[], bool] | None = None, device: RayDevicePool | None = None,
) -> ScoreCounts:
    """Score the images of `jobs` (read from `run_dir`) with the prepared metrics, handing rows to `sink`.

    Per probe, its per-image metrics share one pass (probe.score.image_pass: one decode per image, CPU metrics in
    `pool`'s workers), then its set metrics score each group. `kinds` picks which of the two run; with `ready`
    (the keys whose images are durable, while the run still generates) a set group is scored only when all of its
    images and its reference's are ready. `stop` is asked between chunks: a pass that stops early has handed over
    every chunk it finished. `device` (under Ray) scores the device metrics, and embeds the sets' images, on the
    cluster's metric actors.
    """
    counts = ScoreCounts()
    usable = jobs[jobs["image"].notna()]
    for item in prepared:
        name = metric_label(item.spec.name, item.spec.args)
        counts.configs[name] = {**item.config, "config_id": item.config_id, "outputs": _outputs(item.metric)}
    for probe in dict.fromkeys(item.probe for item in prepared):
        rows = usable[usable["probe"] == probe]
        mine = [item for item in prepared if item.probe == probe]
        images = [item for item in mine if not isinstance(item.metric, SetMetric)]
        done: dict[str, tuple[int, int]] = {}
        if images and "image" in kinds:
            done |= score_images(images, rows, run_dir, ctx, sink, progress, counts.failures, pool, stop, device)
        for item in mine:
            if isinstance(item.metric, SetMetric) and "set" in kinds and not (stop is not None and stop()):
                label = metric_label(item.spec.name, item.spec.args)
                done[label] = _score_sets(item, label, rows, run_dir, ctx, sink, progress, counts.failures, ready,
                                          device)
        for name, (computed, reused) in done.items():
            counts.computed[name] = counts.computed.get(name, 0) + computed
            counts.reused[name] = counts.reused.get(name, 0) + reused
    return counts


def _items(rows: pd.DataFrame, run_dir: Path) -> list[ImageItem]:
    """One ImageItem per distinct key (for set metrics, which only look at pixels)."""
    unique = rows.drop_duplicates("key")
    return [ImageItem(key=r.key, path=run_dir / r.image, prompt=r.prompt, text=None if pd.isna(r.text) else r.text)
            for r in unique.itertuples()]


def _score_sets(item: PreparedMetric, label: str, rows: pd.DataFrame, run_dir: Path, ctx: ScoringContext,
                writer: ScoreSink, progress: Any, failures: list[dict[str, str]],
                ready: set[str] | None = None, device: RayDevicePool | None = None) -> tuple[int, int]:
    """One row per group: value, jackknife CI over prompts, sizes; skipped if already there unchanged, and
    (with `ready`) while any image of the group or of its reference is not yet durable."""
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
        if ready is not None and not _complete(items, reference_items, ready, run_dir):
            continue  # still generating: scored when the group is complete
        if {i.key for i in items} == {i.key for i in reference_items} or not reference_items:
            continue  # the reference itself, or nothing to compare with
        existing = writer.frame
        same_group = _same_group(existing, label, item.probe, coords, reference_name)
        if (same_group & (existing["config_id"] == item.config_id) & (existing["set_hash"] == set_hash)).any():
            reused += 1
            continue
        ref_id = _set_hash([], reference_items)
        try:
            if device is not None and device.usable({label}):  # the embeddings made on the metric actors
                device.fetch(label, item.metric, [*items, *([] if ref_id in references else reference_items)])
            if ref_id not in references:
                references[ref_id] = item.metric.embed(reference_items, ctx)
            row = _set_row(item, label, coords, items, references[ref_id], reference_items, reference_name,
                           set_hash, ctx)
        except Exception as exc:  # noqa: BLE001 - one group's failure is recorded; the other groups go on
            log.debug("%s failed on group %s", label, coords, exc_info=True)
            where = {"model": str(coords["model"]), "steps": str(coords["steps"]),
                     "prompt": group_label(group_of(coords)) or "all prompts"}
            failures.append(failure_record(label, item.probe, group.iloc[0:0], f"{type(exc).__name__}: {exc}")
                            | where)
            continue
        writer.add([row], replace=same_group)  # a group whose images changed replaces its stale row
        computed += 1
    return computed, reused


def _complete(items: list[ImageItem], reference: list[ImageItem], ready: set[str], run_dir: Path) -> bool:
    """Every image of the group, and of its reference when that is another model's, is durable."""
    return all(i.key in ready for i in items) and all(i.key in ready for i in reference if i.path.is_relative_to(run_dir))


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
