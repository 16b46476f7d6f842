"""Records of a run: what happened to each job (JobResult), the counts, and manifest.json (RunManifest).

Pure data (pydantic); written only by the driver (probe.run.driver), read by everything downstream.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from probe.store.tables import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "JobResult", "RunCounts", "RunManifest"]


class JobResult(BaseModel):
    """What happened to one job in one run; appended to the run's progress log as it happens."""

    model_config = ConfigDict(extra="forbid")

    key: str
    status: Literal["generated", "cached", "failed"]
    seconds: float | None = Field(default=None, description="Wall seconds per image (batch time / batch size).")
    error: str | None = None
    device: str | None = Field(default=None, description="The device that made the image (a CUDA card's name).")


class RunCounts(BaseModel):
    """Job counts of a run: planned = generated + cached + failed once the run is complete."""

    model_config = ConfigDict(extra="forbid")

    planned: int = 0
    generated: int = 0
    cached: int = 0
    failed: int = 0


class RunManifest(BaseModel):
    """manifest.json of a run directory: enough to trace every result to what produced it."""

    model_config = ConfigDict(extra="forbid")

    probe_version: str
    schema_version: int = Field(default=1, description="Version of the run folder's tables (absent: 1).")
    suite_name: str
    suite_path: str
    suite_sha256: str = Field(description="Hash of the resolved suite (after defaults and overrides).")
    suite: dict[str, object] = Field(description="The resolved suite as data.")
    plan_sha256: str = Field(description="Hash of the ordered job keys; a resumed run must match it.")
    model_override: str | None = None
    limit: int | None = None
    presets: dict[str, dict[str, object]] = Field(description="Per model label: preset, ids, revisions.")
    device: dict[str, object]
    packages: dict[str, str]
    status: Literal["running", "complete", "failed"]
    started_at: str
    finished_at: str | None = None
    wall_seconds: float | None = None
    counts: RunCounts = Field(default_factory=RunCounts)
    failures: list[dict[str, str]] = Field(default_factory=list)
    score_failures: list[dict[str, str]] = Field(
        default_factory=list, description="Images or groups a metric raised on (no row; scored again next run).")
    metrics: dict[str, dict[str, object]] = Field(
        default_factory=dict, description="Per metric: its configuration (model, revision, preprocessing, config_id)."
    )
