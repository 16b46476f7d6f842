"""What a model reference points at on disk: pins for Job keys, and whether its weight files are all there.

Pins make Job keys change when the weights do, and only then:

- A hub revision that is a branch or tag (`main`, `v1.0`, or none given, which means `main`) is resolved to the
  commit the local Hugging Face cache holds for it (`refs/<name>`), so when the branch moves the key moves too.
  A 40-hex commit is pinned already. A name the cache does not know is left as given: pre-flight then reports
  it as not cached.
- A local folder (or LoRA file) is pinned by the sha256 of its contents, not by where it lies or when it was
  touched: moving, copying or `touch`ing it keeps its images; changing a byte makes new ones. File hashes are
  memoised in the probe cache by (path, size, mtime, ctime, inode), so a multi-GB folder is read once.

The weight-file checks answer, without loading anything, whether a pipeline folder or cached snapshot holds
every file its models load (per component, for the planned precision, every shard of a sharded checkpoint),
and which weights file of a LoRA folder would be fused. No network, no torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from probe.spec.presets import TINY_ID
from probe.store.hashing import file_sha256

logger = logging.getLogger(__name__)

#: Prefix of the revision a local folder or file is pinned to; `Job.pixel_inputs` keys such models by it.
LOCAL_PREFIX = "local-"
_COMMIT = re.compile(r"[0-9a-f]{40}")
FP16_WEIGHTS = "*.fp16*.safetensors"  # also matches sharded "x.fp16-00001-of-00002.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
#: Components never loaded (the pipeline is built with safety_checker=None), so never downloaded or checked.
SKIPPED_COMPONENTS = {"safety_checker"}
#: Class-name endings of pipeline components that hold no weights (model_index.json lists them beside models).
_NO_WEIGHTS = ("Tokenizer", "TokenizerFast", "Scheduler", "ImageProcessor", "FeatureExtractor", "Processor")
_WEIGHT_SUFFIXES = ("safetensors", "bin")
_SHARD = re.compile(r"-\d{5}-of-\d{5}")


def looks_like_path(reference: str) -> bool:
    """A model reference that names a local folder or file rather than a hub id."""
    return reference.startswith((".", "/", "~")) or Path(reference).expanduser().exists()


def is_commit(revision: str | None) -> bool:
    """Whether a hub revision is a full commit hash (branches and tags move; commits do not)."""
    return revision is not None and _COMMIT.fullmatch(revision) is not None


def _content_files(folder: Path) -> list[Path]:
    """Files under `folder` in name order, without hidden paths (.git, the .cache/ that `hf download
    --local-dir` writes with timestamps): those do not decide the weights."""
    files = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def local_fingerprint(path: Path) -> str:
    """'local-<hash>' of the contents of a file, or of the relative names and contents of a folder's files."""
    if path.is_file():
        return LOCAL_PREFIX + file_sha256(path)[:32]
    digest = hashlib.sha256()
    for file in _content_files(path):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return LOCAL_PREFIX + digest.hexdigest()[:32]


