"""A run directory: reports/<suite>/<run-id>/ with manifest.json, jobs.parquet, images/ and a progress log.

The progress log (progress.jsonl) is appended and fsynced after every batch, so an interrupted run can be
resumed into the same directory with nothing lost. A kill mid-append leaves a torn last line: it is ended
with a newline before the next append (so the next record is never glued onto it) and skipped when read,
like any line that is not a record (bad UTF-8, stray bytes); its job is simply done again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock, Timeout

from probe.errors import UsageError
from probe.planning.job import Job
from probe.run.records import JobResult, RunManifest
from probe.store.atomic import atomic_write_bytes, replace_symlink, write_parquet_atomic

if TYPE_CHECKING:
    import pandas as pd

MANIFEST = "manifest.json"
JOBS = "jobs.parquet"
PROGRESS = "progress.jsonl"
LOCK = ".probe.lock"
OWNER = ".probe.lock.owner"
log = logging.getLogger(__name__)
_RUN_NAME = re.compile(r"(\d{8}-\d{6})(?:-(\d+))?")


def run_order(name: str) -> tuple[int, str, int]:
    """Sort key of run folder names: by stamp, then by the number `create` appends within one second, so
    `<stamp>-10` comes after `<stamp>-9` (plain name order puts it before `<stamp>-2`). Names `create` never
    makes sort before every run it made."""
    match = _RUN_NAME.fullmatch(name)
    if match is None:
        return (0, name, 0)
    return (1, match.group(1), int(match.group(2) or 0))


class RunDir:
    """Files of one run; every write is atomic or append-only."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, suite_root: Path) -> RunDir:
        """A fresh run folder named by UTC time (sortable), unique even within one second."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        for n in range(1000):
            path = suite_root / (stamp if n == 0 else f"{stamp}-{n}")
            try:
                path.mkdir(parents=True)
                return cls(path)
            except FileExistsError:
                continue
        raise RuntimeError(f"could not create a run folder under {suite_root}")

    @classmethod
    def find_resumable(cls, suite_root: Path, plan_sha256: str) -> RunDir | None:
        """The newest unfinished run of the same plan, if any: still running, or finished without its report
        (a kill while the report was written), so a rerun completes it instead of starting over."""
        if not suite_root.is_dir():
            return None
        runs = (p for p in suite_root.iterdir() if p.is_dir() and not p.is_symlink())
        for path in sorted(runs, key=lambda p: run_order(p.name), reverse=True):
            run = cls(path)
            manifest = run.read_manifest()
            if manifest is None:
                continue
            unfinished = manifest.status == "running" or not (path / "index.html").is_file()  # killed mid-report
            if unfinished and manifest.plan_sha256 == plan_sha256:
                return run
            return None  # only the newest run is a candidate: never resume into an old one
        return None

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for this process (a second `probe run` into it is refused, saying who holds it)."""
        lock = FileLock(self.path / LOCK, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise UsageError(f"{self.path} is in use by another probe process ({_owner(self.path)}); wait for it "
                             "to finish, or pass --new to start a separate run folder") from None
        try:
            atomic_write_bytes(self.path / OWNER, json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                          time.gmtime())}).encode())
            yield
        finally:
            (self.path / OWNER).unlink(missing_ok=True)
            lock.release()

    def image_path(self, key: str) -> Path:
        return self.path / "images" / key[:2] / f"{key}.png"

    def relative_image_path(self, key: str) -> str:
        return f"images/{key[:2]}/{key}.png"

    def read_manifest(self) -> RunManifest | None:
        try:
            return RunManifest.model_validate_json((self.path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def write_manifest(self, manifest: RunManifest) -> None:
        atomic_write_bytes(self.path / MANIFEST, manifest.model_dump_json(indent=2).encode("utf-8"))

    def append_results(self, results: list[JobResult]) -> None:
        """Append results and force them to disk before the caller moves on."""
        if not results:
            return
        lines = "".join(r.model_dump_json() + "\n" for r in results).encode("utf-8")
        with (self.path / PROGRESS).open("ab") as handle:
            if handle.tell() and not _ends_with_newline(self.path / PROGRESS):
                lines = b"\n" + lines  # end a torn fragment first: it stays one unreadable line, skipped
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())

    def read_results(self) -> dict[str, JobResult]:
        """Latest result per job key; lines that are not a whole record (torn, bad UTF-8) are skipped."""
        results: dict[str, JobResult] = {}
        path = self.path / PROGRESS
        if not path.is_file():
            return results
        skipped = 0
        for line in path.read_bytes().split(b"\n"):
            if not line.strip():
                continue
            try:
                result = JobResult.model_validate_json(line)
            except ValueError:  # pydantic reads bytes and rejects bad UTF-8 the same way
                skipped += 1
                continue
            results[result.key] = result
        if skipped:
            log.warning("%s: skipped %d unreadable line(s) (a torn write?); their jobs are done again", path, skipped)
        return results

    def write_jobs(self, jobs: list[Job], results: dict[str, JobResult]) -> None:
        """jobs.parquet: one row per planned job with its outcome and image path."""
        write_parquet_atomic(self.jobs_frame(jobs, results), self.path / JOBS)

    def jobs_frame(self, jobs: Sequence[Job], results: dict[str, JobResult] | None) -> pd.DataFrame:
        """The rows of jobs.parquet; with `results` None, the plan as it will be once every image is made (each
        row has its image path), which a scorer working beside generation filters by the keys already durable."""
        import pandas as pd

        done = JobResult(key="", status="generated")
        rows = [_job_row(job, done if results is None else results.get(job.key), self.relative_image_path(job.key))
                for job in jobs]
        frame = pd.DataFrame(rows)
        for column in frame.columns:
            if column.startswith("attr_") and frame[column].map(type).nunique() > 1:
                frame[column] = frame[column].map(lambda v: None if pd.isna(v) else str(v))
        return frame

    def update_latest(self) -> None:
        """Point <suite>/latest at this run (a relative symlink, replaced atomically)."""
        latest = self.path.parent / "latest"
        replace_symlink(latest, self.path.name)


def _owner(path: Path) -> str:
    try:
        owner = json.loads((path / OWNER).read_text(encoding="utf-8"))
        return f"pid {owner['pid']} on {owner['host']} since {owner['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "owner unknown"


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def _job_row(job: Job, result: JobResult | None, image: str) -> dict[str, object]:
    row: dict[str, object] = {
        "key": job.key,
        "probe": job.probe,
        "model": job.model,
        "preset": job.preset,
        "model_id": job.model_id,
        "revision": job.revision,
        "lora_id": job.lora_id,
        "lora_revision": job.lora_revision,
        "scheduler": job.scheduler,
        "dtype": job.dtype,
        "device_class": job.device_class,
        "mode": job.mode,
        "prompt": job.prompt,
        "text": job.text,
        "variables": json.dumps(job.variables, sort_keys=True),
        "attrs": json.dumps(job.attrs, sort_keys=True),
        "seed": job.seed,
        "steps": job.steps,
        "guidance": job.guidance,
        "strength": job.strength,
        "init_image": job.init_image,
        "width": job.width,
        "height": job.height,
        "status": result.status if result else "missing",
        "image": image if result and result.status != "failed" else None,
        "seconds": result.seconds if result else None,
        "device_name": result.device if result else None,
        "error": result.error if result else None,
    }
    row.update({f"var_{k}": v for k, v in job.variables.items()})
    row.update({f"attr_{k}": v for k, v in job.attrs.items()})
    return row
