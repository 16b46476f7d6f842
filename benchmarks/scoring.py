"""Scoring throughput: each per-image metric alone, then all of them in one pass sharing decodes and features.

    python benchmarks/scoring.py                 # 64 images at 512², CPU workers one per core
    python benchmarks/scoring.py --images 32 --score-workers 0

The images are drawn here (a gradient, a face-like oval, a line of words; PNG at probe's level), so the figures
do not depend on a model. Every timing is one `score_run` on a fresh feature cache, score table and scoring
context, so nothing is reused between them:

- alone: one metric per pass (clip_score, faces, skin_tone, perceived_gender, ocr); each decodes every PNG and
  detects faces or embeds crops again, as separate runs of separate tools would;
- separate passes: the sum of the alone times;
- together: all five in one pass (each PNG decoded once, faces detected once for faces, skin tone and perceived
  gender, CPU metrics in worker processes beside CLIP).

Printed: images/s of each, then separate / together (target >= 1.5). CLIP is the embedded tiny model (no
weights here), so on a GPU machine with CLIP ViT-L/14 the CLIP share is larger.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from probe.score.protocol import ScoringContext
from probe.score.scorer import cpu_pool_for, prepare_metrics, score_run
from probe.spec.schema import MetricSpec
from probe.store.features import FeatureCache
from probe.store.images import encode_png
from probe.store.tables import ScoresTable

METRICS = ["clip_score", "faces", "skin_tone", "perceived_gender", "ocr"]
WORDS = ["OPEN", "SALE", "CAFE", "EXIT", "BAKERY", "HOTEL", "BOOKS", "TAXI"]


def draw(i: int, size: int) -> Image.Image:
    """A photo-like test image: smooth background, a skin-coloured oval with eyes, a word in black."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x * 180 + 40, y * 160 + 50, (1 - x) * 120 + 60], axis=-1) + rng.normal(0, 6, (size, size, 3))
    image = Image.fromarray(np.clip(base, 0, 255).astype("uint8"))
    pen = ImageDraw.Draw(image)
    c, r = size // 2, size // 5
    pen.ellipse([c - r, c - int(r * 1.3), c + r, c + int(r * 1.3)], fill=(224, 172, 140))
    for dx in (-r // 2, r // 2):
        pen.ellipse([c + dx - r // 8, c - r // 3 - r // 10, c + dx + r // 8, c - r // 3 + r // 10], fill=(40, 30, 30))
    pen.text((size // 10, size - size // 6), WORDS[i % len(WORDS)], fill=(0, 0, 0), font_size=size // 10)
    return image


def write_images(folder: Path, n: int, size: int) -> pd.DataFrame:
    rows = []
    for i in range(n):
        key = f"{i:064x}"
        path = folder / "images" / key[:2] / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(key, draw(i, size)))
        word = WORDS[i % len(WORDS)]
        rows.append({"key": key, "probe": "bench", "model": "drawn", "steps": 1, "strength": None,
                     "prompt": f'a portrait under a sign that says "{word}"', "text": word,
                     "image": str(path.relative_to(folder))})
    return pd.DataFrame(rows)


def one_pass(folder: Path, jobs: pd.DataFrame, names: list[str], workers: int | None, tag: str) -> float:
    """Seconds of one scoring pass of `names` on fresh caches (a new context, features, score table)."""
    run = folder / f"run-{tag}"
    run.mkdir()
    (run / "images").symlink_to(folder / "images")
    ctx = ScoringContext(features=FeatureCache(folder / f"cache-{tag}"), clip_model="tiny", run_dir=run,
                         all_tiny=True)
    prepared = prepare_metrics({"bench": [MetricSpec(name=n) for n in names]}, ctx)  # models load outside the timing
    pool = cpu_pool_for(prepared, ctx, workers, len(jobs))
    try:
        started = time.perf_counter()
        counts = score_run(run, jobs, prepared, ctx, sink=ScoresTable(run), pool=pool)
        seconds = time.perf_counter() - started
    finally:
        pool.close()
    if counts.failures or any(counts.computed[n] != len(jobs) for n in names):
        raise SystemExit(f"{names}: not every image scored ({counts.computed}, {counts.failures[:1]})")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--score-workers", type=int, default=None, help="default: one per core")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="probe-scoring-") as tmp:
        folder = Path(tmp)
        jobs = write_images(folder, args.images, args.size)
        one_pass(folder, jobs.head(4), METRICS, 0, "warm")  # imports and first loads, outside every timing
        alone = {name: one_pass(folder, jobs, [name], args.score_workers, name) for name in METRICS}
        together = one_pass(folder, jobs, METRICS, args.score_workers, "together")
    n = args.images
    print(f"{n} images at {args.size}², tiny CLIP, CPU workers: "
          f"{args.score_workers if args.score_workers is not None else 'one per core'}")
    for name, seconds in alone.items():
        print(f"  {name:<18} alone    {seconds:7.1f} s  {n / seconds:7.2f} img/s")
    separate = sum(alone.values())
    print(f"  {'separate passes':<27}{separate:7.1f} s  {n / separate:7.2f} img/s")
    print(f"  {'all together':<27}{together:7.1f} s  {n / together:7.2f} img/s")
    print(f"separate / together  {separate / together:5.2f}  (target >= 1.5)")


if __name__ == "__main__":
    main()
