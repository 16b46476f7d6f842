"""Load pipelines for jobs: the tiny model, a local folder, or a hub id that must already be cached.

Loading never touches the network: a hub id is resolved to its snapshot folder in the local Hugging Face
cache first, and a missing one fails at once with a message saying how to fetch it (`probe models pull`),
instead of diffusers' retries. `pull` is the only function here that downloads.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from probe.errors import ProbeError, suggest
from probe.models.registry import TINY_ID, Preset, get_preset
from probe.models.tiny import TINY_REVISION, build_tiny_pipeline

if TYPE_CHECKING:
    from probe.records import Job

logger = logging.getLogger(__name__)

#: A diffusers pipeline. Typed as Any: diffusers' lazy-import stubs hide the methods, and probe relies only on
#: what the SD and SDXL pipelines share (unet, vae_scale_factor, encode_prompt, __call__).
Pipeline = Any

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Scheduler specs that keep the scheduler the repo ships with.
KEEP_SCHEDULER = {"", "default", "repo", "repo-default"}
#: Bare words allowed inside a scheduler spec, e.g. "EulerDiscreteScheduler(trailing)".
_SPACINGS = {"trailing", "leading", "linspace"}
#: Components never loaded (the pipeline is built with safety_checker=None), so never downloaded.
_SKIPPED_COMPONENTS = {"safety_checker"}
_FP16_WEIGHTS = "*.fp16*.safetensors"  # also matches sharded "x.fp16-00001-of-00002.safetensors"
LORA_PATTERNS = ["*.safetensors"]


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype for a Job's dtype name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ProbeError(f"unknown dtype {dtype!r}{suggest(dtype, DTYPES)}")
    return DTYPES[dtype]


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _not_cached(preset_name: str, repo_id: str, revision: str | None, detail: str = "") -> ProbeError:
    what = f"{repo_id} (revision {revision or 'main'})"
    return ProbeError(
        f"model preset {preset_name!r} needs {what}, which is not in the local Hugging Face cache "
        f"({_hub_cache()}).{detail} Fetch it with `probe models pull {preset_name}` on a machine with internet "
        "(and copy the cache here), or point the suite at a downloaded copy with `model_id: /path/to/folder`."
    )


def _weight_patterns(components: list[str], dtype: str | None) -> tuple[list[str], list[str]]:
    """allow/ignore patterns for a pipeline snapshot: configs, tokenizers and one safetensors format.

    dtype None keeps both float32 and fp16 files (usable on any device); "float16" only the fp16 variant,
    anything else only the full-precision files. Other formats (.bin, .ckpt, onnx, flax) are never fetched.
    """
    allow = ["model_index.json"]
    for name in components:
        allow += [f"{name}/*.json", f"{name}/*.txt"]
        allow.append(f"{name}/{_FP16_WEIGHTS}" if dtype == "float16" else f"{name}/*.safetensors")
    ignore = [_FP16_WEIGHTS] if dtype not in (None, "float16") else []
    return allow, ignore


def _file_dtype(preset: Preset, dtype: str | None) -> str | None:
    """Which weight files a dtype needs: fp16 files only for float16 on presets whose repo ships them."""
    if dtype is None:
        return None if preset.fp16_variant else "float32"
    return "float16" if dtype == "float16" and preset.fp16_variant else "float32"


def _components(model_index: Path) -> list[str]:
    """Component folders a pipeline loads, read from its model_index.json."""
    index = json.loads(model_index.read_text(encoding="utf-8"))
    return sorted(
        name
        for name, value in index.items()
        if isinstance(value, list) and value and value[0] is not None and name not in _SKIPPED_COMPONENTS
    )


def cached_pipeline_folder(preset_name: str, repo_id: str, revision: str | None, dtype: str | None) -> Path:
    """The cached snapshot folder of a hub pipeline, without any network call; ProbeError if absent or partial."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    index = try_to_load_from_cache(repo_id, "model_index.json", revision=revision)
    if not isinstance(index, str):
        raise _not_cached(preset_name, repo_id, revision)
    allow, ignore = _weight_patterns(_components(Path(index)), dtype)
    try:
        folder = snapshot_download(
            repo_id, revision=revision, local_files_only=True, allow_patterns=allow, ignore_patterns=ignore
        )
    except LocalEntryNotFoundError as error:
        raise _not_cached(
            preset_name, repo_id, revision, f" The cached copy lacks files for {dtype or 'any'} weights."
        ) from error
    return Path(folder)


