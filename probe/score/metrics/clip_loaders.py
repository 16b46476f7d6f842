"""Loading CLIP models for the CLIP metrics: the embedded tiny model, a local folder, the local HF cache, or
an open_clip architecture with a weights file. Each becomes the same small `Encoders` record.

Loading never touches the network: a hub id that is not cached fails at once with a message saying how to
provide it, instead of a long timeout or a download in the middle of a run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from probe.errors import ProbeError
from probe.spec.metric_catalog import DEFAULT_CLIP_MODEL

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_CLIP_REVISION = "32bd64288804d66eefd0ccbe215aa642df71cc41"
#: Pinned revisions of hub ids we know, used when the spec names none.
KNOWN_REVISIONS = {DEFAULT_CLIP_MODEL: DEFAULT_CLIP_REVISION}


@dataclass
class Encoders:
    """What the CLIP metrics need from a model, whatever library it comes from."""

    model_id: str
    revision: str
    preprocessing: str
    max_tokens: int
    encode_images: Callable[[list[Image.Image]], Any]
    encode_texts: Callable[[list[str]], Any]
    count_tokens: Callable[[str], int]
    dtype: str = "float32"
    """The weights' and activations' dtype: float16 on CUDA (`clip_dtype`), float32 elsewhere."""
    logit_scale: Callable[[], float] | None = None
    """exp(the model's learnt logit scale), read from the weights (PickScore multiplies its cosine by it)."""
    processor_id: str = ""
    """Where the tokenizer and image processor came from when not from the model's own folder (PickScore's
    are LAION CLIP-H's); part of the extractor ids."""

    def run(self, encode: Callable[[Any], Any], inputs: Any) -> np.ndarray:
        """Call an encoder without autograd and return float32 numpy rows."""
        import torch

        with torch.inference_mode():
            return _as_array(encode(inputs))


def _as_array(output: Any) -> np.ndarray:
    """Projected embeddings from a tensor or a ModelOutput.

    transformers < 5 returns the projected embeddings as a tensor; transformers 5 returns a
    BaseModelOutputWithPooling whose `pooler_output` holds the projected embeddings (modeling_clip.py
    overwrites it with `visual_projection` / `text_projection` of the pooled output).
    """
    import torch

    if not isinstance(output, torch.Tensor):
        pooled = getattr(output, "pooler_output", None)
        if pooled is None and isinstance(output, tuple):
            pooled = output[1]
        if not isinstance(pooled, torch.Tensor):
            raise TypeError(f"cannot find projected embeddings in {type(output).__name__}")
        output = pooled
    return output.detach().float().cpu().numpy()


def _fingerprint(files: list[Path]) -> str:
    """Content hash of the files that make a model, as its revision when it has no hub commit."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def _describe_image_processor(image_processor: Any) -> str:
    """The preprocessing choices that change pixels, with the class (PIL and torchvision backends differ)."""
    config = image_processor.to_dict()
    keys = ("size", "crop_size", "resample", "do_center_crop", "do_rescale", "do_normalize", "image_mean",
            "image_std")
    chosen = {key: config.get(key) for key in keys}
    return type(image_processor).__name__ + json.dumps(chosen, sort_keys=True, separators=(",", ":"))


def clip_dtype(device: str) -> str:
    """float16 on CUDA (tensor cores: about twice the embeddings per second, cosines within 1e-3 of float32),
    float32 on CPU and MPS, where half precision is slower or incomplete."""
    return "float16" if device.startswith("cuda") else "float32"


class _LazyModel:
    """The CLIP weights, loaded on the first embedding rather than when the run starts: the metrics are built
    (and their files checked) in pre-flight, but the weights only take memory once scoring begins."""

    def __init__(self, load: Callable[[], Any], device: str, dtype: Any) -> None:
        self._load, self._device, self._dtype = load, device, dtype
        self._model: Any = None
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        with self._lock:  # the scorer thread and the final pass never overlap, but a user's threads might
            if self._model is None:
                self._model = self._load().to(device=self._device, dtype=self._dtype).eval()
            return self._model


def _hf_encoders(load: Callable[[], Any], processor: Any, device: str, model_id: str, revision: str,
                 dtype: str, text_positions: int) -> Encoders:
    """Encoders over the CLIPModel `load` returns, loaded on first use; `text_positions` (the text config's
    max_position_embeddings, `_text_positions`) is known before the weights are."""
    import torch

    torch_dtype = getattr(torch, dtype)
    get_model = _LazyModel(load, device, torch_dtype)
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    max_tokens = min(tokenizer.model_max_length, text_positions)

    def encode_images(images: list[Image.Image]) -> Any:
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
        return get_model().get_image_features(pixel_values=pixels.to(device=device, dtype=torch_dtype))

    def encode_texts(texts: list[str]) -> Any:
        # Explicit truncation keeps the end token that CLIP pools at (slicing ids would drop it).
        tokens = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        return get_model().get_text_features(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
        )

    def count_tokens(text: str) -> int:
        # tokenize() + special tokens: the untruncated length, without the too-long-sequence warning.
        return len(tokenizer.tokenize(text)) + tokenizer.num_special_tokens_to_add(pair=False)

    def logit_scale() -> float:
        return float(get_model().logit_scale.detach().float().exp())

    preprocessing = _describe_image_processor(image_processor)
    return Encoders(model_id, revision, preprocessing, max_tokens, encode_images, encode_texts, count_tokens, dtype,
                    logit_scale)


def _split_revision(spec: str, revision: str | None) -> tuple[str, str]:
    if "@" in spec:
        spec, revision = spec.split("@", 1)
    return spec, revision or KNOWN_REVISIONS.get(spec, "main")


def _not_cached(model_id: str, revision: str, reason: str) -> ProbeError:
    return ProbeError(
        f"CLIP model {model_id!r} (revision {revision}) is not available offline: {reason}. "
        f"Fetch it on a machine with internet with `hf download {model_id} --revision {revision}` "
        f"(`huggingface-cli download` in older huggingface_hub), or point `clip_model:` in the suite "
        f"(or `--clip-model`) at a local folder holding it; `tiny` selects the embedded test model."
    )


def _weights_present(folder: Path) -> bool:
    """Whether a transformers checkpoint folder holds its weights: one file, or an index with all its shards."""
    if any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        return True
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        try:
            shards = set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            continue
        return all((folder / shard).is_file() for shard in shards)
    return False


def _snapshot_lacks(folder: Path, processor: bool = True) -> list[str]:
    """What a cached CLIP snapshot lacks for CLIPModel + CLIPProcessor (checked before loading: transformers'
    own error for a missing file is a long OSError, and a missing vocabulary can pass silently); `processor`
    False: only the model is needed (the processor comes from elsewhere)."""
    lacks = [] if _weights_present(folder) else ["its weights (model.safetensors)"]
    if not processor:
        return lacks
    if not any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        lacks.append("preprocessor_config.json")  # transformers 5 saves processor_config.json instead
    if not ((folder / "tokenizer.json").is_file() or all((folder / f).is_file() for f in ("vocab.json", "merges.txt"))):
        lacks.append("its tokenizer (vocab.json and merges.txt, or tokenizer.json)")
    return lacks


def _cached_snapshot(model_id: str, revision: str, processor: bool = True) -> Path:
    """The local HF cache's snapshot of a hub id (its folder name is the resolved commit), checked complete."""
    from huggingface_hub import constants, try_to_load_from_cache

    found = try_to_load_from_cache(model_id, "config.json", revision=revision)
    if not isinstance(found, str):
        raise _not_cached(model_id, revision, f"not in the Hugging Face cache {constants.HF_HUB_CACHE}")
    snapshot = Path(found).parent
    lacks = _snapshot_lacks(snapshot, processor)
    if lacks:
        raise _not_cached(model_id, revision, f"its cached snapshot {snapshot} lacks {', '.join(lacks)}")
    return snapshot


def _load_processor(spec: str) -> tuple[Any, str]:
    """A CLIPProcessor from a folder or a cached hub id[@revision], and what names it in extractor ids."""
    from transformers import CLIPProcessor

    folder = Path(spec).expanduser()
    if folder.is_dir():
        where, name = folder, f"{folder.resolve()}@{_fingerprint([p for p in folder.iterdir() if p.is_file()])}"
    else:
        model_id, revision = _split_revision(spec, None)
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_id, "config.json", revision=revision)
        if not isinstance(found, str):
            found = try_to_load_from_cache(model_id, "preprocessor_config.json", revision=revision)
        if not isinstance(found, str):
            raise _not_cached(model_id, revision, "its processor is not in the Hugging Face cache")
        where = Path(found).parent
        name = f"{model_id}@{where.name}"
    lacks = [m for m in _snapshot_lacks(where) if "weights" not in m]
    if lacks:
        raise ProbeError(f"the CLIP processor {spec!r} ({where}) lacks {', '.join(lacks)}")
    try:
        return CLIPProcessor.from_pretrained(where, local_files_only=True), name
    except OSError as error:
        raise ProbeError(f"cannot load the CLIP processor {spec!r} from {where}: {error}") from error


