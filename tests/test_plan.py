"""Planner: counts, order, overrides and the stability of job keys."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from probe.errors import UsageError
from probe.planning.planner import count_jobs, plan_jobs, plan_sha256
from probe.spec.loader import load_suite
from tests.conftest import REPO, SUITES

GRID = """
name: grid
models:
  - sd-turbo
  - {preset: sd21, steps: [50], guidance: 7.5}
seeds: [0, 7]
probes:
  - name: occ
    template: "a photo of {who} {where}"
    vars:
      who: [a nurse, a doctor, {value: a pilot, attrs: {share: 5.0}}]
      where: [indoors, outdoors]
    attrs: {group: jobs}
    steps: [1, 4]
"""


def test_cartesian_counts_and_overrides(write_suite):
    jobs = plan_jobs(load_suite(write_suite(GRID)))
    counts = count_jobs(jobs)
    assert counts[("occ", "sd-turbo")] == 3 * 2 * 2 * 2  # who x where x steps x seeds
    assert counts[("occ", "sd21")] == 3 * 2 * 1 * 2  # per-model steps override wins over the probe's
    sd21 = [j for j in jobs if j.model == "sd21"]
    assert {j.steps for j in sd21} == {50} and {j.guidance for j in sd21} == {7.5}
    turbo = [j for j in jobs if j.model == "sd-turbo"]
    assert {j.guidance for j in turbo} == {0.0} and {(j.width, j.height) for j in turbo} == {(512, 512)}
    pilot = next(j for j in jobs if j.variables["who"] == "a pilot")
    assert pilot.attrs == {"group": "jobs", "share": 5.0}
    assert pilot.prompt.startswith("a photo of a pilot ")


def test_order_is_probe_model_prompt_steps_seed(write_suite):
    jobs = plan_jobs(load_suite(write_suite(GRID)))
    first = [(j.model, j.prompt, j.steps, j.seed) for j in jobs[:5]]
    assert first == [
        ("sd-turbo", "a photo of a nurse indoors", 1, 0),
        ("sd-turbo", "a photo of a nurse indoors", 1, 7),
        ("sd-turbo", "a photo of a nurse indoors", 4, 0),
        ("sd-turbo", "a photo of a nurse indoors", 4, 7),
        ("sd-turbo", "a photo of a nurse outdoors", 1, 0),
    ]


def test_key_covers_pixels_not_labels(write_suite):
    jobs = plan_jobs(load_suite(write_suite(GRID)))
    base = jobs[0]
    assert base.model_copy(update={"probe": "other", "attrs": {"x": 1}, "model": "alias"}).key == base.key
    for change in ({"seed": 1}, {"steps": 2}, {"prompt": "x"}, {"revision": "abc"}, {"dtype": "float16"},
                   {"device_class": "cuda"}, {"width": 256}, {"guidance": 1.0}, {"scheduler": "LCMScheduler"}):
        assert base.model_copy(update=change).key != base.key, change
    assert len({j.key for j in jobs}) == len(jobs)


def test_keys_are_stable_across_processes(write_suite):
    path = write_suite(GRID)
    here = [j.key for j in plan_jobs(load_suite(path))]
    code = (
        "import json; from probe.spec.loader import load_suite; from probe.planning.planner import plan_jobs;"
        f"print(json.dumps([j.key for j in plan_jobs(load_suite({str(path)!r}))]))"
    )
    there = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True, cwd=REPO, env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout)
    assert here == there


def test_known_key_value():
    """A pinned key: if this changes, every cached image is invalidated, so bump GENERATION_VERSION on purpose."""
    loaded = load_suite(SUITES / "smoke.yaml")
    job = plan_jobs(loaded)[0]
    assert job.pixel_inputs() == {
        "v": "1", "model_id": "probe/tiny", "revision": "tiny-v1", "lora_id": None, "lora_revision": None,
        "scheduler": "EulerDiscreteScheduler(trailing)", "dtype": "float32", "device_class": "cpu",
        "mode": "txt2img", "prompt": "a photo of the face of a nurse", "seed": 0, "steps": 1, "guidance": 0.0,
        "strength": None, "init_image_sha256": None, "width": 64, "height": 64,
    }
    import hashlib

    canonical = json.dumps(job.pixel_inputs(), sort_keys=True, separators=(",", ":"))
    assert job.key == hashlib.sha256(canonical.encode()).hexdigest()


def test_model_override_keeps_grid_and_uses_preset_size(write_suite):
    loaded = load_suite(write_suite(GRID))
    normal = plan_jobs(loaded)
    tiny = plan_jobs(loaded, model_override="tiny")
    assert len(tiny) == len(normal)
    assert [(j.model, j.prompt, j.steps, j.seed, j.guidance) for j in tiny] == [
        (j.model, j.prompt, j.steps, j.seed, j.guidance) for j in normal
    ]
    assert {j.preset for j in tiny} == {"tiny"} and {(j.width, j.height) for j in tiny} == {(64, 64)}
    with pytest.raises(UsageError, match="did you mean 'tiny'"):
        plan_jobs(loaded, model_override="tinny")


def test_limit_keeps_first_prompts_of_each_probe(write_suite):
    jobs = plan_jobs(load_suite(write_suite(GRID)), limit=2)
    assert sorted({j.prompt for j in jobs}) == ["a photo of a nurse indoors", "a photo of a nurse outdoors"]


def test_cuda_device_plans_fp16(write_suite):
    jobs = plan_jobs(load_suite(write_suite(GRID)), device="cuda:1")
    assert {(j.dtype, j.device_class) for j in jobs} == {("float16", "cuda")}


def test_img2img_grid_and_init_hash(write_suite, tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")  # init images are decoded at validation
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.png")
    path = write_suite("""
        name: i2i
        models: [tiny]
        seeds: 1
        probes:
          - {name: s, kind: img2img, prompts: [x], init_images: ["*.png"], steps: [4], strength: [0.25, 1.0]}
    """)
    jobs = plan_jobs(load_suite(path))
    assert [(j.strength, j.init_image) for j in jobs] == [(0.25, "a.png"), (0.25, "b.png"), (1.0, "a.png"),
                                                          (1.0, "b.png")]
    assert {j.mode for j in jobs} == {"img2img"}
    import hashlib

    assert jobs[0].init_image_sha256 == hashlib.sha256((tmp_path / "a.png").read_bytes()).hexdigest()


def test_plan_hash_changes_with_plan(write_suite):
    loaded = load_suite(write_suite(GRID))
    assert plan_sha256(plan_jobs(loaded)) == plan_sha256(plan_jobs(loaded))
    assert plan_sha256(plan_jobs(loaded)) != plan_sha256(plan_jobs(loaded, limit=1))


def test_tiny_preset_revision_tracks_the_tiny_model():
    from probe.embedded.tiny_sd import TINY_REVISION
    from probe.spec.presets import PRESETS

    assert PRESETS["tiny"].revision == TINY_REVISION


def test_local_model_folder_is_fingerprinted(write_suite, tmp_path):
    import os

    folder = tmp_path / "ft"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"v1")
    path = write_suite("""
        name: local
        models: [{preset: sd-turbo, model_id: ./ft}]
        seeds: 1
        probes: [{name: p, prompts: [x], steps: [1]}]
    """)
    first = plan_jobs(load_suite(path))[0]
    assert first.model_id == str(folder) and first.revision.startswith("local-")
    weights.write_bytes(b"v2 retrained")
    os.utime(weights, ns=(1, 1))
    assert plan_jobs(load_suite(path))[0].key != first.key


def test_unpinned_hub_id_is_pinned_to_the_cached_snapshot(write_suite, tmp_path, monkeypatch):
    commit = "a" * 40
    snapshot = tmp_path / "hf" / "hub" / "models--org--model" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (tmp_path / "hf" / "hub" / "models--org--model" / "refs").mkdir()
    (tmp_path / "hf" / "hub" / "models--org--model" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    path = write_suite("""
        name: hub
        models: [{preset: sd-turbo, model_id: org/model}]
        seeds: 1
        probes: [{name: p, prompts: [x], steps: [1]}]
    """)
    assert plan_jobs(load_suite(path))[0].revision == commit
