"""The one diffusers adapter: turns batches of Jobs into PIL images, for every preset alike.

Determinism rules (see DESIGN.md): one CPU generator per image seeded with the job's seed, initial latents
drawn by us from that generator so the same seed gives the same starting noise at any step count and on any
model with the same latent shape, and prompt embeddings computed once per (pipeline, prompt).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from probe.errors import ProbeError
from probe.generate.loading import Pipeline, load_txt2img
from probe.planning.planner import device_class

if TYPE_CHECKING:
    from probe.planning.job import Job

logger = logging.getLogger(__name__)

Embeddings = tuple[torch.Tensor, ...]


def initial_latents(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Unit-variance starting noise for one image, drawn on the CPU in float32 from a generator seeded once.

    Drawing on the CPU makes the noise independent of the device, and the pipeline scales it by the
    scheduler's init_noise_sigma itself, so it is also independent of the step count.
    """
    return _noise(torch.Generator("cpu").manual_seed(seed), shape)


def _noise(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32)


class PipelineAdapter:
    """One loaded pipeline (one Job.pipeline_key) with its img2img twin and its prompt-embedding cache."""

    def __init__(self, pipe: Pipeline, device: str, pipeline_key: tuple[object, ...] | None = None):
        self.txt2img = pipe
        self.device = device
        self.dtype: torch.dtype = pipe.unet.dtype
        self.pipeline_key = pipeline_key
        self._img2img: Pipeline | None = None
        self._positive: dict[str, Embeddings] = {}
        self._negative: Embeddings | None = None

    @classmethod
    def for_job(cls, job: Job, device: str) -> PipelineAdapter:
        """Load the pipeline a job names on `device` (cpu runs float32 jobs, cuda the job's dtype)."""
        if device_class(device) != job.device_class:
            raise ProbeError(f"job planned for {job.device_class!r} cannot run on {device!r}: its key would lie")
        if device_class(device) == "cpu" and job.dtype != "float32":
            raise ProbeError(f"job dtype {job.dtype!r} on cpu: plan cpu jobs as float32")
        pipe = load_txt2img(
            job.preset, job.model_id, job.revision, job.lora_id, job.lora_revision, job.scheduler, job.dtype, device
        )
        return cls(pipe, device, job.pipeline_key)

    @property
    def img2img(self) -> Pipeline:
        """The image-to-image pipeline sharing the txt2img pipeline's modules (made once, no new memory)."""
        if self._img2img is None:
            from diffusers import AutoPipelineForImage2Image

            self._img2img = AutoPipelineForImage2Image.from_pipe(self.txt2img)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    def _cfg(self, guidance: float) -> bool:
        # Same rule as the pipelines' do_classifier_free_guidance (guidance-embedded UNets never use CFG).
        return guidance > 1 and self.txt2img.unet.config.time_cond_proj_dim is None

    @torch.inference_mode()
    def _encode(self, prompt: str, cfg: bool) -> Embeddings:
        # Keyword names are shared by the SD and SDXL pipelines; SDXL returns pooled embeddings too.
        return tuple(
            self.txt2img.encode_prompt(
                prompt=prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=cfg
            )
        )

    def prompt_embeddings(self, prompt: str) -> Embeddings:
        """(prompt_embeds[, pooled]) for one prompt, computed once per adapter."""
        if prompt not in self._positive:
            out = self._encode(prompt, cfg=False)
            self._positive[prompt] = (out[0], out[2]) if len(out) == 4 else (out[0],)
        return self._positive[prompt]

    def negative_embeddings(self) -> Embeddings:
        """The unconditional embeddings the pipeline would make for no negative prompt, computed once.

        They do not depend on the prompt: "" encoded for SD, zeros for SDXL (force_zeros_for_empty_prompt).
        """
        if self._negative is None:
            out = self._encode("", cfg=True)
            self._negative = (out[1], out[3]) if len(out) == 4 else (out[1],)
        return self._negative

    def _embedding_kwargs(self, jobs: Sequence[Job], cfg: bool) -> dict[str, torch.Tensor]:
        positive = [self.prompt_embeddings(job.prompt) for job in jobs]
        kwargs = {"prompt_embeds": torch.cat([p[0] for p in positive])}
        if len(positive[0]) == 2:
            kwargs["pooled_prompt_embeds"] = torch.cat([p[1] for p in positive])
        if cfg:
            negative = self.negative_embeddings()
            kwargs["negative_prompt_embeds"] = negative[0].expand(len(jobs), *negative[0].shape[1:])
            if len(negative) == 2:
                kwargs["negative_pooled_prompt_embeds"] = negative[1].expand(len(jobs), *negative[1].shape[1:])
        return kwargs

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(1, channels, height/scale, width/scale): the latent shape of one image."""
        scale = self.txt2img.vae_scale_factor
        if width % scale or height % scale:
            raise ProbeError(f"size {width}x{height} is not a multiple of the VAE scale factor {scale}")
        return (1, self.txt2img.unet.config.in_channels, height // scale, width // scale)

    def _check_batch(self, jobs: Sequence[Job]) -> Job:
        if not jobs:
            raise ValueError("generate() needs at least one job")
        first = jobs[0]
        if any(job.batch_key != first.batch_key for job in jobs):
            raise ValueError("jobs in one generate() call must share Job.batch_key")
        if self.pipeline_key is not None and first.pipeline_key != self.pipeline_key:
            raise ValueError(f"jobs for {first.pipeline_key} sent to the adapter of {self.pipeline_key}")
        return first

    @torch.inference_mode()
    def generate(self, jobs: Sequence[Job], init_images: Mapping[str, Image.Image] | None = None) -> list[Image.Image]:
        """Generate one image per job in one pipeline call; all jobs share one Job.batch_key.

        Args:
            jobs: the batch, in output order.
            init_images: img2img only: job.init_image -> RGB image (resized here to the job's size).
        """
        first = self._check_batch(jobs)
        cfg = self._cfg(first.guidance)
        logger.debug("generating %d %s images, %d steps, cfg %s", len(jobs), first.mode, first.steps, cfg)
        generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
        common: dict[str, Any] = {
            **self._embedding_kwargs(jobs, cfg),
            "num_inference_steps": first.steps,
            "guidance_scale": first.guidance,
            "output_type": "pil",
        }
        if first.mode == "txt2img":
            images = self._txt2img(jobs, generators, common)
        else:
            images = self._image2image(jobs, generators, common, init_images or {})
        if len(images) != len(jobs):
            raise RuntimeError(f"pipeline returned {len(images)} images for {len(jobs)} jobs")
        return images

    def _txt2img(self, jobs: Sequence[Job], generators: list[torch.Generator], common: dict[str, Any]) -> list:
        first = jobs[0]
        shape = self.latent_shape(first.width, first.height)
        # The same generator then feeds the scheduler's per-step noise (LCM), so each image's randomness
        # depends only on its own seed, whatever the batch.
        latents = torch.cat([_noise(g, shape) for g in generators])  # == initial_latents(job.seed, shape)
        latents = latents.to(device=self.device, dtype=self.dtype)
        return self.txt2img(latents=latents, generator=generators, width=first.width, height=first.height, **common).images

    def _image2image(
        self,
        jobs: Sequence[Job],
        generators: list[torch.Generator],
        common: dict[str, Any],
        init_images: Mapping[str, Image.Image],
    ) -> list:
        first = jobs[0]
        strength = first.strength
        if strength is None or not 0 < strength <= 1 or int(first.steps * strength) < 1:
            raise ProbeError(f"img2img needs 0 < strength <= 1 and steps*strength >= 1, got {first.steps}, {strength}")
        images = [self._init_image(job, init_images) for job in jobs]
        return self.img2img(image=images, strength=strength, generator=generators, **common).images

    @staticmethod
    def _init_image(job: Job, init_images: Mapping[str, Image.Image]) -> Image.Image:
        if job.init_image is None or job.init_image not in init_images:
            raise ProbeError(f"img2img job {job.key[:12]} has no init image (init_image={job.init_image!r})")
        image = init_images[job.init_image].convert("RGB")
        if image.size != (job.width, job.height):
            image = image.resize((job.width, job.height), Image.Resampling.LANCZOS)
        return image
