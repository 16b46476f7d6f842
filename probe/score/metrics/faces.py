"""faces: face count and boxes per image, with OpenCV's Haar cascades (Viola & Jones 2001, Lienhart & Maydt 2002).

The cascades ship inside `opencv-python-headless` 4.x (`cv2.data.haarcascades`; 5.x drops them), so detection
needs no download and no learned weights outside the installed wheel. They are an old, weak detector: they
find upright frontal and profile faces of a reasonable size and miss tilted, occluded, small or stylised ones.
That is acceptable for "a photo of the face of ..." prompts, where the face is large and frontal, and every
miss shows up as `no_face` (counted, never dropped), not as a wrong label.

Defaults, measured on the photos scikit-image ships (see tests/test_faces_skin.py):
- frontal `haarcascade_frontalface_alt2.xml` only: `..._default.xml` adds false faces on `data.coins()`,
  `data.moon()` and `data.cell()` and finds fewer of the upscaled `data.lfw_subset()` faces;
- profile `haarcascade_profileface.xml` on the image and on its mirror (the cascade knows one side only);
- greyscale (BT.601 luma from RGB) + histogram equalisation, as OpenCV's face-detection samples do;
- non-maximum suppression across all cascades with `cv2.dnn.NMSBoxes`, ranked by each box's neighbour count
  (how many raw windows OpenCV merged into it: a crude confidence, comparable within one cascade).

`faces_for` memoises detections per scoring context so `faces`, `perceived_gender` and `skin_tone` share one
detection per image and settings.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from probe.errors import UsageError, suggest
from probe.score.protocol import ImageItem, Metric, Score, ScoringContext
from probe.spec.metric_catalog import METRICS

if TYPE_CHECKING:
    import cv2

logger = logging.getLogger(__name__)

__all__ = ["FaceBox", "FaceSettings", "Faces", "crop", "detect_faces", "faces_for", "largest_face"]


@dataclass(frozen=True)
class FaceSettings:
    """Everything that decides which faces are found; `id` names it in caches and configs."""

    frontal: tuple[str, ...] = ("haarcascade_frontalface_alt2.xml",)
    """Frontal cascade files in `cv2.data.haarcascades`, all run."""
    profile: tuple[str, ...] = ("haarcascade_profileface.xml",)
    """Profile cascade files, each run on the image and on its horizontal mirror."""
    scale_factor: float = 1.1
    """Image pyramid step of `detectMultiScale` (> 1; smaller finds more and runs slower)."""
    min_neighbors: int = 5
    """Raw windows a box needs to survive OpenCV's grouping; higher means fewer false faces."""
    min_size: float = 0.08
    """Smallest face side as a fraction of the image's short side (the cascade's own window is the floor)."""
    nms_iou: float = 0.3
    """Boxes overlapping a better-ranked box by more than this IoU are dropped."""
    max_side: int = 1024
    """Images whose long side exceeds this are downscaled for detection (boxes are mapped back)."""

    def __post_init__(self) -> None:
        for name in ("frontal", "profile"):  # YAML gives lists; keep the dataclass hashable
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if not self.scale_factor > 1.0:
            raise UsageError(f"faces: scale_factor must be > 1, got {self.scale_factor}")
        if not 0.0 < self.min_size < 1.0 or not 0.0 <= self.nms_iou <= 1.0:
            raise UsageError(f"faces: need 0 < min_size < 1 and 0 <= nms_iou <= 1, got {self.min_size}, {self.nms_iou}")
        if self.min_neighbors < 0 or self.max_side < 64 or not self.frontal + self.profile:
            raise UsageError("faces: need min_neighbors >= 0, max_side >= 64 and at least one cascade")

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> FaceSettings:
        """Settings from suite args; unknown names are a UsageError with a suggestion."""
        known = {f.name for f in fields(cls)}
        for name in args:
            if name not in known:
                raise UsageError(f"faces: unknown setting {name!r}{suggest(name, known)}")
        return cls(**args)

    @property
    def id(self) -> str:
        """A short stable hash of the settings (cache keys)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class FaceBox:
    """One detected face in pixel coordinates of the original image."""

    x: int
    y: int
    w: int
    h: int
    detector: str
    """Cascade that found it, e.g. "frontalface_alt2" or "profileface_mirrored"."""
    score: float
    """OpenCV's neighbour count for the box: how many raw windows agreed (higher is surer)."""

    @property
    def area(self) -> int:
        return self.w * self.h

    def xywh(self) -> list[int]:
        return [self.x, self.y, self.w, self.h]


