"""Load pipelines for jobs: the tiny model, a local folder, or a hub id that must already be cached.

Loading never touches the network: a hub id is resolved to its snapshot folder in the local Hugging Face
cache first, and a missing one fails at once with a message saying how to fetch it (`probe models pull`),
instead of diffusers' retries. `pull` is the only function here that downloads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from probe.embedded.tiny_sd import TINY_REVISION, build_tiny_pipeline
from probe.errors import ProbeError, suggest
from probe.planning.pinning import (
    FP16_WEIGHTS,
    looks_like_path,
    lora_weights_file,
    pipeline_components,
    pipeline_lacks,
    snapshot_folder,
)
from probe.spec.presets import TINY_ID, Preset, get_preset

if TYPE_CHECKING:
    from probe.planning.job import Job

logger = logging.getLogger(__name__)

#: A diffusers pipeline. Typed as Any: diffusers' lazy-import stubs hide the methods, and probe relies only on
#: what the SD and SDXL pipelines share (unet, vae_scale_factor, encode_prompt, __call__).
Pipeline = Any

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Scheduler specs that keep the scheduler the repo ships with.
KEEP_SCHEDULER = {"", "default", "repo", "repo-default"}
#: Bare words allowed inside a scheduler spec, e.g. "EulerDiscreteScheduler(trailing)".
_SPACINGS = {"trailing", "leading", "linspace"}
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


def _fix(preset: Preset, repo_id: str, revision: str | None, lora: bool = False) -> str:
    """How to provide a missing hub model: `probe models pull` fetches only the preset's own pinned weights."""
    own = (preset.lora_id, preset.lora_revision) if lora else (preset.model_id, preset.revision)
    fetch = f"`probe models pull {preset.name}`"
    if (repo_id, revision) != own:
        fetch = f"`hf download {repo_id} --revision {revision or 'main'}`"
        if own[0] not in (None, TINY_ID):
            fetch += f" (`probe models pull {preset.name}` fetches only the preset's own weights)"
    local = "`lora_id: /path/to/lora`" if lora else "`model_id: /path/to/folder`"
    return (f"Fetch it with {fetch} on a machine with internet (and copy the cache here), or point the suite at a "
            f"downloaded copy with {local}.")


def _not_cached(preset: Preset, repo_id: str, revision: str | None, lora: bool = False, lacks: str = "",
                snapshot: Path | None = None) -> str:
    what = f"{'LoRA ' if lora else ''}{repo_id} (revision {revision or 'main'})"
    where = (f"whose copy in the local Hugging Face cache ({snapshot}) lacks {lacks}" if lacks
             else f"which is not in the local Hugging Face cache ({_hub_cache()})")
    return f"model preset {preset.name!r} needs {what}, {where}. {_fix(preset, repo_id, revision, lora)}"


def _locate_pipeline(preset: Preset, model_id: str, revision: str | None, dtype: str) -> tuple[Path | None, list[str]]:
    """The folder a pipeline loads from (None: the tiny model) and what stops it loading, without loading."""
    if model_id == TINY_ID:
        if revision not in (None, TINY_REVISION):
            return None, [f"the tiny model here is {TINY_REVISION!r}; cannot build revision {revision!r}"]
        return None, []
    fp16 = dtype == "float16" and preset.fp16_variant
    if looks_like_path(model_id):
        folder = Path(model_id).expanduser()
        if not folder.is_dir():
            return None, [f"model folder {folder} of preset {preset.name!r} does not exist: point `model_id:` at a "
                          "pipeline folder (one with model_index.json)"]
        lacks = pipeline_lacks(folder, fp16)
        problem = f"model folder {folder} of preset {preset.name!r} cannot load: it lacks {', '.join(lacks)}"
        return folder, [problem + ". Complete it, or point `model_id:` at another folder."] if lacks else []
    snapshot = snapshot_folder(model_id, revision)
    if snapshot is None or not (snapshot / "model_index.json").is_file():
        return None, [_not_cached(preset, model_id, revision)]
    lacks = pipeline_lacks(snapshot, fp16)
    if lacks:
        return None, [_not_cached(preset, model_id, revision, lacks=", ".join(lacks), snapshot=snapshot)]
    return snapshot, []


def _locate_lora(preset: Preset, lora_id: str, revision: str | None) -> tuple[Path | None, list[str]]:
    """The LoRA weights file a job fuses, and what stops it loading, without loading."""
    if looks_like_path(lora_id):
        path = Path(lora_id).expanduser()
        if path.is_file():
            return path, []
        found, lacks = lora_weights_file(path) if path.is_dir() else (None, "")
        problem = f"LoRA {path} of preset {preset.name!r} " + (f"lacks {lacks}" if lacks else "does not exist")
        fix = "point `lora_id: /path/to/lora` at a LoRA .safetensors file or a folder with one"
        return found, [] if found else [f"{problem}: {fix}."]
    snapshot = snapshot_folder(lora_id, revision)
    if snapshot is None:
        return None, [_not_cached(preset, lora_id, revision, lora=True)]
    found, lacks = lora_weights_file(snapshot)
    return found, [] if found else [_not_cached(preset, lora_id, revision, lora=True, lacks=lacks, snapshot=snapshot)]


def job_problems(job: Job) -> list[str]:
    """Everything that stops a job's pipeline and LoRA from loading offline, each with its fix (no loading)."""
    preset = get_preset(job.preset)
    problems = [] if job.dtype in DTYPES else [f"unknown dtype {job.dtype!r}{suggest(job.dtype, DTYPES)}"]
    problems += _locate_pipeline(preset, job.model_id, job.revision, job.dtype)[1]
    if job.lora_id:
        problems += _locate_lora(preset, job.lora_id, job.lora_revision)[1]
    return problems


