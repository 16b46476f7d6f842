"""Images a suite names: img2img init images (globs, decoded at validation) and reference folders.

A file that matches a glob is not yet an image: a text file called x.png, or a link to /etc/passwd, used to
pass validation and crash the run after its models had loaded. Each init image is now opened and decoded
here, once, so `probe suites validate` fails where the run would have.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from probe.errors import UsageError
from probe.spec.limits import MAX_GLOB_ENTRIES, MAX_INIT_IMAGE_PIXELS, EntryBudget, bounded_glob, shown
from probe.spec.yaml_source import FieldPath
from probe.store.hashing import file_sha256

Issue = tuple[FieldPath, str]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class InitImage:
    """An img2img init image: the path as matched (relative to the suite) and its content hash."""

    path: str
    absolute: Path
    sha256: str


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted (empty when it is not a folder)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def has_image_files(folder: Path, limit: int = MAX_GLOB_ENTRIES) -> bool:
    """Whether `folder` directly holds an image file, looking at no more than `limit` entries (a reference
    folder of real images may be huge; validation only needs to know it is not empty)."""
    try:
        with os.scandir(folder) as entries:
            for seen, entry in enumerate(entries):
                if seen >= limit:
                    return False
                if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
                    return True
    except OSError:
        return False
    return False


def match_init_images(patterns: list[str], base: Path, where: FieldPath, issues: list[Issue],
                      budget: EntryBudget) -> list[list[Path]]:
    """The files each init-image glob (relative to the suite's folder) matches; one that matches nothing,
    or walks too far, is an issue."""
    found: list[list[Path]] = []
    for index, pattern in enumerate(patterns):
        try:
            matches = bounded_glob(str(base / pattern), budget)
        except UsageError as exc:
            issues.append(((*where, "init_images", index), str(exc)))
            matches = []
        else:
            if not matches:
                issues.append(((*where, "init_images", index), f"{pattern!r} matches no file (relative to {base})"))
        found.append(matches)
    return found


def read_init_images(matches: list[list[Path]], base: Path, where: FieldPath, issues: list[Issue]) -> list[InitImage]:
    """Hash and decode every matched file; one that is not a decodable image is an issue naming it."""
    found: list[InitImage] = []
    for index, paths in enumerate(matches):
        for absolute in paths:
            shown_path = Path(os.path.relpath(absolute, base)).as_posix() if absolute.is_relative_to(base) else str(absolute)
            problem = image_problem(absolute)
            if problem is not None:
                issues.append(((*where, "init_images", index), f"{shown_path}: {problem}"))
                continue
            found.append(InitImage(path=shown_path, absolute=absolute, sha256=file_sha256(absolute)))
    return found


def image_problem(path: Path) -> str | None:
    """Why `path` cannot be used as an image (None when it decodes): not an image, truncated, or too big.

    The pixel count is checked from the header before decoding, so a tiny file declaring a huge image
    (a decompression bomb) is refused without allocating it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_INIT_IMAGE_PIXELS:
                    return f"{width}x{height} is more than {shown(MAX_INIT_IMAGE_PIXELS)} pixels"
                image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data; all mean "not usable"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "cannot identify image file" in reason:
            reason = "not an image file PIL can read"
        return f"cannot be decoded as an image ({reason})"
    return None
