"""Pre-flight: before any run folder exists, every pipeline, LoRA and metric checkpoint a run needs is proven
to be on disk (without loading it), and everything missing is reported at once, each with its fix. Also:
`probe models pull` fails without a traceback, and run folders are found in numeric order."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from probe.errors import ProbeError
from probe.run.driver import RunOptions, run_suite
from tests.conftest import probe_cli
from tests.test_pinning import COMMIT_A, COMMIT_B, empty_hub_cache, fake_repo, pipeline_files


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return empty_hub_cache(tmp_path, monkeypatch)


def run_fails(write_suite, tmp_path: Path, models: str, extra: str = "", metrics: str = "[]") -> str:
    """Run a suite that must fail pre-flight; the error text, after checking no run folder was made."""
    suite = write_suite(f"""
        name: pre
        models: {models}
        seeds: 1
        {extra}
        probes: [{{name: p, prompts: [x], steps: [1], metrics: {metrics}}}]
    """)
    with pytest.raises(ProbeError) as caught:
        run_suite(suite, RunOptions(reports_root=tmp_path / "reports", cache_dir=tmp_path / "cache", device="cpu"))
    assert not (tmp_path / "reports").exists(), "no run folder may exist before pre-flight passes"
    return str(caught.value)


def without(files: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: content for name, content in files.items() if name not in names}


NO_UNET = without(pipeline_files(), "unet/diffusion_pytorch_model.safetensors")


# --- the run as a whole ---------------------------------------------------------------------------------------------


def test_pipeline_snapshot_without_unet_weights_fails_before_any_run_folder(write_suite, tmp_path, hub):
    fake_repo(hub, "org/no-unet", COMMIT_A, NO_UNET)
    message = run_fails(write_suite, tmp_path, "[{preset: sd-turbo, model_id: org/no-unet}]")
    assert "org/no-unet" in message and f"revision {COMMIT_A}" in message
    assert "full-precision weights in unet/" in message and "vae/" not in message
    assert "hf download org/no-unet" in message and "model_id: /path/to/folder" in message


def test_lora_snapshot_without_weights_fails_before_any_run_folder(write_suite, tmp_path, hub):
    fake_repo(hub, "org/empty-lora", COMMIT_B, {"README.md": "a LoRA card, no weights"})
    message = run_fails(write_suite, tmp_path, "[{preset: tiny, lora_id: org/empty-lora}]")
    assert "LoRA org/empty-lora" in message and "pytorch_lora_weights.safetensors" in message
    assert "lora_id: /path/to/lora" in message


def test_every_missing_thing_is_in_one_error(write_suite, tmp_path, hub):
    fake_repo(hub, "org/no-unet", COMMIT_A, NO_UNET)
    fake_repo(hub, "org/empty-lora", COMMIT_B, {"README.md": "no weights"})
    models = "[{preset: sd-turbo, model_id: org/no-unet}, {preset: tiny, name: tiny-lora, lora_id: org/empty-lora}]"
    message = run_fails(write_suite, tmp_path, models, extra="clip_model: org/missing-clip", metrics="[clip_score]")
    assert "3 problem(s)" in message
    assert "org/no-unet" in message and "LoRA org/empty-lora" in message
    assert "hf download org/missing-clip" in message  # metric preparation is part of the same report


def test_metric_problems_alone_keep_their_own_message(write_suite, tmp_path, hub):
    message = run_fails(write_suite, tmp_path, "[tiny]", extra="clip_model: org/missing-clip", metrics="[clip_score]")
    assert message.startswith("CLIP model 'org/missing-clip'")


def test_prepare_metrics_tries_every_metric(monkeypatch, tmp_path):
    from probe.score import scorer as scoring
    from probe.score.protocol import ScoringContext
    from probe.spec.schema import MetricSpec
    from probe.store.features import FeatureCache

    class Broken:
        def __init__(self, reason: str) -> None:
            self.reason = reason

        def config(self, ctx: ScoringContext) -> dict[str, Any]:
            raise ProbeError(self.reason)

    reasons = {"clip_score": "CLIP weights missing", "cmmd": "CLIP weights missing", "fid": "Inception sha256 mismatch"}
    monkeypatch.setattr(scoring, "build_metric", lambda name, args: Broken(reasons[name]))
    specs = {"a": [MetricSpec(name="clip_score"), MetricSpec(name="fid")], "b": [MetricSpec(name="cmmd")]}
    with pytest.raises(ProbeError) as caught:
        scoring.prepare_metrics(specs, ScoringContext(features=FeatureCache(tmp_path)))
    message = str(caught.value)
    assert message.startswith("2 metric problems")
    assert "CLIP weights missing (needed by clip_score in a, cmmd in b)" in message
    assert "Inception sha256 mismatch (needed by fid in a)" in message


# --- what counts as loadable ----------------------------------------------------------------------------------------


def hub_job(dtype: str = "float32", repo: str = "org/model", **fields: Any):
    from probe.planning.job import Job

    values: dict[str, Any] = dict(
        probe="p", model="m", preset="sd-turbo", model_id=repo, revision=COMMIT_A, scheduler="repo-default",
        dtype=dtype, device_class="cuda" if dtype == "float16" else "cpu", mode="txt2img", prompt="x", seed=0,
        steps=1, guidance=0.0, width=64, height=64,
    )  # fmt: skip
    values.update(fields)
    return Job(**values)


def problems(job) -> list[str]:
    from probe.generate.loading import job_problems

    return job_problems(job)


def test_a_complete_snapshot_passes(hub):
    fake_repo(hub, "org/model", COMMIT_A, pipeline_files())
    assert problems(hub_job()) == [] and problems(hub_job("float16")) == []


def test_fp16_files_serve_float16_only(hub):
    fake_repo(hub, "org/model", COMMIT_A, pipeline_files(fp32=False, fp16=True))
    assert problems(hub_job("float16")) == []
    (missing,) = problems(hub_job("float32"))
    assert "full-precision weights in text_encoder/" in missing and "unet/" in missing and "vae/" in missing


def test_float16_casts_full_precision_when_a_component_lacks_fp16(hub):
    # diffusers picks the variant per component and falls back to the full-precision files (which are what the
    # fp16 files are rounded from), so that snapshot loads; a component with neither does not.
    files = without(pipeline_files(fp16=True), "vae/diffusion_pytorch_model.fp16.safetensors")
    fake_repo(hub, "org/model", COMMIT_A, files)
    assert problems(hub_job("float16")) == []
    fake_repo(hub, "org/other", COMMIT_A, without(files, "vae/diffusion_pytorch_model.safetensors"))
    (missing,) = problems(hub_job("float16", repo="org/other"))
    assert "fp16 or full-precision weights in vae/" in missing


def test_sharded_weights_need_every_shard(hub):
    index = {"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                            "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    files = without(pipeline_files(), "unet/diffusion_pytorch_model.safetensors")
    files["unet/diffusion_pytorch_model.safetensors.index.json"] = json.dumps(index)
    files["unet/diffusion_pytorch_model-00001-of-00002.safetensors"] = b"half"
    fake_repo(hub, "org/model", COMMIT_A, files)
    (missing,) = problems(hub_job())
    assert "1 of the 2 shards" in missing and "00002-of-00002" in missing
    (hub / "models--org--model" / "snapshots" / COMMIT_A / "unet" / index["weight_map"]["b"]).write_bytes(b"rest")
    assert problems(hub_job()) == []


def test_a_weights_link_whose_blob_is_gone_is_missing(hub):
    snapshot = fake_repo(hub, "org/model", COMMIT_A, without(pipeline_files(), "unet/diffusion_pytorch_model.safetensors"))
    (snapshot / "unet" / "diffusion_pytorch_model.safetensors").symlink_to("../../../blobs/deleted")
    (missing,) = problems(hub_job())
    assert "unet/" in missing


def test_local_folder_without_weights_names_the_folder_and_the_fix(tmp_path):
    folder = tmp_path / "ft"
    for name, content in NO_UNET.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    (missing,) = problems(hub_job(repo=str(folder), revision="local-x"))
    assert str(folder) in missing and "unet/" in missing and "model_id:" in missing
    (nowhere,) = problems(hub_job(repo=str(tmp_path / "nowhere"), revision=None))
    assert "does not exist" in nowhere


def test_lora_folder_with_several_unnamed_weights_is_ambiguous(tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (folder / name).write_bytes(b"x")
    tiny = dict(preset="tiny", model_id="probe/tiny", revision="tiny-v1", lora_id=str(folder), lora_revision="local-x")
    (missing,) = problems(hub_job(**tiny))
    assert "ambiguous" in missing and "lora_id: /path/to/lora" in missing
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    assert problems(hub_job(**tiny)) == []


def test_clip_snapshot_without_weights_is_reported_before_loading(hub):
    from probe.embedded.tiny_clip import save_tiny_clip
    from probe.score.metrics.clip_loaders import load_encoders

    snapshot = save_tiny_clip(hub / "models--org--clip" / "snapshots" / COMMIT_A)
    (hub / "models--org--clip" / "refs").mkdir()
    (hub / "models--org--clip" / "refs" / "main").write_text(COMMIT_A)
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(ProbeError) as caught:
        load_encoders("org/clip")
    assert "lacks its weights" in str(caught.value) and "hf download org/clip" in str(caught.value)


# --- probe models pull ----------------------------------------------------------------------------------------------


def test_pull_offline_is_one_clear_error_without_traceback(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    proc = probe_cli("models", "pull", "sd-turbo", env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    message = " ".join(proc.stderr.split())  # rich wraps long lines
    for needle in ("'sd-turbo'", "stabilityai/sd-turbo", "b261bac6fd2cf515557d5d0707481eafa0485ec2",
                   "HF_HUB_OFFLINE is set", "needs internet access"):
        assert needle in message, needle


def test_pull_wraps_http_errors(monkeypatch):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    from probe.generate.loading import pull
    from probe.spec.presets import get_preset

    response = httpx2.Response(503, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))

    def unavailable(*args: Any, **kwargs: Any) -> str:
        raise HfHubHTTPError("503 Service Unavailable", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unavailable)
    with pytest.raises(ProbeError, match=r"cannot pull preset 'sd21'.*HfHubHTTPError: 503 Service Unavailable"):
        pull(get_preset("sd21"))


# --- run folders ----------------------------------------------------------------------------------------------------


def test_newest_run_folder_is_found_in_numeric_order(tmp_path, monkeypatch):
    from probe.run.folder import RunDir
    from probe.run.records import RunManifest

    monkeypatch.setattr(time, "strftime", lambda fmt, t=None: "20250101-120000")  # all made in one second
    runs = [RunDir.create(tmp_path) for _ in range(12)]
    assert [r.path.name for r in runs[-3:]] == ["20250101-120000-9", "20250101-120000-10", "20250101-120000-11"]
    for i, run in enumerate(runs):
        run.write_manifest(RunManifest(
            probe_version="t", suite_name="s", suite_path="s.yaml", suite_sha256="", suite={}, plan_sha256="plan",
            presets={}, device={}, packages={}, status="running" if i == 11 else "complete", started_at=str(i),
        ))  # fmt: skip
    os.symlink(runs[0].path.name, tmp_path / "latest")
    found = RunDir.find_resumable(tmp_path, "plan")
    assert found is not None and found.path.name == "20250101-120000-11"  # by name, "-11" sorts before "-2"
