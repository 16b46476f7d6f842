"""What `probe run` was asked to do beyond the suite: a record the driver and the manifest both read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunOptions:
    """What `probe run` was asked to do, beyond the suite itself."""

    model_override: str | None = None
    limit: int | None = None
    reports_root: Path = Path("reports")
    device: str | None = None
    batch_size: int = 4
    cache_dir: Path | None = None
    new_run: bool = False
    clip_model: str | None = None
    debug: bool = False
