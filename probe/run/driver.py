"""`probe run`: plan -> generate what is missing -> run directory. Resumable, nothing generated twice.

The store is the source of truth for images; the run's progress log says what happened to each key.
Re-running after a kill resumes the same run folder (same plan) and only generates what is missing.

Images are made by an executor (probe.generate.executors), which returns encoded PNG bytes per batch; this
module is the single writer: per batch it stores the PNGs (atomically, fsynced), links them into the run
folder and only then appends the batch to the progress log, so a log line always points at a durable image.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from filelock import FileLock

from probe.errors import ProbeError, UsageError
from probe.generate.executors import Executor, LocalExecutor
from probe.planning.job import Job
from probe.planning.planner import plan_jobs, plan_sha256
from probe.run.folder import RunDir
from probe.run.manifest import build_manifest, finish_manifest
from probe.run.options import RunOptions
from probe.run.records import JobResult, RunCounts, RunManifest
from probe.run.streaming import StreamingScorer
from probe.run.writer import generate_all, pending_jobs
from probe.spec.loader import LoadedSuite, load_suite
from probe.spec.metric_catalog import DEFAULT_CLIP_MODEL
from probe.store.images import ImageStore

log = logging.getLogger(__name__)


class Progress(Protocol):
    """What the runner reports while it works (the CLI draws rich progress bars from it)."""

    def start(self, total: int) -> None: ...
    def group(self, label: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def finish(self) -> None: ...


class NullProgress:
    """Progress that shows nothing (library use, tests)."""

    def start(self, total: int) -> None: ...
    def group(self, label: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def finish(self) -> None: ...


@dataclass
class RunSummary:
    """The outcome of `run_suite`."""

    run_dir: Path
    counts: RunCounts
    wall_seconds: float
    resumed: bool
    failures: list[dict[str, str]] = field(default_factory=list)
    report: Path | None = None
    report_error: str | None = None
    """Why index.html could not be written (the run's data is complete; `probe report RUN` retries)."""


def resolve_device(device: str | None) -> str:
    """The requested device (checked to exist), or CUDA when available, else CPU."""
    import torch

    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":", 1)[0]
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if kind not in available:
        raise UsageError(f"--device {device!r}: use cpu, cuda, cuda:N or mps")
    if not available[kind]:
        raise UsageError(f"--device {device!r}: no {kind} device is available here (torch {torch.__version__})")
    return device


def run_suite(suite_path: str | Path, options: RunOptions, progress: Progress | None = None,
              executor: Executor | None = None) -> RunSummary:
    """Run a suite end to end; see the module docstring for the resume rules.

    `executor` makes the images (default: `choose_executor`); whichever it is, this function alone writes
    the store, the run folder and the progress log.
    """
    progress = progress or NullProgress()
    options.check(Path(suite_path).parent)  # an --out, --cache-dir or --clip-model that would fail only later
    loaded = load_suite(suite_path, max_jobs=options.max_jobs)
    device = resolve_device(options.device)  # scoring's, and generation's unless the executor has its own
    with ExitStack() as held:
        if executor is None:
            executor = choose_executor(options, device)
            held.callback(getattr(executor, "close", lambda: None))
        jobs = plan_jobs(loaded, model_override=options.model_override, limit=options.limit,
                         device=getattr(executor, "device", device))  # under Ray: the cluster's device
        store = ImageStore(options.cache_dir)
        suite_root = options.reports_root / loaded.suite.name
        plan_hash = plan_sha256(jobs)
        missing = [j for j in jobs if not store.has(j.key)]
        scoring = _preflight(missing,  # before any folder is made or work started
                             lambda: prepare_scoring(loaded, jobs, options, getattr(executor, "device", device)),
                             getattr(executor, "preflight", None))
        held.callback(scoring.close)
        if missing:
            getattr(executor, "start", lambda: None)()  # Ray: workers up and checked before any folder exists
        # This machine's device (scoring's); a Ray executor adds the cluster's below (`describe`), so a driver
        # without a GPU never asks torch for a CUDA card's name.
        manifest = build_manifest(loaded, jobs, options, device, plan_hash)
        run, resumed, manifest = _open_run(suite_root, plan_hash, options.new_run, manifest, held)
        started = time.time()
        results = run.read_results()
        todo = pending_jobs(jobs, results, store, run)
        sink = scoring.sink(run.path)
        stream = _stream(run, jobs, todo, scoring, sink, options, progress)
        progress.start(len(todo))
        try:
            generate_all(todo, _init_images(loaded, todo), store, run, executor, options.batch_size, progress,
                         on_durable=stream.offer if stream else None)
            # Ray: the generation actors give their CPUs and GPUs back, so scoring actors waiting for them start
            getattr(executor, "release", lambda: None)()
        except BaseException:
            scoring.interrupted = True
            scoring.close()  # the CPU workers first: the scorer thread may be waiting on them
            if stream is not None:
                stream.close(wait=False)
            raise
        else:
            if stream is not None:
                stream.close()
        finally:
            progress.finish()
        if hasattr(executor, "describe"):  # where the images were made (Ray: the workers' devices)
            manifest.device.update(executor.describe())
        if scoring.device_pool is not None:  # where the device metrics ran (Ray's metric actors)
            manifest.device.update(scoring.device_pool.describe())
        results = run.read_results()
        run.write_jobs(jobs, results)
        counts, failures = _count(jobs, results)
        metric_configs, score_failures = score_and_aggregate(run.path, loaded, scoring, progress, sink)
        wall = time.time() - started
        run.write_manifest(finish_manifest(manifest, counts, failures, wall, metric_configs, score_failures))
        run.update_latest()
        report, report_error = render_report(run.path, options.debug)  # the folder counts as done once it exists
    return RunSummary(run_dir=run.path, counts=counts, wall_seconds=wall, resumed=resumed,
                      failures=failures + score_failures, report=report, report_error=report_error)