def cached_ref(repo_id: str, revision: str | None) -> str | None:
    """The commit a branch or tag points at in the local Hugging Face cache (None: not cached). No network."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs"
    try:
        commit = (ref / (revision or "main")).read_text(encoding="utf-8").strip()
    except (OSError, ValueError):  # not cached, or a name that cannot be a file
        return None
    return commit if is_commit(commit) else None


def pin(reference: str | None, revision: str | None, base: Path) -> tuple[str | None, str | None]:
    """(reference, revision) as the key should see them: local paths made absolute and pinned by content,
    hub branches and tags resolved to the cached commit."""
    if reference is None or reference == TINY_ID:
        return reference, revision
    if looks_like_path(reference):
        path = Path(reference).expanduser()
        path = path if path.is_absolute() else (base / path).resolve()
        return str(path), local_fingerprint(path) if path.exists() else revision
    if is_commit(revision):
        return reference, revision
    return reference, cached_ref(reference, revision) or revision


# --- weight files on disk ---------------------------------------------------------------------------------------


def snapshot_folder(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of a hub repo at a revision (branch, tag or commit); None if not cached."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    commit = revision if is_commit(revision) else cached_ref(repo_id, revision)
    if commit is None:
        return None
    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / commit
    return folder if folder.is_dir() else None


def _weight_components(model_index: Path) -> list[str]:
    """Components of a pipeline that load weights: models, not tokenizers, schedulers or feature extractors."""
    index = json.loads(model_index.read_text(encoding="utf-8"))
    return [name for name in pipeline_components(model_index) if not str(index[name][-1]).endswith(_NO_WEIGHTS)]


def _weight_kind(name: str) -> tuple[str, bool] | None:
    """('single' | 'shard' | 'index', is fp16 variant) for a weight file name, None for other files.

    Names as diffusers and transformers write them: model.safetensors, model.fp16.safetensors,
    model-00001-of-00002.safetensors, model.fp16-00001-of-00002.safetensors, model.safetensors.index.json,
    model.safetensors.index.fp16.json (and the legacy model-00001-of-00002.fp16.safetensors).
    """
    parts = name.split(".")
    if len(parts) >= 4 and parts[-1] == "json" and parts[1] in _WEIGHT_SUFFIXES and "index" in parts:
        return "index", "fp16" in parts
    if len(parts) < 2 or parts[-1] not in _WEIGHT_SUFFIXES:
        return None
    return ("shard" if _SHARD.search(name) else "single"), any(p.startswith("fp16") for p in parts[1:-1])


def _component_lacks(folder: Path, fp16: bool) -> str | None:
    """What a model component folder lacks to load (None: nothing). diffusers picks per component: the fp16
    files when it is asked for the variant (`fp16`) and the folder has them, else the full-precision ones."""
    if not (folder / "config.json").is_file():
        return f"{folder.name}/config.json" if folder.is_dir() else f"{folder.name}/"
    kinds = {p.name: kind for p in folder.iterdir() if p.is_file() and (kind := _weight_kind(p.name))}
    variant = fp16 and any(is_fp16 for _, is_fp16 in kinds.values())
    wanted = {name: kind for name, (kind, is_fp16) in kinds.items() if is_fp16 == variant}
    if "single" in wanted.values():
        return None
    for index in sorted(name for name, kind in wanted.items() if kind == "index"):
        try:
            shards = set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return f"a readable {folder.name}/{index}"
        missing = sorted(shard for shard in shards if not (folder / shard).is_file())
        if not missing:
            return None
        return f"{len(missing)} of the {len(shards)} shards listed in {folder.name}/{index} (e.g. {missing[0]})"
    return f"{'fp16 or full-precision' if fp16 else 'full-precision'} weights in {folder.name}/ (*.safetensors)"


def pipeline_lacks(folder: Path, fp16: bool) -> list[str]:
    """What a pipeline folder lacks to load: model_index.json, and config + weights of each model component.

    `fp16`: the run wants the fp16 variant. Like probe's loader, it asks diffusers for it only when the folder
    has fp16 files at all; diffusers then takes them per component where present, else full precision.
    """
    fp16 = fp16 and any(folder.glob(f"*/{FP16_WEIGHTS}"))
    index = folder / "model_index.json"
    try:
        components = _weight_components(index)
    except (OSError, ValueError, AttributeError, IndexError):
        return ["a readable model_index.json"]
    lacks = [_component_lacks(folder / name, fp16) for name in components]
    return [item for item in lacks if item]


def lora_weights_file(folder: Path) -> tuple[Path | None, str]:
    """The weights file diffusers' load_lora_weights picks in a folder, or what the folder lacks."""
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    named = [p for p in files if p.name == LORA_WEIGHTS]
    if named or len(files) == 1:
        return (named or files)[0], ""
    if files:  # diffusers would take the first one os.listdir returns: pixels must not depend on that
        return None, f"a {LORA_WEIGHTS} among its {len(files)} *.safetensors files (which one to load is ambiguous)"
    return None, f"a weights file ({LORA_WEIGHTS} or a single *.safetensors)"


def pipeline_components(model_index: Path) -> list[str]:
    """Component folders a pipeline loads, read from its model_index.json."""
    index = json.loads(model_index.read_text(encoding="utf-8"))
    return sorted(
        name
        for name, value in index.items()
        if isinstance(value, list) and value and value[0] is not None and name not in SKIPPED_COMPONENTS
    )
