"""GPU throughput of SD-Turbo's full-size architecture (random weights): a bare diffusers loop against `probe run`.

    bash benchmarks/gpu.sh                 # on a CUDA machine; prints one table in under 8 minutes
    python benchmarks/gpu.py --smoke       # the same code on CPU with the tiny model (checks the script runs)

Rows (512², 1 step, fp16, batches of `--batch`):
- bare loop: `pipe(prompts, num_inference_steps=1, guidance_scale=0)` in a loop, images left on the device;
  eager, with the UNet and VAE in channels_last, and with `torch.compile` of the UNet (compile time excluded);
- probe run: the same architecture saved to a folder and run as a suite model, with clip_score on a CLIP
  ViT-L/14-architecture model (random weights): PNG writes, the ledger and scoring included, loading excluded
  (the pipeline's own load time, measured apart, is subtracted from the run's wall time);
- CLIP ViT-L/14 image embeddings per second (fp16, batches of 64, probe's preprocessing);
- peak GPU memory of each row.
The weights are random, so the images are noise: only the timings mean anything.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def bare_loop(pipe: Any, batch: int, batches: int, size: int) -> float:
    """Images per second of the plain diffusers call, after one warm-up batch."""
    prompts = [f"a photo of a cat number {i}" for i in range(batch)]
    kwargs = {"num_inference_steps": 1, "guidance_scale": 0.0, "height": size, "width": size, "output_type": "pt"}
    pipe(prompts, **kwargs)
    _sync()
    started = time.perf_counter()
    for _ in range(batches):
        pipe(prompts, **kwargs)
    _sync()
    return batch * batches / (time.perf_counter() - started)


def clip_folder(folder: Path, smoke: bool) -> Path:
    """A CLIP ViT-L/14-architecture model (random weights) saved where `--clip-model` can load it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from probe.embedded.tiny_sd import build_tiny_tokenizer

    if smoke:
        from probe.embedded.tiny_clip import build_tiny_clip

        model, processor = build_tiny_clip()
    else:
        tokenizer = build_tiny_tokenizer()  # no hub: a real BPE tokenizer of probe's, ids within CLIP's vocabulary
        config = CLIPConfig(
            text_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                         "num_hidden_layers": 12, "projection_dim": 768, "bos_token_id": tokenizer.bos_token_id,
                         "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
            vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                           "num_hidden_layers": 24, "patch_size": 14, "image_size": 224, "projection_dim": 768},
            projection_dim=768)
        model = CLIPModel(config)
        processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 224},
                                                                     crop_size={"height": 224, "width": 224}),
                                  tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def clip_rate(folder: Path, device: str, images: int) -> float:
    """CLIP image embeddings per second through probe's backend (fp16 on CUDA), features not cached."""
    from PIL import Image

    from probe.score.metrics.clip import ClipBackend
    from probe.score.protocol import ImageItem

    backend = ClipBackend(str(folder), device=device)
    pixels = Image.new("RGB", (512, 512), (120, 90, 60))
    items = [ImageItem(key=f"k{i}", path=Path("."), prompt="", pixels=pixels) for i in range(images)]
    run = backend._encoders
    run.run(run.encode_images, [pixels] * 8)
    _sync()
    started = time.perf_counter()
    for start in range(0, images, 64):
        run.run(run.encode_images, [item.open() for item in items[start:start + 64]])
    _sync()
    return images / (time.perf_counter() - started)


def probe_rate(root: Path, model: Path, clip: Path, images: int, batch: int, size: int, smoke: bool) -> float:
    """Images per second of `probe run` (generation, writes, clip_score), the pipeline's load time subtracted."""
    from diffusers import AutoPipelineForText2Image

    from probe.run.driver import run_suite
    from probe.run.options import RunOptions

    suite = {"name": "gpu-bench", "seeds": max(1, images // 16),
             "models": [{"preset": "tiny" if smoke else "sd-turbo", **({} if smoke else {"model_id": str(model)}),
                         "size": size, "steps": [1]}],
             "probes": [{"name": "cats", "prompts": [f"a photo of a cat number {i}" for i in range(16)],
                         "metrics": ["clip_score"]}]}
    path = root / "gpu-bench.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    started = time.perf_counter()
    if not smoke:  # what the run spends loading, measured apart: the rate is of the work after it
        AutoPipelineForText2Image.from_pretrained(model, torch_dtype=torch.float16).to("cuda")
        _sync()
        torch.cuda.empty_cache()
    load = time.perf_counter() - started
    summary = run_suite(path, RunOptions(reports_root=root / "out", cache_dir=root / "cache", batch_size=batch,
                                         clip_model=str(clip)))
    return summary.counts.generated / max(1e-9, summary.wall_seconds - load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, tiny CLIP: checks the script only")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    size = 64 if args.smoke else 512
    from sd_turbo_arch import build_sd_turbo_architecture  # beside this script

    from probe.embedded.tiny_sd import build_tiny_pipeline

    dtype = torch.float32 if args.smoke else torch.float16
    pipe = (build_tiny_pipeline() if args.smoke else build_sd_turbo_architecture()).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    rows: list[tuple[str, float, float]] = []

    def row(label: str, rate: float) -> None:
        rows.append((label, rate, _peak_gib()))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    row("bare loop, eager", bare_loop(pipe, args.batch, args.batches, size))
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    row("bare loop, channels_last", bare_loop(pipe, args.batch, args.batches, size))
    if not args.smoke:
        pipe.unet = torch.compile(pipe.unet, fullgraph=False)
        row("bare loop, channels_last + torch.compile(unet)", bare_loop(pipe, args.batch, args.batches, size))
    with tempfile.TemporaryDirectory(prefix="probe-gpu-") as tmp:
        root = Path(tmp)
        model = root / "sd-turbo-arch"
        if not args.smoke:
            build_sd_turbo_architecture().save_pretrained(model)
        del pipe
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        clip = clip_folder(root / "clip-l14-arch", args.smoke)
        images = args.batch * args.batches
        row("probe run (PNG writes + clip_score), eager", probe_rate(root, model, clip, images, args.batch, size,
                                                                     args.smoke))
        row("CLIP ViT-L/14 arch image embeddings (fp16)" if not args.smoke else "tiny CLIP image embeddings",
            clip_rate(clip, device, 512 if not args.smoke else 64))
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke)"
    print(f"{name}, torch {torch.__version__}, {size}², 1 step, batch {args.batch}")
    print(f"| {'what':<50} | {'images/s':>9} | {'peak GiB':>8} |")
    print(f"|{'-' * 52}|{'-' * 11}|{'-' * 10}|")
    for label, rate, peak in rows:
        print(f"| {label:<50} | {rate:9.1f} | {peak:8.2f} |")
    bare = rows[0][1]
    probe = next(rate for label, rate, _ in rows if label.startswith("probe run"))
    print(f"probe run / bare eager loop: {probe / bare:.2f}")


if __name__ == "__main__":
    main()
