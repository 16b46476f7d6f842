"""Pinning what a model reference points at: hub branches and tags become cached commits, local folders and
LoRA files are keyed by their bytes (not their path or mtimes), and the records keep what humans read."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from probe.planning.planner import plan_jobs, resolve_model
from probe.run.folder import RunDir
from probe.spec.loader import load_suite

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
COMMIT_C = "c" * 40

#: A Stable Diffusion model_index.json: three weight components, four without weights, two never loaded.
SD_INDEX = {
    "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    "feature_extractor": ["transformers", "CLIPImageProcessor"], "safety_checker": [None, None],
    "image_encoder": [None, None],
}  # fmt: skip
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def pipeline_files(*, fp32: bool = True, fp16: bool = False) -> dict[str, str | bytes]:
    """Files of a pipeline snapshot as `probe models pull` leaves it (weights are stand-in bytes: nothing
    here loads them)."""
    files: dict[str, str | bytes] = {
        "model_index.json": json.dumps(SD_INDEX), "scheduler/scheduler_config.json": "{}",
        "tokenizer/vocab.json": "{}", "tokenizer/merges.txt": "", "feature_extractor/preprocessor_config.json": "{}",
    }  # fmt: skip
    for component, stem in WEIGHT_STEMS.items():
        files[f"{component}/config.json"] = "{}"
        if fp32:
            files[f"{component}/{stem}.safetensors"] = b"float32 " + component.encode()
        if fp16:
            files[f"{component}/{stem}.fp16.safetensors"] = b"fp16 " + component.encode()
    return files


def fake_repo(hub: Path, repo_id: str, commit: str, files: dict[str, str | bytes], ref: str | None = "main") -> Path:
    """A repo in the Hugging Face cache layout: snapshots/<commit>/..., and refs/<ref> holding the commit."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = snapshot / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    if ref is not None:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face hub cache that huggingface_hub (and probe) read instead of the real one."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return empty_hub_cache(tmp_path, monkeypatch)


def suite_with(write_suite, model: str) -> Path:
    return write_suite(f"""
        name: pin
        models: [{model}]
        seeds: 1
        probes: [{{name: p, prompts: [x], steps: [1]}}]
    """)


# --- hub revisions ------------------------------------------------------------------------------------------------


def test_moving_branch_changes_the_key_and_the_recorded_commit(write_suite, hub, tmp_path):
    fake_repo(hub, "org/model", COMMIT_A, pipeline_files())
    loaded = load_suite(suite_with(write_suite, "{preset: sd-turbo, model_id: org/model, revision: main}"))
    before = plan_jobs(loaded)[0]
    assert before.revision == COMMIT_A

    fake_repo(hub, "org/model", COMMIT_B, pipeline_files())  # a later pull brought a new main
    after = plan_jobs(loaded)[0]
    assert after.revision == COMMIT_B and after.key != before.key
    assert resolve_model(loaded.suite.models[0], None, loaded.base_dir).as_record()["revision"] == COMMIT_B

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_jobs([after], {})
    row = pd.read_parquet(run.path / "jobs.parquet").iloc[0]
    assert row["revision"] == COMMIT_B and "lora_revision" in row.index


def test_no_revision_and_tags_resolve_too(write_suite, hub):
    fake_repo(hub, "org/model", COMMIT_A, pipeline_files())
    fake_repo(hub, "org/model", COMMIT_B, pipeline_files(), ref="v1.0")
    plain = plan_jobs(load_suite(suite_with(write_suite, "{preset: sd-turbo, model_id: org/model}")))[0]
    tagged = plan_jobs(load_suite(suite_with(write_suite, "{preset: sd-turbo, model_id: org/model, revision: v1.0}")))[0]
    assert (plain.revision, tagged.revision) == (COMMIT_A, COMMIT_B)


def test_commits_stay_and_unknown_branches_are_left_for_preflight(write_suite, hub):
    from probe.errors import ProbeError
    from probe.generate.loading import ensure_available

    fake_repo(hub, "org/model", COMMIT_A, pipeline_files())
    pinned = plan_jobs(load_suite(suite_with(write_suite, f"{{preset: sd-turbo, model_id: org/model, revision: {COMMIT_C}}}")))[0]
    assert pinned.revision == COMMIT_C  # a commit is never looked up, cached or not
    dev = plan_jobs(load_suite(suite_with(write_suite, "{preset: sd-turbo, model_id: org/model, revision: dev}")))[0]
    assert dev.revision == "dev"
    with pytest.raises(ProbeError, match=r"org/model \(revision dev\), which is not in the local"):
        ensure_available(dev)


def test_lora_branch_is_pinned_whatever_its_file_is_called(write_suite, hub):
    fake_repo(hub, "org/lora", COMMIT_A, {"my_lora.safetensors": b"l1"})
    path = suite_with(write_suite, "{preset: tiny, lora_id: org/lora}")
    first = plan_jobs(load_suite(path))[0]
    assert first.lora_revision == COMMIT_A
    fake_repo(hub, "org/lora", COMMIT_B, {"my_lora.safetensors": b"l2"})
    second = plan_jobs(load_suite(path))[0]
    assert second.lora_revision == COMMIT_B and second.key != first.key
    named = plan_jobs(load_suite(suite_with(write_suite, "{preset: tiny, lora_id: org/lora, lora_revision: main}")))[0]
    assert named.lora_revision == COMMIT_B