def _open_run(suite_root: Path, plan_hash: str, new_run: bool, manifest: RunManifest,
              held: ExitStack) -> tuple[RunDir, bool, RunManifest]:
    """The run folder to work in, locked for this process: the newest unfinished one of this plan, or a new one.

    Choosing is done under a lock on the suite's folder, so two runs started at once cannot both decide to
    create (and fill) their own folder; the second finds the first's folder and is told who holds it.
    """
    suite_root.mkdir(parents=True, exist_ok=True)
    with FileLock(suite_root / ".probe.select.lock", timeout=120):
        run = None if new_run else RunDir.find_resumable(suite_root, plan_hash)
        resumed = run is not None
        run = run or RunDir.create(suite_root)
        held.enter_context(run.lock())
        previous = run.read_manifest()
        if previous is not None:
            manifest = manifest.model_copy(update={"started_at": previous.started_at})
        run.write_manifest(manifest)
    return run, resumed, manifest


def render_report(run_dir: Path, debug: bool = False) -> tuple[Path | None, str | None]:
    """(index.html, None) for a finished run, or (None, why) when it cannot be rendered.

    The run's data is complete and on disk either way, so the caller reports the problem in one line and
    exits non-zero instead of losing the run; `debug` re-raises for the traceback.
    """
    from probe.report import build_report

    try:
        return build_report(run_dir), None
    except Exception as exc:  # noqa: BLE001 - any report bug must not hide a finished run's data
        if debug:
            raise
        log.debug("report of %s failed", run_dir, exc_info=True)
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]


def clip_model_for(loaded: LoadedSuite, jobs: Sequence[Job], options: RunOptions) -> str:
    """The run's one CLIP: --clip-model, else the suite's, else tiny for all-tiny runs, else CLIP ViT-L/14."""
    if options.clip_model:
        return options.clip_model
    if loaded.suite.clip_model:
        return loaded.suite.clip_model
    return "tiny" if all_tiny(jobs) else DEFAULT_CLIP_MODEL


def all_tiny(jobs: Sequence[Job]) -> bool:
    """Every image of the run comes from the embedded tiny model: stand-in scoring networks are used."""
    return bool(jobs) and all(j.preset == "tiny" for j in jobs)