def cached_lora_path(preset_name: str, lora_id: str, revision: str | None) -> Path:
    """A LoRA given as a folder or file, or the cached snapshot of a hub LoRA; ProbeError if not cached."""
    if Path(lora_id).exists():
        return Path(lora_id)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(lora_id, revision=revision, local_files_only=True, allow_patterns=LORA_PATTERNS)
    except LocalEntryNotFoundError as error:
        raise _not_cached(preset_name, lora_id, revision) from error
    return Path(folder)


def parse_scheduler(spec: str | None) -> tuple[str, dict[str, Any]] | None:
    """Parse 'Class', 'Class(trailing)' or 'Class(key=value, ...)'; None keeps the repo's scheduler."""
    if spec is None or spec.strip() in KEEP_SCHEDULER:
        return None
    match = re.fullmatch(r"\s*(\w+)\s*(?:\((.*)\))?\s*", spec)
    if match is None:
        raise ProbeError(f"cannot parse scheduler {spec!r}: expected e.g. 'LCMScheduler' or 'Name(trailing)'")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in (match.group(2) or "").split(","))):
        if "=" in item:
            key, raw = (s.strip() for s in item.split("=", 1))
            try:
                kwargs[key] = json.loads(raw)
            except json.JSONDecodeError:
                kwargs[key] = raw
        elif item in _SPACINGS:
            kwargs["timestep_spacing"] = item
        else:
            raise ProbeError(f"unknown scheduler option {item!r} in {spec!r}: use key=value or one of {_SPACINGS}")
    return match.group(1), kwargs


def apply_scheduler(pipe: Pipeline, spec: str | None) -> None:
    """Swap in the named scheduler class, configured from the pipeline's own scheduler config."""
    import diffusers
    from diffusers import SchedulerMixin

    parsed = parse_scheduler(spec)
    if parsed is None:
        return
    name, kwargs = parsed
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        names = [n for n in dir(diffusers) if n.endswith("Scheduler")]
        raise ProbeError(f"unknown scheduler {name!r}{suggest(name, names)}")
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **kwargs)


def _from_folder(folder: Path, dtype: torch.dtype, fp16_variant: bool, hint: str = "") -> Pipeline:
    """AutoPipelineForText2Image from a local folder; fp16 weight files when present and wanted."""
    from diffusers import AutoPipelineForText2Image

    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    # fp16 files are the float32 weights rounded, so casting the float32 ones gives the same pipeline when a
    # folder has no fp16 variant; passing variant= there would fail.
    if dtype == torch.float16 and fp16_variant and any(folder.glob(f"*/{_FP16_WEIGHTS}")):
        kwargs["variant"] = "fp16"
    if "safety_checker" in json.loads((folder / "model_index.json").read_text(encoding="utf-8")):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as error:
        raise ProbeError(f"cannot load a pipeline from {folder}: {error}{hint}") from error
    _check_tokenizers(pipe, folder, hint)
    return pipe


def _check_tokenizers(pipe: Pipeline, folder: Path, hint: str) -> None:
    """Refuse a tokenizer smaller than its text encoder's vocabulary.

    transformers silently builds a 2-token CLIP tokenizer when the vocabulary files are missing, which would
    turn every prompt into the same embedding instead of failing.
    """
    for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tokenizer, encoder = getattr(pipe, tok_name, None), getattr(pipe, enc_name, None)
        if tokenizer is not None and encoder is not None and len(tokenizer) < encoder.config.vocab_size:
            raise ProbeError(
                f"{folder / tok_name} holds {len(tokenizer)} tokens but {enc_name} expects "
                f"{encoder.config.vocab_size}: its vocabulary files are missing{hint}"
            )


def pipeline_folder(preset: Preset, model_id: str, revision: str | None, dtype: str) -> Path | None:
    """The local folder a pipeline loads from (None: the tiny model); ProbeError if not available offline."""
    if model_id == TINY_ID:
        if revision not in (None, TINY_REVISION):
            raise ProbeError(f"the tiny model here is {TINY_REVISION!r}; cannot build revision {revision!r}")
        return None
    if Path(model_id).is_dir():
        if not (Path(model_id) / "model_index.json").is_file():
            raise ProbeError(f"model folder {model_id} of preset {preset.name!r} has no model_index.json")
        return Path(model_id)
    return cached_pipeline_folder(preset.name, model_id, revision, _file_dtype(preset, dtype))