def _load_hub(model_id: str, revision: str, device: str, dtype: str, processor_spec: str | None = None) -> Encoders:
    """From the local HF cache only; the snapshot folder's name is the resolved commit."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    snapshot = _cached_snapshot(model_id, revision, processor=processor_spec is None)
    try:
        config = CLIPConfig.from_pretrained(snapshot, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(snapshot, local_files_only=True) if processor_spec is None else None
    except OSError as error:
        raise _not_cached(model_id, revision, f"incomplete in the cache ({error})") from error
    processor_id = ""
    if processor_spec is not None:
        processor, processor_id = _load_processor(processor_spec)

    def load() -> Any:
        return CLIPModel.from_pretrained(snapshot, local_files_only=True)

    encoders = _hf_encoders(load, processor, device, model_id, snapshot.name, dtype, _text_positions(config))
    encoders.processor_id = processor_id
    return encoders


def _load_folder(folder: Path, device: str, dtype: str, processor_spec: str | None = None) -> Encoders:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    lacks = _snapshot_lacks(folder, processor=processor_spec is None)
    if lacks:
        raise ProbeError(f"cannot load a CLIP model from folder {folder}: it lacks {', '.join(lacks)}")
    try:
        config = CLIPConfig.from_pretrained(folder, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True) if processor_spec is None else None
    except OSError as error:
        raise ProbeError(f"cannot load a CLIP model from folder {folder}: {error}") from error
    processor_id = ""
    if processor_spec is not None:
        processor, processor_id = _load_processor(processor_spec)
    revision = _fingerprint([path for path in folder.iterdir() if path.is_file()])

    def load() -> Any:
        try:
            return CLIPModel.from_pretrained(folder, local_files_only=True)
        except OSError as error:
            raise ProbeError(f"cannot load a CLIP model from folder {folder}: {error}") from error

    encoders = _hf_encoders(load, processor, device, str(folder), revision, dtype, _text_positions(config))
    encoders.processor_id = processor_id
    return encoders


def _text_positions(config: Any) -> int:
    """The text encoder's max_position_embeddings, read from the config without loading the weights."""
    return int(config.text_config.max_position_embeddings)