def _stream(run: RunDir, jobs: Sequence[Job], todo: Sequence[Job], scoring: Scoring, sink: Any,
            options: RunOptions, progress: Progress) -> StreamingScorer | None:
    """The scorer working beside generation, when there is something to generate and to score."""
    if not (options.stream_scoring and todo and scoring.prepared):
        return None
    scoring.ctx.run_dir = run.path
    side = getattr(progress, "side", None)
    waiting = {job.key for job in todo}
    ready = {job.key for job in jobs if job.key not in waiting}
    return StreamingScorer(run, jobs, scoring, sink, ready, side("scored beside generation") if side else None)


def prepare_scoring(loaded: LoadedSuite, jobs: Sequence[Job], options: RunOptions, device: str) -> Scoring:
    """Build the run's metrics now, so missing CLIP/Inception weights fail before any image is generated.

    `device` is where the metrics run: this machine's, or under `--executor ray` the cluster's (its metric actors
    compute the device metrics, and the configurations recorded here must be theirs)."""
    from probe.score.cpu_pool import cpu_bound
    from probe.score.protocol import ScoringContext
    from probe.score.scorer import cpu_pool_for, prepare_metrics, ray_pools
    from probe.store.features import FeatureCache

    ctx = ScoringContext(features=FeatureCache(options.cache_dir), device=device,
                         clip_model=clip_model_for(loaded, jobs, options), base_dir=loaded.base_dir,
                         all_tiny=all_tiny(jobs))
    specs = {p.name: list(p.metrics) for p in loaded.suite.probes if p.metrics}
    prepared = prepare_metrics(specs, ctx)
    cpu_probes = {p.probe for p in prepared if cpu_bound(p.metric)}
    images = len({j.key for j in jobs if j.probe in cpu_probes})
    if options.executor == "ray" and prepared:
        pool, device_pool = ray_pools(prepared, ctx, options.score_workers, images)
        return Scoring(ctx=ctx, prepared=prepared, pool=pool, device_pool=device_pool)
    pool = cpu_pool_for(prepared, ctx, options.score_workers, images)
    return Scoring(ctx=ctx, prepared=prepared, pool=pool)


@dataclass
class Scoring:
    """The metrics of a run, built once, the context they share and the CPU workers (started on first use)."""

    ctx: Any
    prepared: list[Any]
    pool: Any = None
    device_pool: Any = None
    """Under `--executor ray`: the metric actors scoring the device metrics (probe.score.ray_device)."""
    interrupted: bool = False
    """The run stopped on an error or Ctrl-C: `close` does not wait for the CPU workers' tasks in hand."""

    def sink(self, run_dir: Path) -> Any:
        """The run's score table, with the cross-run score cache beside the feature cache."""
        from probe.store.score_cache import ScoreCache
        from probe.store.tables import ScoresTable

        return ScoresTable(run_dir, ScoreCache(self.ctx.features.cache_root)) if self.prepared else None

    def close(self) -> None:
        """Stop the CPU workers and the metric actors, if they were started."""
        if self.pool is not None:
            self.pool.close(wait=not self.interrupted)
        if self.device_pool is not None:
            self.device_pool.close()


def score_and_aggregate(run_dir: Path, loaded: LoadedSuite, scoring: Scoring, progress: Progress,
                        sink: Any = None) -> tuple[dict[str, dict[str, object]], list[dict[str, str]]]:
    """Score what the probes list (what is not in `sink` yet), then write aggregates.parquet and deltas.parquet;
    returns the metric configurations and the scores that failed."""
    import pandas as pd

    from probe.analyse.aggregate import aggregate, paired_deltas
    from probe.score.scorer import score_run
    from probe.store.atomic import write_parquet_atomic
    from probe.store.tables import compact_scores

    frame = pd.read_parquet(run_dir / "jobs.parquet")
    configs: dict[str, dict[str, object]] = {}
    failures: list[dict[str, str]] = []
    if scoring.prepared:
        scoring.ctx.run_dir = run_dir
        try:
            counts = score_run(run_dir, frame, scoring.prepared, scoring.ctx, progress,
                               sink=sink if sink is not None else scoring.sink(run_dir), pool=scoring.pool,
                               device=scoring.device_pool)
            configs, failures = counts.configs, counts.failures
        finally:
            progress.finish()
    scores = compact_scores(run_dir)  # the pass's part files folded into scores.parquet, once
    write_parquet_atomic(aggregate(frame, scores), run_dir / "aggregates.parquet")
    subject = loaded.suite.models[0].label
    write_parquet_atomic(paired_deltas(frame, scores, subject), run_dir / "deltas.parquet")
    write_preference(run_dir, frame, scores)
    return configs, failures