def ensure_available(job: Job) -> None:
    """Fail before any work if a job's pipeline or LoRA cannot be loaded offline (no network, no loading)."""
    preset = get_preset(job.preset)
    torch_dtype(job.dtype)
    pipeline_folder(preset, job.model_id, job.revision, job.dtype)
    if job.lora_id:
        cached_lora_path(preset.name, job.lora_id, job.lora_revision)


def _load_base(preset: Preset, model_id: str, revision: str | None, dtype_name: str) -> Pipeline:
    dtype = torch_dtype(dtype_name)
    folder = pipeline_folder(preset, model_id, revision, dtype_name)
    if folder is not None:
        hint = "" if Path(model_id).is_dir() else f" (incomplete cached copy? run `probe models pull {preset.name}`)"
        return _from_folder(folder, dtype, preset.fp16_variant, hint)
    pipe: Pipeline = build_tiny_pipeline()
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def load_txt2img(
    preset_name: str,
    model_id: str,
    revision: str | None,
    lora_id: str | None = None,
    lora_revision: str | None = None,
    scheduler: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> Pipeline:
    """Load the text-to-image pipeline a job names, offline; ProbeError says how to fetch what is missing.

    Args:
        preset_name: preset (for its fp16 choice and for error messages).
        model_id: probe/tiny, a local pipeline folder, or a hub id that is in the local cache.
        revision: hub commit or branch of `model_id`.
        lora_id: optional LoRA (hub id, folder or .safetensors file), fused into the weights.
        lora_revision: hub revision of the LoRA.
        scheduler: scheduler spec (see `parse_scheduler`), or None to keep the repo's.
        dtype: float32 or float16.
        device: torch device string.
    """
    preset = get_preset(preset_name)
    lora_path = cached_lora_path(preset.name, lora_id, lora_revision) if lora_id else None  # fail before loading
    pipe = _load_base(preset, model_id, revision, dtype)
    apply_scheduler(pipe, scheduler)
    if lora_path is not None:
        kwargs = {"weight_name": lora_path.name} if lora_path.is_file() else {}
        pipe.load_lora_weights(str(lora_path.parent if lora_path.is_file() else lora_path), **kwargs)
        pipe.fuse_lora()
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s (%s@%s, lora %s) on %s as %s", preset.name, model_id, revision, lora_id, device, dtype)
    return pipe


def is_cached(preset: Preset, dtype: str | None = None) -> bool:
    """Whether the preset's pipeline (and LoRA) can be loaded offline; dtype None: for float32 or float16."""
    if preset.model_id == TINY_ID or Path(preset.model_id).is_dir():
        return True
    dtypes = [dtype] if dtype else ["float32", "float16"]
    try:
        if preset.lora_id:
            cached_lora_path(preset.name, preset.lora_id, preset.lora_revision)
        for name in dtypes:
            try:
                cached_pipeline_folder(preset.name, preset.model_id, preset.revision, _file_dtype(preset, name))
                return True
            except ProbeError:
                continue
    except ProbeError:
        return False
    return False


def pull(preset: Preset, dtype: str | None = None) -> Path:
    """Download the preset's pipeline (and LoRA) into the Hugging Face cache; needs internet.

    Only what loading uses is fetched: model_index.json, each component's configs and tokenizer files, and
    safetensors weights (both float32 and fp16 when dtype is None, else just the one). Returns the snapshot.
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    if preset.model_id == TINY_ID:
        raise ProbeError("the tiny model is built in code; there is nothing to pull")
    dtype = _file_dtype(preset, dtype)
    index = hf_hub_download(preset.model_id, "model_index.json", revision=preset.revision)
    allow, ignore = _weight_patterns(_components(Path(index)), dtype)
    logger.info("pulling %s@%s (%s)", preset.model_id, preset.revision, dtype or "float32+fp16")
    folder = snapshot_download(preset.model_id, revision=preset.revision, allow_patterns=allow, ignore_patterns=ignore)
    if preset.lora_id:
        snapshot_download(preset.lora_id, revision=preset.lora_revision, allow_patterns=LORA_PATTERNS)
    return Path(folder)