def ensure_available(job: Job) -> None:
    """Fail before any work if a job's pipeline or LoRA cannot be loaded offline (no network, no loading)."""
    problems = job_problems(job)
    if problems:
        raise ProbeError("\n".join(problems))


def pipeline_folder(preset: Preset, model_id: str, revision: str | None, dtype: str) -> Path | None:
    """The local folder a pipeline loads from (None: the tiny model); ProbeError if not available offline."""
    folder, problems = _locate_pipeline(preset, model_id, revision, dtype)
    if problems:
        raise ProbeError("\n".join(problems))
    return folder


def cached_lora_path(preset: Preset, lora_id: str, revision: str | None) -> Path:
    """The LoRA weights file (given, in a folder, or in the cached snapshot of a hub LoRA); ProbeError if absent."""
    found, problems = _locate_lora(preset, lora_id, revision)
    if found is None:
        raise ProbeError("\n".join(problems))
    return found


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
    if dtype == torch.float16 and fp16_variant and any(folder.glob(f"*/{FP16_WEIGHTS}")):
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
    lora_file = cached_lora_path(preset, lora_id, lora_revision) if lora_id else None  # fail before loading
    pipe = _load_base(preset, model_id, revision, dtype)
    apply_scheduler(pipe, scheduler)
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)  # the file pre-flight checked
        pipe.fuse_lora()
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s (%s@%s, lora %s) on %s as %s", preset.name, model_id, revision, lora_id, device, dtype)
    return pipe


def is_cached(preset: Preset, dtype: str | None = None) -> bool:
    """Whether the preset's pipeline (and LoRA) can be loaded offline; dtype None: for float32 or float16."""
    if preset.lora_id and _locate_lora(preset, preset.lora_id, preset.lora_revision)[1]:
        return False
    dtypes = [dtype] if dtype else ["float32", "float16"]
    return any(not _locate_pipeline(preset, preset.model_id, preset.revision, name)[1] for name in dtypes)


def _weight_patterns(components: list[str], dtype: str | None) -> tuple[list[str], list[str]]:
    """allow/ignore patterns for a pipeline snapshot: configs, tokenizers and one safetensors format.

    dtype None keeps both float32 and fp16 files (usable on any device); "float16" only the fp16 variant,
    anything else only the full-precision files. Other formats (.bin, .ckpt, onnx, flax) are never fetched.
    """
    allow = ["model_index.json"]
    for name in components:
        allow += [f"{name}/*.json", f"{name}/*.txt"]
        allow.append(f"{name}/{FP16_WEIGHTS}" if dtype == "float16" else f"{name}/*.safetensors")
    ignore = [FP16_WEIGHTS] if dtype not in (None, "float16") else []
    return allow, ignore


def _file_dtype(preset: Preset, dtype: str | None) -> str | None:
    """Which weight files a dtype needs: fp16 files only for float16 on presets whose repo ships them."""
    if dtype is None:
        return None if preset.fp16_variant else "float32"
    return "float16" if dtype == "float16" and preset.fp16_variant else "float32"


def pull(preset: Preset, dtype: str | None = None) -> Path:
    """Download the preset's pipeline (and LoRA) into the Hugging Face cache; needs internet.

    Only what loading uses is fetched: model_index.json, each component's configs and tokenizer files, and
    safetensors weights (both float32 and fp16 when dtype is None, else just the one). Returns the snapshot.
    Any failure (offline, no access, no disk) is a ProbeError naming the preset, repo and revision.
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    if preset.model_id == TINY_ID:
        raise ProbeError("the tiny model is built in code; there is nothing to pull")
    dtype = _file_dtype(preset, dtype)
    with _pull_errors(preset, preset.model_id, preset.revision):
        index = hf_hub_download(preset.model_id, "model_index.json", revision=preset.revision)
        allow, ignore = _weight_patterns(pipeline_components(Path(index)), dtype)
        logger.info("pulling %s@%s (%s)", preset.model_id, preset.revision, dtype or "float32+fp16")
        folder = snapshot_download(preset.model_id, revision=preset.revision, allow_patterns=allow,
                                   ignore_patterns=ignore)
    if preset.lora_id:
        with _pull_errors(preset, preset.lora_id, preset.lora_revision):
            snapshot_download(preset.lora_id, revision=preset.lora_revision, allow_patterns=LORA_PATTERNS)
    return Path(folder)


@contextlib.contextmanager
def _pull_errors(preset: Preset, repo_id: str, revision: str | None) -> Iterator[None]:
    """Turn what huggingface_hub raises (offline, missing repo or revision, HTTP, disk) into a ProbeError."""
    import huggingface_hub.errors as hf_errors

    # Every exception class huggingface_hub.errors defines, plus the OS and value errors it lets through.
    caught: tuple[type[Exception], ...] = (OSError, ValueError, *(
        v for v in vars(hf_errors).values() if isinstance(v, type) and issubclass(v, Exception)
    ))
    try:
        yield
    except caught as error:
        from huggingface_hub import constants

        offline = " HF_HUB_OFFLINE is set: unset it to download." if constants.HF_HUB_OFFLINE else ""
        raise ProbeError(
            f"cannot pull preset {preset.name!r}: downloading {repo_id} (revision {revision or 'main'}) failed: "
            f"{type(error).__name__}: {_first_line(error)}.{offline} `probe models pull` needs internet access to "
            "the Hugging Face Hub (and a token for gated repos: `hf auth login`); on a machine without it, copy a "
            f"Hugging Face cache that holds the weights into {_hub_cache()}, or point the suite at a downloaded "
            "copy with `model_id: /path/to/folder`."
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else "no details"
