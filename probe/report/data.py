"""What a report reads from a run directory: the manifest and the parquet tables, nothing else.

Aggregates and deltas are read from their parquet files when the run wrote them and recomputed from
jobs + scores (with the same functions `probe run` uses) when it did not, so old runs still render.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

JOB_DEFAULTS: dict[str, Any] = {"mode": "txt2img", "steps": None, "strength": None, "init_image": None, "text": None,
                                "seconds": None, "status": "cached", "seed": None, "preset": None}


@dataclass
class RunData:
    """One run directory loaded for reporting."""

    path: Path
    manifest: dict[str, Any]
    jobs: pd.DataFrame
    scores: pd.DataFrame
    aggregates: pd.DataFrame
    deltas: pd.DataFrame

    @property
    def name(self) -> str:
        """`<suite>/<run-id>`: how the report names a run (never an absolute path; `latest` resolved)."""
        path = self.path.resolve()
        return f"{path.parent.name}/{path.name}"

    @property
    def models(self) -> list[str]:
        """Model labels in suite order (the subject first), then any others seen in the jobs."""
        from probe.store.tables import run_models

        return run_models(self.manifest, self.jobs)

    @property
    def subject(self) -> str | None:
        return self.models[0] if self.models else None

    def probe_kind(self, probe: str) -> str:
        """The probe's kind from the suite (quality | demographic | text | img2img); external images: quality."""
        for item in (self.manifest.get("suite") or {}).get("probes") or []:
            if isinstance(item, dict) and item.get("name") == probe:
                return str(item.get("kind") or "quality")
        return "img2img" if self._is_img2img(probe) else "quality"

    def _is_img2img(self, probe: str) -> bool:
        rows = self.jobs[self.jobs["probe"] == probe]
        return bool((rows["mode"] == "img2img").any())

    @property
    def probes(self) -> list[str]:
        """Probe names in suite order, then any others seen in the jobs."""
        names = [p.get("name") for p in (self.manifest.get("suite") or {}).get("probes") or [] if isinstance(p, dict)]
        names += list(self.jobs["probe"]) if "probe" in self.jobs else []
        return list(dict.fromkeys(str(n) for n in names if n))


def load_run(run_dir: Path) -> RunData:
    """Read a run directory for the report; raise UsageError when it is not one."""
    from probe.analyse.aggregate import aggregate, paired_deltas, with_series
    from probe.store.tables import load_run_tables, read_derived

    run_dir = Path(run_dir)
    tables = load_run_tables(run_dir)  # the one reader of a run's files (schema checked, old scores upgraded)
    jobs, scores = tables.jobs, tables.scores
    for column, default in JOB_DEFAULTS.items():
        if column not in jobs:
            jobs[column] = default
    data = RunData(run_dir, tables.manifest, jobs, scores, pd.DataFrame(), pd.DataFrame())
    agg_path, delta_path = run_dir / "aggregates.parquet", run_dir / "deltas.parquet"
    stored, deltas = read_derived(agg_path), read_derived(delta_path)
    data.aggregates = with_series(stored) if stored is not None else aggregate(jobs, scores)
    data.deltas = with_series(deltas) if deltas is not None else paired_deltas(jobs, scores, data.subject or "")
    return data