def write_preference(run_dir: Path, jobs: Any, scores: Any) -> None:
    """preference.parquet (win rates of every configuration against every other) and elo.parquet."""
    from probe.analyse.preference import preference_tables
    from probe.store.atomic import write_parquet_atomic

    wins, elo = preference_tables(jobs, scores)
    write_parquet_atomic(wins, run_dir / "preference.parquet")
    write_parquet_atomic(elo, run_dir / "elo.parquet")


def _preflight(todo: Sequence[Job], prepare: Callable[[], Scoring],
               nodes: Callable[[Sequence[Job]], list[str]] | None = None) -> Scoring:
    """Check that every pipeline and LoRA the run will load is on disk (without loading them), then build the
    metrics with `prepare`; raise ONE ProbeError listing every problem of both, each with its fix, so a user
    fixes everything in one go instead of meeting the problems one run at a time.

    `nodes` (the Ray executor's `preflight`) checks the pipelines on every node of a cluster instead of here.
    """
    problems: list[str] = []
    if todo and nodes is not None:
        problems += nodes(todo)
    elif todo:
        from probe.generate.loading import job_problems

        seen: set[tuple[object, ...]] = set()
        for job in todo:
            if job.pipeline_key not in seen:
                seen.add(job.pipeline_key)
                problems += [p for p in job_problems(job) if p not in problems]  # jobs share LoRAs and bases
    try:
        scoring = prepare()
    except ProbeError as error:
        if not problems:
            raise
        problems.append(str(error))
    if problems:
        items = "\n".join("  - " + problem.replace("\n", "\n    ") for problem in problems)
        raise ProbeError(f"cannot start the run, nothing was generated; {len(problems)} problem(s):\n{items}")
    return scoring


def choose_executor(options: RunOptions, device: str) -> Executor:
    """The executor of a run: in-process (`local`), or Ray actors (`--executor ray`, connected here).

    The one place an executor is picked. It is called before planning (a Ray cluster decides the jobs'
    device) and before any run folder exists, so an executor that cannot start (a cluster out of reach, Ray
    not installed) fails like missing weights do, with nothing made.
    """
    if options.executor == "ray":
        from probe.generate.ray_executor import RayExecutor

        return RayExecutor(address=options.address, workers=options.workers).connect()
    return LocalExecutor(device)


def _init_images(loaded: LoadedSuite, jobs: Sequence[Job]) -> dict[str, bytes]:
    """The init image files the img2img jobs among `jobs` use: their bytes by sha256, which is what the keys
    name, so an executor anywhere gets exactly the pixels the keys promise (a file changed since the suite
    was loaded is refused: its images would be stored under the old content's keys)."""
    wanted = {j.init_image_sha256 for j in jobs if j.init_image_sha256}
    images: dict[str, bytes] = {}
    for items in loaded.init_images.values():
        for item in items:
            if item.sha256 in wanted and item.sha256 not in images:
                data = item.absolute.read_bytes()
                if hashlib.sha256(data).hexdigest() != item.sha256:
                    raise ProbeError(f"init image {item.absolute} changed after the suite was loaded (the keys "
                                     "name its old content); run again")
                images[item.sha256] = data
    return images


def _count(jobs: Sequence[Job], results: dict[str, JobResult]) -> tuple[RunCounts, list[dict[str, str]]]:
    """Counts per planned job (not per key) and the failures with their errors."""
    counts = RunCounts(planned=len(jobs))
    failures: list[dict[str, str]] = []
    for job in jobs:
        result = results.get(job.key)
        status = result.status if result else "failed"
        setattr(counts, status, getattr(counts, status) + 1)
        if status == "failed":
            error = (result.error if result else None) or "not generated"
            failures.append({"key": job.key, "probe": job.probe, "model": job.model, "prompt": job.prompt,
                             "seed": str(job.seed), "steps": str(job.steps), "error": error})
    return counts, failures