def _load_tiny(device: str, dtype: str) -> Encoders:
    from probe.embedded.tiny_clip import TINY_CLIP_REVISION, build_tiny_clip

    model, processor = build_tiny_clip()
    return _hf_encoders(lambda: model, processor, device, "tiny", TINY_CLIP_REVISION, dtype,
                        _text_positions(model.config))


def _load_open_clip(arch: str, weights: Path, device: str, dtype: str) -> Encoders:
    """open_clip architecture + weights file; only BPE-tokenizer archs (OpenAI/LAION ViTs such as ViT-H-14).

    The weights load on the first embedding (like the Hugging Face encoders); the preprocessing they will use is
    worked out now from the architecture's config, as open_clip does for a weights file, and checked against
    open_clip's own transforms when the model loads, so the extractor id can never name another preprocessing.
    """
    from dataclasses import asdict

    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    if not weights.is_file():
        raise ProbeError(f"open_clip weights file {weights} not found (spec open_clip:{arch}:{weights})")
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ProbeError(f"open_clip has no architecture {arch!r} (spec open_clip:{arch}:{weights}); see "
                         "open_clip.list_models()")
    tokenizer = open_clip.get_tokenizer(arch)
    if not isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer) or tokenizer.reduction_fn is not None:
        raise ProbeError(f"open_clip arch {arch!r} uses a tokenizer probe does not support (only CLIP BPE)")
    settings = merge_preprocess_dict(asdict(PreprocessCfg()), config.get("preprocess_cfg", {}))
    settings["size"] = config["vision_cfg"]["image_size"]
    preprocess = image_transform_v2(PreprocessCfg(**settings), is_train=False)
    preprocessing = "open_clip:" + " ".join(str(preprocess).split())
    torch_dtype = getattr(torch, dtype)

    def load() -> Any:
        model, _, real = open_clip.create_model_and_transforms(arch, pretrained=str(weights), device=device)
        if "open_clip:" + " ".join(str(real).split()) != preprocessing:
            raise ProbeError(f"open_clip's preprocessing for {arch} with {weights.name} is not the one probe "
                             f"derived from its config ({real} vs {preprocess}); report this with the spec")
        return model

    get_model = _LazyModel(load, device, torch_dtype)

    def encode_images(images: list[Image.Image]) -> Any:
        pixels = torch.stack([preprocess(image) for image in images])
        return get_model().encode_image(pixels.to(device=device, dtype=torch_dtype))

    def encode_texts(texts: list[str]) -> Any:
        return get_model().encode_text(tokenizer(texts).to(device))

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text)) + 2  # start and end tokens

    def logit_scale() -> float:
        return float(get_model().logit_scale.detach().float().exp())

    return Encoders(f"open_clip:{arch}", _fingerprint([weights]), preprocessing, tokenizer.context_length,
                    encode_images, encode_texts, count_tokens, dtype, logit_scale)


def load_encoders(spec: str, device: str = "cpu", revision: str | None = None, dtype: str | None = None,
                  processor: str | None = None) -> Encoders:
    """Load the CLIP model a spec names: "tiny", a folder, "open_clip:ARCH:FILE", or a hub id[@revision], in
    `dtype` (default: `clip_dtype(device)`); `processor` (a folder or hub id) supplies the tokenizer and image
    processor of a Hugging Face model whose own folder has none (PickScore)."""
    dtype = dtype or clip_dtype(device)
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ProbeError(f"CLIP dtype must be float32, float16 or bfloat16, not {dtype!r}")
    if spec == "tiny":
        return _load_tiny(device, dtype)
    if spec.startswith("open_clip:"):
        parts = spec.split(":", 2)
        if len(parts) != 3:
            raise ProbeError(f"open_clip spec must be open_clip:ARCH:WEIGHTS_FILE, got {spec!r}")
        return _load_open_clip(parts[1], Path(parts[2]).expanduser(), device, dtype)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return _load_folder(folder.resolve(), device, dtype, processor)
    model_id, resolved = _split_revision(spec, revision)
    return _load_hub(model_id, resolved, device, dtype, processor)
