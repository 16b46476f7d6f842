"""Build the run manifest: the resolved suite, models, packages and device behind every result."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from importlib import metadata
from typing import TYPE_CHECKING

from probe.planning.job import Job
from probe.planning.planner import resolve_model
from probe.run.records import SCHEMA_VERSION, RunCounts, RunManifest

if TYPE_CHECKING:
    from probe.run.options import RunOptions
    from probe.spec.loader import LoadedSuite

PACKAGES = (
    "probe", "torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "huggingface-hub",
    "safetensors", "open-clip-torch", "torchmetrics", "scipy", "numpy", "pillow", "opencv-python-headless",
    "rapidocr", "onnxruntime", "pandas", "pyarrow", "pydantic",
)


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that can change results (read from metadata, no imports)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def device_info(device: str) -> dict[str, object]:
    """The device the run used; for CUDA also the card's name."""
    info: dict[str, object] = {"device": device, "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if device.startswith("cuda"):
        import torch

        info["cuda_name"] = torch.cuda.get_device_name(torch.device(device))
    return info


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def build_manifest(
    loaded: LoadedSuite, jobs: list[Job], options: RunOptions, device: str, plan_hash: str
) -> RunManifest:
    """The manifest written when a run starts (status 'running')."""
    suite_data = loaded.suite.model_dump(mode="json")
    suite_sha = hashlib.sha256(json.dumps(suite_data, sort_keys=True).encode()).hexdigest()
    presets = {m.label: resolve_model(m, options.model_override, loaded.base_dir).as_record() for m in loaded.suite.models}
    return RunManifest(
        probe_version=metadata.version("probe") if _installed("probe") else "unknown",
        schema_version=SCHEMA_VERSION,
        suite_name=loaded.suite.name,
        suite_path=str(loaded.path.resolve()),
        suite_sha256=suite_sha,
        suite=suite_data,
        plan_sha256=plan_hash,
        model_override=options.model_override,
        limit=options.limit,
        presets=presets,
        device=device_info(device),
        packages=package_versions(),
        status="running",
        started_at=now_iso(),
        counts=RunCounts(planned=len(jobs)),
    )


def finish_manifest(
    manifest: RunManifest, counts: RunCounts, failures: list[dict[str, str]], wall_seconds: float,
    metrics: dict[str, dict[str, object]] | None = None, score_failures: list[dict[str, str]] | None = None,
) -> RunManifest:
    """The manifest of a finished run: counts, failures (of jobs and of scores), end time."""
    return manifest.model_copy(update={
        "status": "failed" if counts.failed or score_failures else "complete",
        "score_failures": score_failures or [],
        "finished_at": now_iso(),
        "wall_seconds": round(wall_seconds, 3),
        "counts": counts,
        "failures": failures,
        "metrics": metrics or {},
    })


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False