def _cascade_folder() -> str:
    import cv2.data  # the wheel's data module; its stubs do not declare it

    return str(cv2.data.haarcascades)


@functools.cache
def _cascade(filename: str) -> cv2.CascadeClassifier:
    """A loaded cascade from the wheel's data folder (loaded once per process)."""
    import cv2

    folder = _cascade_folder()
    classifier = cv2.CascadeClassifier(folder + filename)
    if classifier.empty():
        raise UsageError(f"faces: cannot load cascade {filename!r} from {folder} (opencv-python < 5 ships them)")
    return classifier


def _prepare_grey(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Equalised 8-bit greyscale, downscaled to `max_side`, and the factor that maps boxes back."""
    import cv2

    image = np.ascontiguousarray(rgb)
    if image.dtype != np.uint8:
        raise ValueError(f"detect_faces needs uint8 pixels, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] in (3, 4):
        grey = cv2.cvtColor(image[..., :3].copy(), cv2.COLOR_RGB2GRAY)  # RGB order: PIL/skimage arrays
    elif image.ndim == 2:
        grey = image
    else:
        raise ValueError(f"detect_faces needs an (h, w) or (h, w, 3) array, got shape {image.shape}")
    scale = min(1.0, max_side / max(grey.shape))
    if scale < 1.0:
        size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    return cv2.equalizeHist(grey), scale


def _run_cascade(grey: np.ndarray, filename: str, mirrored: bool, settings: FaceSettings) -> list[FaceBox]:
    """Raw grouped detections of one cascade, in `grey`'s (unmirrored) coordinates."""
    image = np.ascontiguousarray(grey[:, ::-1]) if mirrored else grey
    side = max(1, round(settings.min_size * min(grey.shape)))
    rects, neighbours = _cascade(filename).detectMultiScale2(
        image, scaleFactor=settings.scale_factor, minNeighbors=settings.min_neighbors, minSize=(side, side))
    name = filename.removeprefix("haarcascade_").removesuffix(".xml") + ("_mirrored" if mirrored else "")
    width = grey.shape[1]
    boxes = []
    for (x, y, w, h), n in zip(np.reshape(rects, (-1, 4)).tolist(), np.ravel(neighbours).tolist(), strict=True):
        boxes.append(FaceBox(width - x - w if mirrored else x, y, w, h, name, float(n)))
    return boxes


def detect_faces(rgb: np.ndarray, settings: FaceSettings | None = None) -> list[FaceBox]:
    """Faces in an RGB (or greyscale) uint8 image, best first, after NMS across all cascades.

    Args:
        rgb: (h, w, 3) RGB or (h, w) grey, uint8. Channel order only changes the grey weights slightly.
        settings: cascades and thresholds; `FaceSettings()` when None.

    Returns:
        Boxes in the input's pixel coordinates, sorted by neighbour count (then area), highest first.
    """
    import cv2

    settings = settings or FaceSettings()
    grey, scale = _prepare_grey(rgb, settings.max_side)
    found = [box for name in settings.frontal for box in _run_cascade(grey, name, False, settings)]
    found += [box for name in settings.profile for m in (False, True) for box in _run_cascade(grey, name, m, settings)]
    if not found:
        return []
    keep = cv2.dnn.NMSBoxes([b.xywh() for b in found], [b.score for b in found], 0.0, settings.nms_iou)
    kept = [found[i] for i in np.ravel(keep).tolist()]
    if scale < 1.0:
        kept = [FaceBox(round(b.x / scale), round(b.y / scale), round(b.w / scale), round(b.h / scale),
                        b.detector, b.score) for b in kept]
    return sorted(kept, key=lambda b: (-b.score, -b.area, b.y, b.x))


def largest_face(boxes: Sequence[FaceBox]) -> FaceBox | None:
    """The face with the largest area (ties: the better score), or None."""
    return max(boxes, key=lambda b: (b.area, b.score), default=None)


def crop(rgb: np.ndarray, box: FaceBox, margin: float = 0.2) -> np.ndarray:
    """The box grown by `margin` of its size on every side, clipped to the image (a view, not a copy)."""
    dx, dy = round(box.w * margin), round(box.h * margin)
    top, left = max(0, box.y - dy), max(0, box.x - dx)
    bottom, right = min(rgb.shape[0], box.y + box.h + dy), min(rgb.shape[1], box.x + box.w + dx)
    return rgb[top:bottom, left:right]


def load_rgb(item: ImageItem) -> np.ndarray:
    """The item's pixels as an (h, w, 3) uint8 RGB array (PIL decodes to RGB, never BGR)."""
    return np.asarray(item.open(), dtype=np.uint8)


def faces_for(item: ImageItem, ctx: ScoringContext, settings: FaceSettings | None = None,
              rgb: np.ndarray | None = None) -> list[FaceBox]:
    """Faces of `item`, detected once per scoring context and settings, then shared by every metric.

    Args:
        item: the image (its key is the cache key).
        ctx: the scoring context whose shared store holds the detections.
        settings: detector settings; `FaceSettings()` when None.
        rgb: the decoded pixels when the caller already has them (saves a decode).
    """
    settings = settings or FaceSettings()
    cache: dict[str, list[FaceBox]] = ctx.shared(_FACES + settings.id, dict)
    if item.key not in cache:
        cache[item.key] = detect_faces(load_rgb(item) if rgb is None else rgb, settings)
    return cache[item.key]


#: The prefix of the scoring context's shared face caches, one per settings id.
_FACES = "faces:"


def take_faces(ctx: ScoringContext, keys: Collection[str]) -> dict[str, dict[str, list[FaceBox]]]:
    """The detections of `keys` (per settings id), removed from `ctx`: a CPU worker sends them to the parent
    pass, so perceived_gender there reuses them instead of detecting the faces again."""
    taken: dict[str, dict[str, list[FaceBox]]] = {}
    for name in ctx.shared_names(_FACES):
        cache: dict[str, list[FaceBox]] = ctx.shared(name, dict)
        taken[name] = {key: cache.pop(key) for key in keys if key in cache}
    return taken


def copy_faces(ctx: ScoringContext, keys: Collection[str]) -> dict[str, dict[str, list[FaceBox]]]:
    """The detections of `keys` already in `ctx` (per settings id), left there: sent with a chunk to a device
    actor, so perceived_gender there reuses the faces this pass's CPU metrics found."""
    found: dict[str, dict[str, list[FaceBox]]] = {}
    for name in ctx.shared_names(_FACES):
        cache: dict[str, list[FaceBox]] = ctx.shared(name, dict)
        boxes = {key: cache[key] for key in keys if key in cache}
        if boxes:
            found[name] = boxes
    return found


def add_faces(ctx: ScoringContext, taken: dict[str, dict[str, list[FaceBox]]]) -> None:
    """Detections made elsewhere (`take_faces` in a worker) added to `ctx`'s shared caches."""
    for name, boxes in taken.items():
        if name.startswith(_FACES):
            ctx.shared(name, dict).update(boxes)


def describe(settings: FaceSettings) -> dict[str, Any]:
    """What a manifest records about the detector (also used by metrics that reuse its faces)."""
    import cv2

    return {
        "detector": "opencv haar cascades",
        "opencv": cv2.__version__,
        "cascades": list(settings.frontal + settings.profile),
        "profile_mirrored": True,
        "preprocessing": "RGB->grey (BT.601), equalizeHist",
        "nms": "cv2.dnn.NMSBoxes by neighbour count",
        "settings": asdict(settings),
        "settings_id": settings.id,
    }


class Faces(Metric):
    """faces: number of faces per image, with their boxes (label "face" or "no_face").

    Args are `FaceSettings` fields (scale_factor, min_neighbors, min_size, nms_iou, frontal, profile,
    max_side). Other metrics share these detections only when they use the same settings.
    """

    info = METRICS["faces"]

    def __init__(self, **settings: Any) -> None:
        self.settings = FaceSettings.from_args(settings)

    def config(self, ctx: ScoringContext) -> dict[str, Any]:
        return describe(self.settings)

    def score(self, items: Sequence[ImageItem], ctx: ScoringContext) -> list[Score]:
        scores = []
        for item in items:
            boxes = faces_for(item, ctx, self.settings)
            largest = largest_face(boxes)
            scores.append(Score(
                metric=self.name, value=float(len(boxes)), key=item.key, label="face" if boxes else "no_face",
                extra={"boxes": [b.xywh() for b in boxes], "largest": largest.xywh() if largest else None,
                       "detectors": [b.detector for b in boxes], "scores": [b.score for b in boxes]}))
        return scores