def test_model_override_is_pinned_like_suite_entries(write_suite, hub, monkeypatch):
    from probe.spec.presets import PRESETS, Preset

    custom = Preset(name="custom", description="a preset that follows a branch", model_id="org/model",
                    revision="main", family="sd", steps=(1,), guidance=0.0, size=(64, 64),
                    lora_id="org/lora", lora_revision="main")
    monkeypatch.setitem(PRESETS, "custom", custom)
    fake_repo(hub, "org/model", COMMIT_A, pipeline_files())
    fake_repo(hub, "org/lora", COMMIT_B, {"pytorch_lora_weights.safetensors": b"l"})
    job = plan_jobs(load_suite(suite_with(write_suite, "tiny")), model_override="custom")[0]
    assert (job.model_id, job.revision, job.lora_revision) == ("org/model", COMMIT_A, COMMIT_B)


def test_hub_keys_still_see_the_hub_id(write_suite, hub):
    fake_repo(hub, "org/model", COMMIT_A, pipeline_files())
    job = plan_jobs(load_suite(suite_with(write_suite, "{preset: sd-turbo, model_id: org/model}")))[0]
    assert job.pixel_inputs()["model_id"] == "org/model" and job.pixel_inputs()["revision"] == COMMIT_A


# --- local folders and files ----------------------------------------------------------------------------------------


def local_pipeline(folder: Path) -> Path:
    for name, content in pipeline_files().items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def local_job(write_suite, folder: str):
    return plan_jobs(load_suite(suite_with(write_suite, f"{{preset: sd-turbo, model_id: {folder}}}")))[0]


def test_local_folder_is_keyed_by_content_not_place_or_time(write_suite, tmp_path):
    local_pipeline(tmp_path / "ft")
    first = local_job(write_suite, "./ft")
    assert first.model_id == str(tmp_path / "ft")  # the record keeps the path for humans ...
    assert first.pixel_inputs()["model_id"] == "local:" + first.revision.removeprefix("local-")  # ... the key not

    os.utime(tmp_path / "ft" / "unet" / "diffusion_pytorch_model.safetensors")  # touch
    assert local_job(write_suite, "./ft").key == first.key
    (tmp_path / "ft").rename(tmp_path / "moved")
    moved = local_job(write_suite, "./moved")
    assert moved.key == first.key and moved.model_id == str(tmp_path / "moved")
    shutil.copytree(tmp_path / "moved", tmp_path / "copy")
    assert local_job(write_suite, str(tmp_path / "copy")).key == first.key

    hidden = tmp_path / "copy" / ".cache" / "huggingface" / "download" / "unet.metadata"  # hf download --local-dir
    hidden.parent.mkdir(parents=True)
    hidden.write_text("etag and a timestamp")
    assert local_job(write_suite, "./copy").key == first.key


def test_changed_bytes_change_the_key_even_with_the_old_size_and_mtime(write_suite, tmp_path):
    weights = local_pipeline(tmp_path / "ft") / "unet" / "diffusion_pytorch_model.safetensors"
    first = local_job(write_suite, "./ft")
    stat = weights.stat()
    weights.write_bytes(weights.read_bytes()[::-1])  # same size, other bytes
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime
    assert local_job(write_suite, "./ft").key != first.key


def test_file_hashes_are_memoised_in_the_probe_cache(write_suite, tmp_path, monkeypatch, isolated_cache):
    from probe.store import hashing

    local_pipeline(tmp_path / "ft")
    reads: list[Path] = []
    real = hashing._stream_sha256
    monkeypatch.setattr(hashing, "_stream_sha256", lambda path: reads.append(path) or real(path))
    first = local_job(write_suite, "./ft")
    assert len(reads) == len(pipeline_files())
    reads.clear()
    assert local_job(write_suite, "./ft").key == first.key
    assert reads == []  # the second plan reads no weights
    assert list((isolated_cache / "file-sha256").glob("*/*"))


def test_local_lora_file_is_keyed_by_content(write_suite, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "style.safetensors").write_bytes(b"lora v1")
    first = plan_jobs(load_suite(suite_with(write_suite, "{preset: tiny, lora_id: ./a/style.safetensors}")))[0]
    assert first.lora_id == str(tmp_path / "a" / "style.safetensors")
    assert first.pixel_inputs()["lora_id"].startswith("local:")
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "style.safetensors", tmp_path / "b" / "renamed.safetensors")
    copy = plan_jobs(load_suite(suite_with(write_suite, "{preset: tiny, lora_id: ./b/renamed.safetensors}")))[0]
    assert copy.key == first.key
    (tmp_path / "b" / "renamed.safetensors").write_bytes(b"lora v2")
    changed = plan_jobs(load_suite(suite_with(write_suite, "{preset: tiny, lora_id: ./b/renamed.safetensors}")))[0]
    assert changed.key != first.key
