"""Planner: a validated suite -> the ordered list of frozen Jobs. Pure and deterministic, no torch.

Order: probe -> model -> prompt -> steps -> strength -> init image -> seed, as written in the suite, so
the same suite gives the same keys in the same order on any machine.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from probe.errors import UsageError, suggest
from probe.planning.job import Job
from probe.planning.pinning import pin
from probe.spec.loader import InitImage, LoadedSuite
from probe.spec.presets import PRESETS, TINY_ID, Preset
from probe.spec.schema import ModelEntry


@dataclass(frozen=True)
class ResolvedModel:
    """A suite model entry resolved against its preset (and a --model override)."""

    label: str
    preset: Preset
    model_id: str
    revision: str | None
    lora_id: str | None
    lora_revision: str | None
    scheduler: str

    def as_record(self) -> dict[str, object]:
        """What the manifest records about this model."""
        return {
            "preset": self.preset.name,
            "model_id": self.model_id,
            "revision": self.revision,
            "lora_id": self.lora_id,
            "lora_revision": self.lora_revision,
            "scheduler": self.scheduler,
            "family": self.preset.family,
            "notes": list(self.preset.notes),
        }


def device_class(device: str) -> str:
    """'cuda:1' -> 'cuda'. Numerics differ by device class, so it is part of the job key."""
    return device.split(":", 1)[0]


def dtype_for(device: str) -> str:
    """CUDA runs in float16 (as the model cards do), everything else in float32."""
    return "float16" if device_class(device) == "cuda" else "float32"


def resolve_model(entry: ModelEntry, override: str | None = None, base: Path = Path(".")) -> ResolvedModel:
    """Apply the preset, the entry's id/revision overrides, and a --model override (which wins).

    Then pin what the key sees (probe.planning.pinning): local folders (relative to `base`, the suite's
    folder) by their contents, hub branches and tags (or no revision) by the commit the local cache holds,
    so a Job key changes when the weights do.
    """
    if override is not None:
        if override not in PRESETS:
            raise UsageError(f"--model: unknown preset {override!r}{suggest(override, PRESETS)}")
        preset = PRESETS[override]
        model_id, revision = preset.model_id, preset.revision
        lora_id, lora_revision = preset.lora_id, preset.lora_revision
    else:
        preset = PRESETS[entry.preset]
        model_id = entry.model_id or preset.model_id
        revision = entry.revision if entry.revision is not None else (
            preset.revision if model_id == preset.model_id else None
        )
        lora_id = entry.lora_id or preset.lora_id
        lora_revision = entry.lora_revision if entry.lora_revision is not None else (
            preset.lora_revision if lora_id == preset.lora_id else None
        )
    pinned_id, revision = pin(model_id, revision, base)
    lora_id, lora_revision = pin(lora_id, lora_revision, base)
    return ResolvedModel(
        label=entry.label, preset=preset, model_id=pinned_id or model_id, revision=revision,
        lora_id=lora_id, lora_revision=lora_revision, scheduler=preset.scheduler or "repo-default",
    )


def plan_jobs(
    loaded: LoadedSuite, *, model_override: str | None = None, limit: int | None = None, device: str = "cpu"
) -> list[Job]:
    """Every job of the suite. `model_override` keeps the grid but generates with that preset at its size."""
    suite = loaded.suite
    jobs: list[Job] = []
    for probe in suite.probes:
        prompts = loaded.prompts[probe.name][:limit] if limit else loaded.prompts[probe.name]
        inits: list[InitImage | None] = list(loaded.init_images[probe.name]) or [None]
        seeds = probe.seeds or suite.seeds
        for entry in suite.models:
            model = resolve_model(entry, model_override, loaded.base_dir)
            original = PRESETS[entry.preset]
            steps_grid = entry.steps or probe.steps or list(original.steps)
            guidance = _first(entry.guidance, probe.guidance, original.guidance)
            width, height = model.preset.size if model_override else (entry.size or suite.size or original.size)
            strengths: list[float | None] = list(probe.strength) if probe.init_images and probe.strength else [None]
            for item in prompts:
                for steps in steps_grid:
                    for strength in strengths:
                        for init in inits:
                            for seed in seeds:
                                jobs.append(Job(
                                    probe=probe.name, model=model.label, preset=model.preset.name,
                                    model_id=model.model_id, revision=model.revision,
                                    lora_id=model.lora_id, lora_revision=model.lora_revision,
                                    scheduler=model.scheduler, dtype=dtype_for(device),
                                    device_class=device_class(device),
                                    mode="img2img" if init is not None else "txt2img",
                                    prompt=item.prompt, variables=item.variables, attrs=item.attrs, text=item.text,
                                    seed=seed, steps=steps, guidance=guidance, strength=strength,
                                    init_image=init.path if init else None,
                                    init_image_sha256=init.sha256 if init else None,
                                    width=width, height=height,
                                ))
    return jobs


def _first(*values: float | None) -> float:
    return next(v for v in values if v is not None)


def plan_sha256(jobs: list[Job]) -> str:
    """Hash of the ordered (probe, model, key) triples: identifies a plan for resuming."""
    digest = hashlib.sha256()
    for job in jobs:
        digest.update(f"{job.probe}\0{job.model}\0{job.key}\n".encode())
    return digest.hexdigest()


def count_jobs(jobs: list[Job]) -> Counter[tuple[str, str]]:
    """Jobs per (probe, model label), for `probe suites validate`."""
    return Counter((j.probe, j.model) for j in jobs)


def uses_tiny(jobs: list[Job]) -> bool:
    """Whether any job runs on the embedded tiny model."""
    return any(j.model_id == TINY_ID for j in jobs)



