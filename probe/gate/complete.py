"""Whether a run is complete enough to gate on (or to freeze as a baseline).

A half-finished run gates on fewer images than planned, so its verdict would look sure of what it never
saw. A run is complete when its manifest says `status: complete`, every planned job has an image (none
failed, none missing from jobs.parquet) and every image has a score for each per-image metric its probe
lists. Anything else is refused (exit 2) with what is missing, unless the caller allows incomplete runs:
then the problems come back as warnings.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd

from probe.analyse.aggregate import per_image
from probe.errors import UsageError
from probe.gate.files import RunState
from probe.spec.metric_catalog import METRICS
from probe.store.tables import score_ids

#: job statuses with an image (jobs.parquet `status`).
DONE = ("generated", "cached")
#: most per-metric problems listed; the rest are counted.
SHOWN = 5


def state_problems(state: dict[str, Any], jobs: pd.DataFrame | None = None) -> list[str]:
    """What the status and counts (of a manifest, or a baseline's provenance) and the jobs table say is missing."""
    view = RunState.model_validate(state)
    planned = view.counts.planned if view.counts else None
    failed = view.counts.failed if view.counts else 0
    problems = []
    if view.status == "running":
        problems.append("its status is 'running': it was interrupted or is still going (run the same command "
                        "again to finish it)")
    if jobs is not None:
        table = _job_problems(jobs, planned, failed)
    else:
        table = [f"{failed} of {planned} planned jobs failed"] if failed else []
        never = planned - view.counts.generated - view.counts.cached - failed if view.counts and planned else 0
        table += [f"{never} of {planned} planned jobs were never generated"] if never > 0 else []
    if view.score_failures:
        table.append(f"{len(view.score_failures)} score(s) could not be computed (see `score_failures` in its "
                     "manifest)")
    if view.status == "failed" and not table:
        problems.append("its status is 'failed'")
    return problems + table


def _job_problems(jobs: pd.DataFrame, planned: int | None, failed: int) -> list[str]:
    problems = []
    total = max(planned or 0, len(jobs))
    if planned is not None and len(jobs) < planned:
        problems.append(f"jobs.parquet lists {len(jobs)} of the {planned} planned jobs")
    status = jobs["status"] if "status" in jobs.columns else pd.Series("generated", index=jobs.index)
    failed_rows = status == "failed"
    n_failed = max(int(failed_rows.sum()), failed)
    if n_failed:
        problems.append(f"{n_failed} of {total} jobs failed (see `failures` in its manifest)")
    no_image = ~failed_rows & (~status.isin(DONE) | jobs["image"].isna())
    if no_image.any():
        kinds = ", ".join(sorted({str(s) for s in status[no_image]}))
        problems.append(f"{int(no_image.sum())} of {total} jobs have no image (status {kinds})")
    return problems


def score_problems(manifest: dict[str, Any], jobs: pd.DataFrame, scores: pd.DataFrame) -> list[str]:
    """Images without a score for a per-image metric their probe lists (set metrics are not counted)."""
    usable = jobs[jobs["image"].notna()]
    if usable.empty:
        return []
    scored = per_image(jobs, scores)
    problems = []
    for probe, name, args in _listed_metrics(manifest, usable):
        info = METRICS.get(name)
        if info is not None and info.kind == "set":
            continue
        series = {_label(row, args) for row in (info.outputs if info is not None else [name])}
        mine = usable if probe is None else usable[usable["probe"] == probe]
        wanted = set(score_ids(mine))
        have = set(scored.loc[scored["series"].isin(series), "score_id"])
        missing = len(wanted - have)
        if missing:
            where = f" in probe {probe}" if probe is not None else ""
            problems.append(f"{_label(name, args)}{where} has no score for {missing} of {len(wanted)} images")
    if len(problems) > SHOWN:
        problems = [*problems[:SHOWN], f"... and {len(problems) - SHOWN} more metrics with missing scores"]
    return problems


def _listed_metrics(manifest: dict[str, Any], usable: pd.DataFrame) -> Iterable[tuple[str | None, str, dict[str, Any]]]:
    """(probe or None for every probe, metric name, args) the run was asked to score: the suite's probes'
    `metrics`, or for `probe score` (no probes: every metric on every image) the manifest's `metrics`."""
    probes = (manifest.get("suite") or {}).get("probes")
    if isinstance(probes, list) and probes:
        for probe in probes:
            for spec in (probe.get("metrics") or []) if isinstance(probe, dict) else []:
                if isinstance(spec, dict) and isinstance(spec.get("name"), str):
                    yield probe.get("name"), spec["name"], dict(spec.get("args") or {})
        return
    for config in (manifest.get("metrics") or {}).values():
        if isinstance(config, dict) and isinstance(config.get("name"), str):
            yield None, config["name"], dict(config.get("args") or {})


def _label(name: str, args: dict[str, Any]) -> str:
    """A metric row's series, as the scorer labels it (probe.score.scorer.metric_label): 'fid[features=clip]'."""
    return name if not args else f"{name}[" + ",".join(f"{k}={args[k]}" for k in sorted(args)) + "]"


def require_complete(problems: list[str], what: str, subject: str = "the run", *, allow: bool = False,
                     override: str = "--allow-incomplete") -> list[str]:
    """Refuse an incomplete run (a UsageError '<what>: <subject> is incomplete: <problems>') unless `allow`;
    then the same sentence comes back as the one warning."""
    if not problems:
        return []
    message = f"{what}: {subject} is incomplete: " + "; ".join(problems)
    if not allow:
        raise UsageError(f"{message}. Finish the run first, or pass {override} to use it anyway")
    return [message]
