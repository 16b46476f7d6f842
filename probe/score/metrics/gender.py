"""perceived_gender: the perceived gender presentation of the depicted person, by CLIP zero-shot on the face crop.

What it measures is how a CLIP model reads the *presentation* of the largest face in a generated image: whether
it is nearer to prompts describing a woman or a man. That is the quantity text-to-image bias audits compare
across prompts and models (Cho et al. 2023, "DALL-Eval"; Bianchi et al. 2023; Luccioni et al. 2023, "Stable
Bias"). It is never a statement about anyone's gender identity, which no image shows, and it inherits CLIP's
own biases; read it as an instrument reading, with its `unclear` band and its coverage.

Method (prompt ensembling as in Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision", sec. 3.1.4): each class is the mean of its L2-normalised prompt embeddings,
renormalised; p = softmax(logit_scale * cos(image, class)) over the two classes; the label is `feminine` or
`masculine` when |p_feminine - p_masculine| >= margin, else `unclear`. An image without a detected face is
`no_person` with no value (default), or is read whole (`no_face_policy="whole_image"`): the issue asked for
both, so the choice is an argument and is recorded in the config.

Crops are embedded through the shared FeatureCache: a crop is an `ImageItem` whose key names the source
image, the face box and the margin, and whose `open()` returns the crop, so `ClipBackend.image_embeddings`
caches it like any image and a re-score computes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from probe.errors import UsageError
from probe.score.metrics.clip import ClipBackend, get_clip
from probe.score.metrics.faces import FaceBox, FaceSettings, crop, describe, faces_for, largest_face
from probe.score.protocol import ImageItem, Metric, Score, ScoringContext
from probe.spec.metric_catalog import METRICS

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_PROMPTS", "LABELS", "FaceCrop", "PerceivedGender", "class_embeddings", "presentation_label",
           "zero_shot_probabilities"]

#: Prompt ensembles per presentation class. Parallel wording, so the classes differ only in the gendered
#: word; "girl"/"boy" are included because generated faces are sometimes young, and a class without them
#: would pull those faces towards "unclear".
DEFAULT_PROMPTS: dict[str, tuple[str, ...]] = {
    "feminine": ("a photo of a woman", "a photo of a female person", "a photo of a girl",
                 "a photo of the face of a woman", "a close-up photo of a woman's face"),
    "masculine": ("a photo of a man", "a photo of a male person", "a photo of a boy",
                  "a photo of the face of a man", "a close-up photo of a man's face"),
}
CLASSES: tuple[str, str] = ("feminine", "masculine")
LABELS: tuple[str, ...] = ("feminine", "masculine", "unclear", "no_person")
NoFacePolicy = Literal["no_person", "whole_image"]


@dataclass(frozen=True)
class FaceCrop(ImageItem):
    """A face crop that behaves as an image to score: cached under its own key, decoded only on a cache miss."""

    box: FaceBox | None = None
    margin: float = 0.0

    @staticmethod
    def key_for(source_key: str, box: FaceBox, margin: float) -> str:
        """Cache key of a crop: the source image, the box and the margin (file-name safe: no ':' or ',')."""
        return f"{source_key}.face.{box.x}_{box.y}_{box.w}_{box.h}.m{margin:g}"

    def open(self) -> Image.Image:
        """The crop (box grown by `margin`, clipped to the image) as an RGB PIL image."""
        from PIL import Image

        if self.box is None:
            raise ValueError(f"FaceCrop {self.key} has no box")
        pixels = crop(np.asarray(super().open(), dtype=np.uint8), self.box, self.margin)
        return Image.fromarray(np.ascontiguousarray(pixels))


def class_embeddings(prompt_embeddings: Sequence[np.ndarray]) -> np.ndarray:
    """One unit vector per class (k, d): the renormalised mean of its normalised prompt embeddings."""
    rows = []
    for vectors in prompt_embeddings:
        vectors = np.asarray(vectors, dtype=np.float64)
        mean = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).mean(axis=0)
        rows.append(mean / np.linalg.norm(mean))
    return np.stack(rows)


def zero_shot_probabilities(image_embeddings: np.ndarray, classes: np.ndarray, logit_scale: float) -> np.ndarray:
    """softmax(logit_scale * cos(image, class)) over classes: (n, k) rows summing to 1."""
    images = np.asarray(image_embeddings, dtype=np.float64)
    images = images / np.linalg.norm(images, axis=1, keepdims=True)
    logits = logit_scale * images @ np.asarray(classes, dtype=np.float64).T
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def presentation_label(p_feminine: float, margin: float) -> str:
    """`feminine` / `masculine` when the two class probabilities differ by at least `margin`, else `unclear`."""
    difference = p_feminine - (1.0 - p_feminine)
    if difference >= margin:
        return "feminine"
    if -difference >= margin:
        return "masculine"
    return "unclear"


def _check_prompts(prompts: Mapping[str, Sequence[str]] | None) -> dict[str, tuple[str, ...]]:
    if prompts is None:
        return dict(DEFAULT_PROMPTS)
    if set(prompts) != set(CLASSES) or not all(prompts[c] for c in CLASSES):
        raise UsageError(f"perceived_gender: prompts needs non-empty lists for exactly {list(CLASSES)}, got {dict(prompts)}")
    return {c: tuple(str(p) for p in prompts[c]) for c in CLASSES}


class PerceivedGender(Metric):
    """perceived_gender: perceived gender presentation of the largest face (CLIP zero-shot), with an unclear band.

    Value: p_feminine in [0, 1] (None for `no_person`). Labels: `feminine`, `masculine`, `unclear`,
    `no_person`. Not gender identity (see the module docstring).

    Args:
        margin: minimum |p_feminine - p_masculine| for a feminine/masculine label; in [0, 1].
        logit_scale: CLIP's logit scale (100 for OpenAI CLIP, whose learned scale is clamped there).
        no_face_policy: "no_person" (no face -> label no_person, no value) or "whole_image".
        crop_margin: the face box grows by this fraction of its size on every side (hair and jaw line).
        prompts: {"feminine": [...], "masculine": [...]} replacing DEFAULT_PROMPTS.
        faces: FaceSettings args; the default shares its detections with the `faces` metric's default.
        batch_size: CLIP batch size.
    """

    info = METRICS["perceived_gender"]

    def __init__(self, margin: float = 0.2, logit_scale: float = 100.0, no_face_policy: NoFacePolicy = "no_person",
                 crop_margin: float = 0.2, prompts: Mapping[str, Sequence[str]] | None = None,
                 faces: dict[str, Any] | None = None, batch_size: int = 16) -> None:
        if not 0.0 <= margin <= 1.0:
            raise UsageError(f"perceived_gender: margin must be in [0, 1], got {margin}")
        if no_face_policy not in ("no_person", "whole_image"):
            raise UsageError(f"perceived_gender: no_face_policy must be 'no_person' or 'whole_image', got {no_face_policy!r}")
        if logit_scale <= 0 or crop_margin < 0:
            raise UsageError("perceived_gender: logit_scale must be > 0 and crop_margin >= 0")
        self.margin = margin
        self.logit_scale = logit_scale
        self.no_face_policy = no_face_policy
        self.crop_margin = crop_margin
        self.prompts = _check_prompts(prompts)
        self.face_settings = FaceSettings.from_args(faces or {})
        self.batch_size = batch_size

    def config(self, ctx: ScoringContext) -> dict[str, Any]:
        return {
            "measures": "perceived gender presentation as read by CLIP (not gender identity)",
            "clip": get_clip(ctx).describe(),
            "prompts": {c: list(p) for c, p in self.prompts.items()},
            "ensemble": "per class: mean of L2-normalised prompt embeddings, renormalised (Radford et al. 2021)",
            "logit_scale": self.logit_scale,
            "rule": "feminine/masculine if |p_feminine - p_masculine| >= margin else unclear; value = p_feminine",
            "margin": self.margin,
            "no_face_policy": self.no_face_policy,
            "crop": {"face": "largest detected", "margin": self.crop_margin},
            "faces": describe(self.face_settings),
        }

    def class_vectors(self, clip: ClipBackend, ctx: ScoringContext) -> np.ndarray:
        """(2, d) unit class embeddings, feminine first, from the cached prompt embeddings."""
        vectors = [clip.text_embeddings(list(self.prompts[c]), ctx.features)[0] for c in CLASSES]
        return class_embeddings(vectors)

    def _target(self, item: ImageItem, ctx: ScoringContext) -> tuple[ImageItem | None, FaceBox | None, int]:
        """What to embed for `item` (its face crop, the whole image, or nothing), the face, and the face count."""
        boxes = faces_for(item, ctx, self.face_settings)
        face = largest_face(boxes)
        if face is not None:
            key = FaceCrop.key_for(item.key, face, self.crop_margin)
            face_crop = FaceCrop(key=key, path=item.path, prompt=item.prompt, box=face, margin=self.crop_margin,
                            pixels=item.pixels)  # cropped from the pass's decode, not decoded again
            return face_crop, face, len(boxes)
        return (item if self.no_face_policy == "whole_image" else None), None, 0

    def score(self, items: Sequence[ImageItem], ctx: ScoringContext) -> list[Score]:
        if not items:
            return []
        clip = get_clip(ctx)
        targets = [self._target(item, ctx) for item in items]
        embed = [t for t, _, _ in targets if t is not None]
        probabilities = iter(np.zeros((0, 2)))
        if embed:
            vectors = clip.image_embeddings(embed, ctx.features, self.batch_size)
            probabilities = iter(zero_shot_probabilities(vectors, self.class_vectors(clip, ctx), self.logit_scale))
        scores = []
        for item, (target, face, n_faces) in zip(items, targets, strict=True):
            extra: dict[str, Any] = {"n_faces": n_faces, "box": face.xywh() if face else None}
            if target is None:
                scores.append(Score(metric=self.name, value=None, key=item.key, label="no_person",
                                    extra={**extra, "source": None}))
                continue
            p_feminine, p_masculine = (float(p) for p in next(probabilities))
            extra.update({"source": "face" if face else "whole_image", "p_feminine": p_feminine,
                          "p_masculine": p_masculine})
            scores.append(Score(metric=self.name, value=p_feminine, key=item.key,
                                label=presentation_label(p_feminine, self.margin), extra=extra))
        return scores
