"""The Job: one image to generate, and its key (the sha256 of everything that decides its pixels).

Pure data (pydantic, no torch), so planning and validation stay cheap; run records are in probe.run.records.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: Bumped whenever the generation code changes pixels for the same inputs
#: (latent construction, prompt encoding, scheduler handling). Part of every Job.key.
GENERATION_VERSION = "1"

Mode = Literal["txt2img", "img2img"]


class Job(BaseModel):
    """One image to generate: a probe x model x prompt x seed x steps (x strength x init image) cell."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    probe: str = Field(description="Probe name from the suite.")
    model: str = Field(description="Model label from the suite (the preset name unless `name:` is set).")
    preset: str = Field(description="Preset that generates the image (differs from the label under --model).")
    model_id: str = Field(description="Resolved hub id or local folder of the base pipeline.")
    revision: str | None = Field(description="Hub commit of the base pipeline (branches and tags resolved); "
                                             "`local-<sha256>` of a local folder's contents; `tiny-v1` for tiny.")
    lora_id: str | None = Field(default=None, description="LoRA adapter hub id or folder, if any.")
    lora_revision: str | None = Field(default=None, description="Hub revision of the LoRA adapter.")
    scheduler: str = Field(description="Scheduler class and non-default config, e.g. 'EulerDiscreteScheduler(trailing)'.")
    dtype: str = Field(description="Torch dtype the pipeline runs in: float32 or float16.")
    device_class: str = Field(description="cpu, cuda or mps: numerics differ between them.")
    mode: Mode
    prompt: str
    variables: dict[str, str] = Field(default_factory=dict, description="Template variables that made the prompt.")
    attrs: dict[str, str | float | int | bool | None] = Field(
        default_factory=dict, description="Extra columns carried to results (e.g. reference female share)."
    )
    text: str | None = Field(default=None, description="Target text the image should render (text probes).")
    seed: int = Field(ge=0)
    steps: int = Field(ge=1, description="num_inference_steps passed to the pipeline.")
    guidance: float = Field(ge=0, description="guidance_scale; <= 1 means no classifier-free guidance.")
    strength: float | None = Field(default=None, description="img2img strength in (0, 1]; None for txt2img.")
    init_image: str | None = Field(default=None, description="Init image path (img2img), as given in the suite.")
    init_image_sha256: str | None = Field(default=None, description="Content hash of the init image file.")
    width: int = Field(gt=0)
    height: int = Field(gt=0)

    def pixel_inputs(self) -> dict[str, object]:
        """Everything that decides the pixels, and nothing else (labels, probe names and attrs excluded)."""

        def weights(reference: str | None, revision: str | None) -> str | None:
            # A local folder or file is pinned by content (revision 'local-<sha256>', see
            # probe.planning.pinning): the key sees 'local:<sha256>' instead of its absolute path, so moved
            # or copied weights keep their images. Hub ids and the tiny model pass through unchanged.
            from pathlib import PurePath

            if reference and revision and revision.startswith("local-") and PurePath(reference).is_absolute():
                return "local:" + revision.removeprefix("local-")
            return reference

        return {
            "v": GENERATION_VERSION,
            "model_id": weights(self.model_id, self.revision),
            "revision": self.revision,
            "lora_id": weights(self.lora_id, self.lora_revision),
            "lora_revision": self.lora_revision,
            "scheduler": self.scheduler,
            "dtype": self.dtype,
            "device_class": self.device_class,
            "mode": self.mode,
            "prompt": self.prompt,
            "seed": self.seed,
            "steps": self.steps,
            "guidance": self.guidance,
            "strength": self.strength,
            "init_image_sha256": self.init_image_sha256,
            "width": self.width,
            "height": self.height,
        }

    @property
    def key(self) -> str:
        """sha256 of the canonical JSON of `pixel_inputs()`: same key -> same image, generated once."""
        canonical = json.dumps(self.pixel_inputs(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def pipeline_key(self) -> tuple[str, str | None, str | None, str | None, str, str]:
        """Jobs with the same pipeline key share one loaded pipeline."""
        return (self.model_id, self.revision, self.lora_id, self.lora_revision, self.scheduler, self.dtype)

    @property
    def batch_key(self) -> tuple[object, ...]:
        """Jobs with the same batch key may be generated in one pipeline call."""
        return (*self.pipeline_key, self.mode, self.steps, self.strength, self.guidance, self.width, self.height)
