"""Image grids: prompt rows x (model, steps[, strength]) columns at one seed, as small thumbnails that link
to the full images. img2img rows start with their init image, copied into assets/ so the folder stays
portable. Large runs are capped and paged (collapsed <details>, lazy images) so the page stays fast.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from probe.report.data import RunData
from probe.report.fmt import fmt_coord, missing
from probe.store.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

THUMB_PX = 160
THUMB_CSS_PX = 96
GRID_SEEDS = 4
GRID_PROMPTS = 120
PAGE_ROWS = 30


class Thumbnails:
    """Collects the thumbnails a report needs and writes the missing ones (in threads: PIL releases the GIL).

    Images a safety detector flagged (`flagged`: key -> detectors) get a blurred thumbnail instead, unless
    `blur` is off (the suite's `report: {blur_flagged: false}`); an unblurred thumbnail of theirs left by an
    earlier render is deleted, so the assets never hold one.
    """

    def __init__(self, run_dir: Path, folder: str = "assets/thumbs", flagged: dict[str, list[str]] | None = None,
                 blur: bool = True) -> None:
        self.run_dir = run_dir
        self.folder = folder
        self.todo: dict[str, tuple[Path, bool]] = {}
        self.flagged = flagged or {}
        self.blur = blur

    def blurred(self, key: str) -> bool:
        return self.blur and key in self.flagged

    def add(self, source: Path, name: str, blur: bool = False) -> str:
        """Register `source` for a thumbnail `name`.jpg (blurred: `name`-blurred.jpg); its path in the run."""
        if blur:
            (self.run_dir / f"{self.folder}/{name}.jpg").unlink(missing_ok=True)
            name = f"{name}-blurred"
        relative = f"{self.folder}/{name}.jpg"
        if not (self.run_dir / relative).is_file():
            self.todo[relative] = (source, blur)
        return relative

    def write(self) -> int:
        (self.run_dir / self.folder).mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(lambda item: _thumbnail(item[1][0], self.run_dir / item[0], item[1][1]), self.todo.items()))
        return len(self.todo)


def _thumbnail(source: Path, target: Path, blur: bool = False) -> None:
    from PIL import Image, ImageFilter

    with Image.open(source) as opened:
        image = opened.convert("RGB")
    image.thumbnail((THUMB_PX, THUMB_PX))
    if blur:  # pixelate to 8 px across, then blur: no detail survives, only the rough colours
        size = image.size
        image = image.resize((8, max(1, round(8 * size[1] / size[0]))), Image.Resampling.BILINEAR)
        image = image.resize(size, Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(size[0] / 10))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    atomic_write_bytes(target, buffer.getvalue(), durable=False)  # a thumbnail is remade from its image


def image_cell(row: Any, run_dir: Path, thumbs: Thumbnails) -> dict[str, Any]:
    """A grid cell for one jobs row: its thumbnail and full image, or why it has none (failed, missing)."""
    steps = fmt_coord(row.steps)
    seed = f", seed {int(row.seed)}" if not missing(row.seed) and int(row.seed) >= 0 else ", no seed given"
    title = f"{row.model}, {steps} step{'' if steps == '1' else 's'}" + (
        f", strength {fmt_coord(row.strength)}" if not missing(row.strength) else "") + seed
    image = None if missing(row.image) else str(row.image)
    if image is None or not (run_dir / image).is_file():
        return {"missing": row.status if row.status == "failed" else "missing", "title": title,
                "error": "" if missing(row.error) else str(row.error)}
    blurred = thumbs.blurred(str(row.key))
    flags = ", ".join(thumbs.flagged.get(str(row.key), []))
    return {"thumb": thumbs.add(run_dir / image, str(row.key), blur=blurred), "full": image, "alt": row.prompt,
            "title": title + (f"; flagged by {flags}" if flags else ""), "flagged": flags, "blurred": blurred,
            "w": THUMB_CSS_PX, "h": _height(getattr(row, "width", 1), getattr(row, "height", 1))}


def _height(width: Any, height: Any) -> int:
    """Thumbnail height in CSS pixels for an image of width x height (reserves layout before it loads)."""
    if missing(width) or missing(height) or not width:
        return THUMB_CSS_PX
    return round(THUMB_CSS_PX * float(height) / float(width))


def init_images(data: RunData, thumbs: Thumbnails) -> dict[str, dict[str, Any]]:
    """Copy each img2img init image into assets/init/ (kept from an earlier render when the suite is gone)."""
    from PIL import Image

    suite_dir = Path(str(data.manifest.get("suite_path") or ".")).parent
    found: dict[str, dict[str, Any]] = {}
    for name in data.jobs["init_image"].dropna().unique():
        label = re.sub(r"[^A-Za-z0-9._-]", "_", PurePosixPath(str(name)).name)  # safe in a URL
        relative = f"assets/init/{hashlib.sha256(str(name).encode()).hexdigest()[:8]}-{label}"
        target = data.path / relative
        source = suite_dir / str(name)
        if source.is_file() and not (target.is_file() and target.read_bytes() == source.read_bytes()):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            (data.path / thumbs.folder / f"init-{target.stem}.jpg").unlink(missing_ok=True)  # stale thumbnail
        if target.is_file():
            with Image.open(target) as image:
                size = image.size
            found[str(name)] = {"thumb": thumbs.add(target, f"init-{target.stem}"), "full": relative,
                                "alt": f"init image {label}", "title": f"init image {name}",
                                "w": THUMB_CSS_PX, "h": _height(*size)}
        else:
            log.warning("init image %s not found next to the suite (%s): the grid shows it as missing", name, suite_dir)
    return found


def _columns(rows: pd.DataFrame, models: list[str]) -> list[tuple[Any, ...]]:
    order = {m: i for i, m in enumerate(models)}
    coords = {(r.model, None if missing(r.steps) else float(r.steps), None if missing(r.strength) else float(r.strength))
              for r in rows.itertuples()}
    return sorted(coords, key=lambda c: (order.get(c[0], 99), str(c[0]), c[1] or 0, c[2] or 0))


def _display_seeds(rows: pd.DataFrame) -> pd.DataFrame:
    """Images without a seed (scored with `probe score` from a table with none) each get a grid of their own:
    -1, -2, ... in listing order within their cell, so no image hides another."""
    missing_seed = rows["seed"].isna()
    if not missing_seed.any():
        return rows
    rows = rows.copy()
    cell = ["model", "prompt", "steps", "strength", "init_image"]
    order = rows[missing_seed].groupby(cell, dropna=False, sort=False).cumcount()
    rows["seed"] = pd.to_numeric(rows["seed"], errors="coerce").astype(float)
    rows.loc[missing_seed, "seed"] = -1.0 - order
    return rows


def probe_grid(data: RunData, probe: str, thumbs: Thumbnails, inits: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One probe's grids: one per seed (first few seeds), rows paged, columns (model, steps[, strength])."""
    rows = _display_seeds(data.jobs[data.jobs["probe"] == probe])
    img2img = bool((rows["mode"] == "img2img").any())
    columns = _columns(rows, data.models)
    row_keys = list(dict.fromkeys(zip(rows["prompt"], rows["init_image"].fillna(""), strict=True)))
    seeds = sorted(rows["seed"].unique(), key=lambda s: (s < 0, abs(s)))
    notes = []
    if len(row_keys) > GRID_PROMPTS:
        notes.append(f"showing the first {GRID_PROMPTS} of {len(row_keys)} prompts")
    if len(seeds) > GRID_SEEDS:
        notes.append(f"seeds {', '.join(str(int(s)) for s in seeds[:GRID_SEEDS])} of {len(seeds)}")
    by_cell = {(r.prompt, "" if missing(r.init_image) else r.init_image, r.seed, r.model,
                None if missing(r.steps) else float(r.steps), None if missing(r.strength) else float(r.strength)): r
               for r in rows.itertuples()}
    grids = []
    for index, seed in enumerate(seeds[:GRID_SEEDS]):
        table = []
        for prompt, init in row_keys[:GRID_PROMPTS]:
            cells = [by_cell.get((prompt, init, seed, *c)) for c in columns]
            lost = {"missing": "missing", "title": f"init image {init} (not found)"}
            table.append({"prompt": prompt, "init": inits.get(init, lost) if init else None,
                          "cells": [None if r is None else image_cell(r, data.path, thumbs) for r in cells]})
        pages = [{"first": start + 1, "last": min(start + PAGE_ROWS, len(table)), "rows": table[start:start + PAGE_ROWS]}
                 for start in range(0, len(table), PAGE_ROWS)]
        label = f"seed {int(seed)}" if seed >= 0 else f"image {-int(seed)} (no seed given)"
        grids.append({"seed": int(seed), "label": label, "open": index == 0, "pages": pages})
    return {"probe": probe, "kind": data.probe_kind(probe), "img2img": img2img, "notes": notes, "grids": grids,
            "columns": [{"model": m, "steps": fmt_coord(s), "strength": fmt_coord(st)} for m, s, st in columns]}
