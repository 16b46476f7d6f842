"""Generation on the embedded tiny model (CPU, float32): determinism, batching, paired latents, img2img
step counts, prompt-embedding reuse, offline loading errors, local folders, hub cache and LoRA."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from probe.embedded.tiny_sd import build_tiny_pipeline, build_tiny_tokenizer, tiny_fingerprint
from probe.errors import ProbeError
from probe.generate.adapter import PipelineAdapter, initial_latents
from probe.generate.loading import ensure_available, load_txt2img, parse_scheduler
from probe.planning.job import Job
from probe.spec.presets import TINY_ID

SCHEDULER = "EulerDiscreteScheduler(trailing)"


def make_job(**overrides: Any) -> Job:
    fields: dict[str, Any] = dict(
        probe="p", model="tiny", preset="tiny", model_id=TINY_ID, revision=None, scheduler=SCHEDULER,
        dtype="float32", device_class="cpu", mode="txt2img", prompt="a photo of a nurse", seed=0, steps=2,
        guidance=0.0, width=64, height=64,
    )  # fmt: skip
    fields.update(overrides)
    return Job(**fields)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a 2-core machine shared with other jobs, two OpenMP threads wait on each
    other and the tiny model runs ~10x slower (0.4 s vs 4 s for this file's batching test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapter() -> PipelineAdapter:
    return PipelineAdapter.for_job(make_job(), "cpu")


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-saved")
    build_tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def count_calls(module: torch.nn.Module) -> tuple[list[int], Any]:
    calls: list[int] = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_tiny_build_is_identical_and_fingerprinted() -> None:
    first, second = build_tiny_pipeline(), build_tiny_pipeline()
    assert tiny_fingerprint(first) == tiny_fingerprint(second)
    assert torch.equal(first.unet.conv_in.weight, second.unet.conv_in.weight)
    assert first.vae_scale_factor == 8
    with torch.no_grad():
        second.unet.conv_in.weight[0, 0, 0, 0] += 1e-3
    assert tiny_fingerprint(first) != tiny_fingerprint(second)


def test_tiny_build_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline()
    assert torch.equal(torch.rand(3), expected)


def test_tiny_tokenizer_is_real_bpe() -> None:
    tokenizer = build_tiny_tokenizer()
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a photo of a nurse").input_ids)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    assert tokens[1:4] == ["a</w>", "photo</w>", "of</w>"]
    assert "".join(tokens[5:-1]) == "nurse</w>"
    assert tokenizer.model_max_length == 77
    assert len(tokenizer("x", padding="max_length").input_ids) == 77


def test_same_seed_same_image_and_different_seed_differs(adapter: PipelineAdapter) -> None:
    first = adapter.generate([make_job(seed=7)])[0]
    again = adapter.generate([make_job(seed=7)])[0]
    other = adapter.generate([make_job(seed=8)])[0]
    assert first.size == (64, 64) and first.mode == "RGB"
    assert np.array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).mean() > 10


def test_prompt_changes_the_image(adapter: PipelineAdapter) -> None:
    nurse = adapter.generate([make_job(prompt="a photo of a nurse")])[0]
    car = adapter.generate([make_job(prompt="a red car")])[0]
    assert np.abs(pixels(nurse) - pixels(car)).mean() > 5


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_batched_equals_one_at_a_time(adapter: PipelineAdapter, guidance: float) -> None:
    # CPU kernels are not batch-invariant (oneDNN/BLAS pick other code paths for batch 1), so float
    # latents differ by ~1e-6: at most one uint8 level on a few pixels. A shared generator or mixed-up
    # embeddings would change whole images.
    jobs = [make_job(seed=s, guidance=guidance, prompt=p) for s, p in enumerate(["a cat", "a dog", "a cat", "a bus"])]
    batched = [pixels(im) for im in adapter.generate(jobs)]
    single = [pixels(adapter.generate([job])[0]) for job in jobs]
    for b, s in zip(batched, single, strict=True):
        assert np.abs(b - s).max() <= 1
        assert (b == s).mean() > 0.999  # measured: 0.01-0.02% of values differ


def test_cached_embeddings_match_the_pipeline_encoding(adapter: PipelineAdapter) -> None:
    for guidance in (0.0, 3.0):
        job = make_job(seed=3, guidance=guidance)
        ours = adapter.generate([job])[0]
        latents = initial_latents(3, adapter.latent_shape(64, 64))
        direct = adapter.txt2img(
            prompt=[job.prompt], latents=latents, generator=[torch.Generator().manual_seed(3)],
            num_inference_steps=job.steps, guidance_scale=guidance, width=64, height=64,
        ).images[0]  # fmt: skip
        assert np.array_equal(pixels(ours), pixels(direct))


def test_initial_latents_identical_across_step_counts(adapter: PipelineAdapter, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []
    original = adapter.txt2img.prepare_latents

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(kwargs["latents"] if "latents" in kwargs else args[-1])
        return original(*args, **kwargs)

    monkeypatch.setattr(adapter.txt2img, "prepare_latents", spy)
    for steps in (1, 2, 4):
        adapter.generate([make_job(seed=5, steps=steps)])
    adapter.generate([make_job(seed=6, steps=1)])
    expected = initial_latents(5, (1, 4, 8, 8))
    assert all(torch.equal(latents, expected) for latents in seen[:3])
    assert not torch.equal(seen[3], expected)


@pytest.mark.parametrize(("steps", "strength", "expected"), [(4, 0.5, 2), (2, 1.0, 2), (4, 0.25, 1)])
def test_img2img_runs_steps_times_strength(adapter: PipelineAdapter, steps: int, strength: float, expected: int) -> None:
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))
    job = make_job(mode="img2img", steps=steps, strength=strength, init_image="init.png", init_image_sha256="x")
    calls, handle = count_calls(adapter.txt2img.unet)
    try:
        images = adapter.generate([job, job.model_copy(update={"seed": 1})], {"init.png": init})
    finally:
        handle.remove()
    assert len(calls) == expected  # one batched UNet call per denoising step (no CFG)
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))


def test_img2img_without_init_image_is_a_probe_error(adapter: PipelineAdapter) -> None:
    job = make_job(mode="img2img", steps=2, strength=0.5, init_image="missing.png")
    with pytest.raises(ProbeError, match="init image"):
        adapter.generate([job], {})


def test_txt2img_runs_one_unet_call_per_step(adapter: PipelineAdapter) -> None:
    calls, handle = count_calls(adapter.txt2img.unet)
    try:
        adapter.generate([make_job(steps=3), make_job(steps=3, seed=1)])
    finally:
        handle.remove()
    assert len(calls) == 3


def test_prompt_embeddings_computed_once_per_prompt() -> None:
    adapter = PipelineAdapter.for_job(make_job(), "cpu")
    calls, handle = count_calls(adapter.txt2img.text_encoder)
    prompts = ["a cat", "a dog", "a bus"]
    try:
        for steps in (1, 2):
            jobs = [make_job(prompt=p, seed=s, steps=steps) for p in prompts for s in range(2)]
            adapter.generate(jobs)
        assert len(calls) == len(prompts)
        for seed in range(2):  # CFG on: only the shared empty negative prompt is new (positive + negative pass)
            adapter.generate([make_job(prompt=p, seed=seed, guidance=2.0) for p in prompts])
        assert len(calls) == len(prompts) + 2
    finally:
        handle.remove()


def test_jobs_with_different_batch_keys_are_refused(adapter: PipelineAdapter) -> None:
    with pytest.raises(ValueError, match="batch_key"):
        adapter.generate([make_job(steps=1), make_job(steps=2)])


def test_job_for_another_device_class_is_refused() -> None:
    with pytest.raises(ProbeError, match="cuda"):
        PipelineAdapter.for_job(make_job(device_class="cuda", dtype="float16"), "cpu")


@pytest.mark.parametrize("offline", ["1", None])
def test_uncached_hub_id_fails_fast_with_instructions(
    empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch, offline: str | None
) -> None:
    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    start = time.monotonic()
    with pytest.raises(ProbeError) as caught:
        load_txt2img("sd-turbo", "stabilityai/sd-turbo", "b261bac6fd2cf515557d5d0707481eafa0485ec2", dtype="float32")
    message = str(caught.value)
    assert "'sd-turbo'" in message and "stabilityai/sd-turbo" in message and "b261bac6" in message
    assert "probe models pull sd-turbo" in message and "model_id:" in message
    assert time.monotonic() - start < 30  # generous: the point is no network retries (measured ~0.01 s)


def test_ensure_available_checks_without_loading(empty_hub_cache: Path) -> None:
    ensure_available(make_job())  # the tiny model is always available
    hub_job = make_job(preset="sd-turbo", model_id="stabilityai/sd-turbo", revision="b261bac6fd2cf515557d5d0707481eafa0485ec2")
    with pytest.raises(ProbeError, match="probe models pull sd-turbo"):
        ensure_available(hub_job)
    with pytest.raises(ProbeError, match="lcm-lora"):
        ensure_available(make_job(lora_id="latent-consistency/lcm-lora-sdv1-5"))


def test_uncached_lora_fails_fast(empty_hub_cache: Path) -> None:
    with pytest.raises(ProbeError, match="latent-consistency/lcm-lora-sdv1-5"):
        load_txt2img("tiny", TINY_ID, None, lora_id="latent-consistency/lcm-lora-sdv1-5", scheduler=SCHEDULER)


def test_local_folder_round_trip(adapter: PipelineAdapter, saved_tiny: Path) -> None:
    job = make_job(seed=11, model_id=str(saved_tiny))
    loaded = PipelineAdapter(load_txt2img("tiny", str(saved_tiny), None, scheduler=SCHEDULER), "cpu")
    built = adapter.generate([make_job(seed=11)])[0]
    assert np.array_equal(pixels(loaded.generate([job])[0]), pixels(built))


def _fake_snapshot(cache: Path, repo_id: str, source: Path) -> Path:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_cached_hub_id_loads_offline(
    adapter: PipelineAdapter, saved_tiny: Path, empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _fake_snapshot(empty_hub_cache, "someone/tiny-sd", saved_tiny)
    pipe = load_txt2img("sd-turbo", "someone/tiny-sd", None, scheduler=SCHEDULER)
    job = make_job(seed=2, model_id="someone/tiny-sd")
    assert np.array_equal(
        pixels(PipelineAdapter(pipe, "cpu").generate([job])[0]), pixels(adapter.generate([make_job(seed=2)])[0])
    )


def test_folder_without_tokenizer_vocabulary_is_refused(saved_tiny: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-vocab"
    shutil.copytree(saved_tiny, folder)
    for path in (folder / "tokenizer").iterdir():
        if path.name != "tokenizer_config.json":
            path.unlink()  # transformers would otherwise build a 2-token tokenizer without a word
    with pytest.raises(ProbeError, match="tokens but text_encoder expects"):
        load_txt2img("tiny", str(folder), None, scheduler=SCHEDULER)


def test_broken_cached_snapshot_is_a_probe_error(saved_tiny: Path, empty_hub_cache: Path) -> None:
    snapshot = _fake_snapshot(empty_hub_cache, "someone/broken-sd", saved_tiny)
    shutil.rmtree(snapshot / "unet")
    with pytest.raises(ProbeError, match="probe models pull sd-turbo"):
        load_txt2img("sd-turbo", "someone/broken-sd", None, scheduler=SCHEDULER)


SD_TURBO_FILES = [
    "README.md", "model_index.json", "sd_turbo.safetensors", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin", "tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer/tokenizer_config.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    "safety_checker/model.safetensors", "feature_extractor/preprocessor_config.json",
]  # fmt: skip
SD_TURBO_INDEX = {
    "_class_name": "StableDiffusionPipeline", "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None],
}  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "float16", None])
def test_pull_fetches_configs_and_one_weight_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str | None) -> None:
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from probe.generate.loading import pull
    from probe.spec.presets import get_preset

    index = tmp_path / "model_index.json"
    index.write_text(json.dumps(SD_TURBO_INDEX))
    fetched: dict[str, list[str]] = {}

    def fake_snapshot(repo_id: str, **kwargs: Any) -> str:
        names = filter_repo_objects(
            SD_TURBO_FILES, allow_patterns=kwargs["allow_patterns"], ignore_patterns=kwargs["ignore_patterns"]
        )
        fetched[repo_id] = sorted(names)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(index))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert pull(get_preset("sd-turbo"), dtype) == tmp_path
    files = fetched["stabilityai/sd-turbo"]
    configs = {"model_index.json", "unet/config.json", "tokenizer/merges.txt", "feature_extractor/preprocessor_config.json"}
    assert configs <= set(files)
    assert not any(f.endswith(".bin") or f.startswith(("safety_checker", "sd_turbo", "README")) for f in files)
    fp16 = {f for f in files if ".fp16." in f}
    full = {f for f in files if f.endswith(".safetensors") and ".fp16." not in f}
    assert (len(fp16), len(full)) == {"float32": (0, 3), "float16": (3, 0), None: (3, 3)}[dtype]


def test_scheduler_specs() -> None:
    assert parse_scheduler(SCHEDULER) == ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"})
    assert parse_scheduler("LCMScheduler") == ("LCMScheduler", {})
    assert parse_scheduler("DPMSolverMultistepScheduler(use_karras_sigmas=true)")[1] == {"use_karras_sigmas": True}
    assert parse_scheduler(None) is None and parse_scheduler("repo-default") is None
    pipe = load_txt2img("tiny", TINY_ID, None, scheduler="LCMScheduler")
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"  # config carried over from the repo's
    with pytest.raises(ProbeError, match="did you mean"):
        load_txt2img("tiny", TINY_ID, None, scheduler="EulerDiscreteSchedular")


@pytest.fixture
def lora_folder(tmp_path: Path) -> Iterator[tuple[Path, np.ndarray]]:
    """A random LoRA for the tiny UNet, and the image the unfused adapter gives for seed 0."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = build_tiny_pipeline()
    torch.manual_seed(5)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # peft initialises B to zero: a no-op LoRA would prove nothing
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers)
    yield tmp_path, pixels(PipelineAdapter(pipe, "cpu").generate([make_job(seed=0)])[0])


def test_local_lora_is_loaded_and_fused(adapter: PipelineAdapter, lora_folder: tuple[Path, np.ndarray]) -> None:
    folder, unfused = lora_folder
    job = make_job(seed=0, lora_id=str(folder))
    fused = pixels(PipelineAdapter.for_job(job, "cpu").generate([job])[0])
    base = pixels(adapter.generate([make_job(seed=0)])[0])
    assert np.abs(fused - base).mean() > 5
    assert np.abs(fused - unfused).max() <= 1


def test_probe_package_import_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, probe, probe.planning.job, probe.spec.presets; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"
