"""Reading what a gate judges: a run folder's manifest and tables, and JSON files, with every problem named.

`probe check` must never gate on something it misread, nor show a traceback for a broken input: a file that
is missing, not UTF-8, not JSON, a corrupt parquet or one lacking the columns a gate needs is a UsageError
(exit 2) naming the file and what is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from probe.errors import UsageError
from probe.store.reading import read_json, read_table
from probe.store.tables import RunTables, load_run_tables

__all__ = ["ManifestView", "RunState", "first_error", "read_json", "read_run", "read_table"]

#: jobs.parquet columns a gate reads (pairing uses the item columns it finds; older runs lack some).
REQUIRED_JOBS = ("key", "probe", "model", "prompt", "image")


class RunCountsView(BaseModel):
    """manifest.json `counts` (probe.run.records.RunCounts), read leniently: older runs may lack some."""

    model_config = ConfigDict(extra="allow")

    planned: int | None = None
    generated: int = 0
    cached: int = 0
    failed: int = 0


class RunState(BaseModel):
    """Whether a run finished: its status and counts (a manifest's, or a baseline file's provenance)."""

    model_config = ConfigDict(extra="allow")

    status: Literal["running", "complete", "failed"] | None = None
    counts: RunCountsView | None = None
    score_failures: list[dict[str, Any]] | None = None
    """Images or groups a metric raised on (they have no score row)."""


class ManifestView(RunState):
    """The manifest fields a gate relies on; run folders built by hand or by older versions hold only these."""

    suite_name: str
    suite: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = Field(default_factory=dict)
    schema_version: int | None = None


def first_error(exc: ValidationError) -> str:
    """'field.path: message' of a pydantic error (and how many more there are)."""
    errors = exc.errors()
    where = ".".join(str(p) for p in errors[0]["loc"])
    message = errors[0]["msg"].removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where + ': ' if where else ''}{message}{more}"


def read_run(path: Path, what: str = "run") -> RunTables:
    """A run folder's manifest, jobs and scores (`load_run_tables`, which names any unreadable file), with the
    manifest fields and job columns a gate relies on checked; UsageError naming the file otherwise."""
    tables = load_run_tables(Path(path), what)
    file = tables.path / "manifest.json"
    try:
        ManifestView.model_validate(tables.manifest)
    except ValidationError as exc:
        raise UsageError(f"{what} {file}: not a run manifest ({first_error(exc)})") from None
    missing = [c for c in REQUIRED_JOBS if c not in tables.jobs.columns]
    if missing:
        raise UsageError(f"{what} {tables.path / 'jobs.parquet'}: lacks the column(s) {', '.join(missing)}")
    return tables
