"""What `probe run` was asked to do beyond the suite: a record the driver and the manifest both read."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from probe.errors import UsageError


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
    max_jobs: int | None = None
    """Most jobs the suite may plan (`--max-jobs`); None keeps probe.spec.limits' default (or the `allow_jobs`
    limit in force). The driver passes it to `load_suite`."""
    score_workers: int | None = None
    """Worker processes for the CPU-bound metrics (faces, skin tone, OCR); None: one per core, 0: in-process."""
    stream_scoring: bool = True
    """Score each batch once it is durable, beside generation (`--no-stream` scores after generation ends)."""
    executor: str = "local"
    """Who generates: "local" (this process, the default) or "ray" (Ray actors; `pip install 'probe[ray]'`)."""
    address: str | None = None
    """Ray cluster to join (`HOST:PORT` or `auto`); None starts a local Ray on this machine."""
    workers: int | None = None
    """Ray generation actors (default: one per GPU, or one per two CPUs on a CPU cluster)."""

    def check(self, suite_dir: Path) -> None:
        """Refuse options that would only fail after the models had loaded: an `--out` or `--cache-dir` that
        cannot be made or written, a `--clip-model` that is not there (relative to `suite_dir` or here).

        Raises:
            UsageError: naming the option and why.
        """
        from probe.spec.checks import clip_model_problem

        problems = [p for p in (folder_problem(self.reports_root, "--out"),
                                folder_problem(self.cache_dir, "--cache-dir") if self.cache_dir else None) if p]
        if self.clip_model and (problem := clip_model_problem(self.clip_model, [suite_dir])):
            problems.append(f"--clip-model: {problem}")
        if self.score_workers is not None and self.score_workers < 0:
            problems.append(f"--score-workers must be 0 (in-process) or more, not {self.score_workers}")
        if self.executor not in ("local", "ray"):
            problems.append(f"--executor must be local or ray, not {self.executor!r}")
        elif self.executor == "local" and (self.address or self.workers):
            problems.append("--address and --workers need --executor ray")
        if self.workers is not None and self.workers < 1:
            problems.append(f"--workers must be at least 1, not {self.workers}")
        if self.max_jobs is not None and self.max_jobs < 1:
            problems.append(f"--max-jobs must be at least 1, not {self.max_jobs}")
        if problems:
            raise UsageError("; ".join(problems) + "; nothing was run")


def folder_problem(folder: Path, flag: str) -> str | None:
    """Why `folder` cannot be used as an output folder (None when it can): it, or the nearest part of it that
    exists, must be a folder this process may write into (the rest is created when the run starts)."""
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing.is_file() else "is not a folder"
        return f"{flag} {folder}: {existing} {what}" if existing != folder else f"{flag} {folder} {what}"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{flag} {folder}: {existing} is not writable"
    return None
