"""skin_tone: Individual Typology Angle of the face's skin pixels, and the nearest Monk Skin Tone.

Pipeline per image: the largest face box (shared detection, `probe.score.metrics.faces.faces_for`), shrunk to its
centre to keep hair and background out; skin pixels by a colour rule; CIELab (D65, 2 degree observer, via
scikit-image); the per-channel median Lab colour; from it

- ITA = atan2(L* - 50, b*) * 180 / pi (Chardon, Cretois & Hourseau 1991, "Skin colour typology and suntanning
  pathways", Int J Cosmet Sci 13:191; categories of Del Bino & Bernerd 2013, Br J Dermatol 169 Suppl 3:33);
- the Monk Skin Tone (Monk 2019; Google's MST scale, skintone.google): the nearest of its 10 published
  swatches by CIEDE2000 (Sharma, Wu & Dalal 2005), which weights lightness and chroma as people see them.

Channel order matters: every function here takes RGB. A BGR array turns a warm skin colour blue (b* < 0), so
its ITA and tone come out wrong; HEIM's skin-tone code likely mixes the two. tests/test_faces_skin.py checks
that BGR input changes the answer and that the metric decodes images as RGB.

The skin rule is part of the instrument: a rule that rejects dark skin turns dark faces into `unknown` and
biases coverage. The textbook YCrCb box of Chai & Ngan 1999 rejects Monk tone 10 and sits on the edge for
tones 1 and 9 (chroma shrinks with luminance, and its box does not), so the default is a band of CIELab hue
angle and chroma (`lab-band`, thresholds below) that keeps all ten Monk swatches, lighter and darker by 5 L*,
and rejects neutral greys, whites, blacks, blues, greens and saturated reds (lips). Chai & Ngan stays
available as `rule: chai-ngan` for comparison. No colour rule separates brown hair from skin, hence the crop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from probe.errors import UsageError, suggest
from probe.score.metrics.faces import FaceBox, FaceSettings, describe, faces_for, largest_face, load_rgb
from probe.score.protocol import ImageItem, Metric, Score, ScoringContext
from probe.spec.metric_catalog import METRICS
from probe.spec.monk import MONK_HEX

logger = logging.getLogger(__name__)

__all__ = ["ITA_CATEGORIES", "MONK_HEX", "MONK_SWATCHES", "SKIN_RULES", "SkinTone", "face_core", "ita_category",
           "ita_degrees", "measure_skin", "nearest_monk", "rgb_to_lab", "skin_mask"]

#: ITA categories of Del Bino & Bernerd 2013: (lower bound, exclusive; name), lightest first.
ITA_CATEGORIES: tuple[tuple[float, str], ...] = (
    (55.0, "very_light"), (41.0, "light"), (28.0, "intermediate"), (10.0, "tan"), (-30.0, "brown"),
    (-np.inf, "dark"))

#: `lab-band` thresholds: lightness floor (hue is noise in near-black), chroma range, hue-angle range (degrees).
#: Measured on the Monk swatches: hue 49-89 degrees, chroma 3.8 (tone 10) to 27.8 (tone 6).
LAB_BAND = {"min_L": 5.0, "min_chroma": 2.5, "max_chroma": 60.0, "min_hue": 30.0, "max_hue": 100.0}

#: Chai & Ngan 1999 ("Face segmentation using skin-color map in videophone applications", IEEE TCSVT 9(4)):
#: full-range BT.601 Cr in [133, 173] and Cb in [77, 127].
CHAI_NGAN = {"cr": (133.0, 173.0), "cb": (77.0, 127.0)}

SKIN_RULES = ("lab-band", "chai-ngan")


def _as_rgb_float(rgb: np.ndarray) -> np.ndarray:
    array = np.asarray(rgb)
    if array.shape[-1] != 3:
        raise ValueError(f"expected RGB pixels in the last axis, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    if not np.issubdtype(array.dtype, np.floating) or array.min() < 0.0 or array.max() > 1.0:
        raise ValueError("expected uint8 RGB or float RGB in [0, 1]")
    return array.astype(np.float64)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELab (D65, 2 degree observer) of sRGB pixels, via `skimage.color.rgb2lab`.

    Args:
        rgb: (..., 3) in RGB order, uint8 or float in [0, 1]. Feeding BGR (OpenCV's order) silently gives
            wrong answers: a warm skin colour becomes blue, with b* < 0.

    Returns:
        (..., 3) float64 L* in [0, 100], a*, b*.
    """
    from skimage.color import rgb2lab

    return rgb2lab(_as_rgb_float(rgb), illuminant="D65", observer="2")


def _lab_band(lab: np.ndarray) -> np.ndarray:
    L, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    chroma = np.hypot(a, b)
    hue = np.degrees(np.arctan2(b, a))
    t = LAB_BAND
    return ((L >= t["min_L"]) & (chroma >= t["min_chroma"]) & (chroma <= t["max_chroma"])
            & (hue >= t["min_hue"]) & (hue <= t["max_hue"]))


def _chai_ngan(rgb: np.ndarray) -> np.ndarray:
    # Full-range BT.601, the same as OpenCV's COLOR_RGB2YCrCb, written out so no BGR conversion can sneak in.
    pixels = _as_rgb_float(rgb) * 255.0
    y = pixels @ np.array([0.299, 0.587, 0.114])
    cr = (pixels[..., 0] - y) * 0.713 + 128.0
    cb = (pixels[..., 2] - y) * 0.564 + 128.0
    (cr_lo, cr_hi), (cb_lo, cb_hi) = CHAI_NGAN["cr"], CHAI_NGAN["cb"]
    return (cr >= cr_lo) & (cr <= cr_hi) & (cb >= cb_lo) & (cb <= cb_hi)


def skin_mask(rgb: np.ndarray, rule: str = "lab-band", lab: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of skin-coloured pixels of an RGB array (see the module docstring for the rules).

    Args:
        rgb: (..., 3) RGB, uint8 or float in [0, 1].
        rule: "lab-band" (default; keeps all ten Monk tones) or "chai-ngan" (Chai & Ngan 1999 YCrCb box).
        lab: `rgb_to_lab(rgb)` when the caller has it already.
    """
    if rule == "lab-band":
        return _lab_band(rgb_to_lab(rgb) if lab is None else lab)
    if rule == "chai-ngan":
        return _chai_ngan(rgb)
    raise UsageError(f"unknown skin rule {rule!r}{suggest(rule, SKIN_RULES)}")


def ita_degrees(L: Any, b: Any) -> Any:
    """Individual Typology Angle in degrees, atan2(L* - 50, b*) * 180 / pi (Chardon et al. 1991).

    The paper writes arctan((L* - 50) / b*); atan2 is the same for b* > 0 and stays defined for b* <= 0.
    """
    return np.degrees(np.arctan2(np.asarray(L, dtype=np.float64) - 50.0, np.asarray(b, dtype=np.float64)))


def ita_category(ita: float) -> str:
    """Del Bino & Bernerd 2013: very_light > 55 >= light > 41 >= intermediate > 28 >= tan > 10 >= brown > -30 >= dark."""
    for bound, name in ITA_CATEGORIES:
        if ita > bound:
            return name
    return "dark"  # ita == -inf


def _hex_to_rgb(code: str) -> tuple[int, int, int]:
    return int(code[1:3], 16), int(code[3:5], 16), int(code[5:7], 16)


#: The Monk swatches in CIELab, (10, 3), row i is tone i + 1.
MONK_SWATCHES: np.ndarray = rgb_to_lab(np.array([[_hex_to_rgb(c) for c in MONK_HEX]], dtype=np.uint8))[0]


def nearest_monk(lab: Sequence[float] | np.ndarray) -> int:
    """Monk tone (1..10) whose swatch is nearest to one Lab colour by CIEDE2000."""
    from skimage.color import deltaE_ciede2000

    colour = np.broadcast_to(np.asarray(lab, dtype=np.float64), MONK_SWATCHES.shape)
    return int(np.argmin(deltaE_ciede2000(colour, MONK_SWATCHES))) + 1


def face_core(box: FaceBox, fraction: float, shape: tuple[int, ...]) -> tuple[slice, slice]:
    """Row and column slices of the central `fraction` of a face box (cheeks, nose, eyes; little hair)."""
    h, w = max(1, round(box.h * fraction)), max(1, round(box.w * fraction))
    top, left = box.y + (box.h - h) // 2, box.x + (box.w - w) // 2
    return slice(max(0, top), min(shape[0], top + h)), slice(max(0, left), min(shape[1], left + w))


def measure_skin(rgb: np.ndarray, rule: str = "lab-band", min_pixels: int = 200,
                 min_fraction: float = 0.2) -> dict[str, Any]:
    """Skin colour of an RGB region: ITA, Monk tone and ITA category of its median skin Lab colour.

    Returns a dict with "n_skin_pixels" and either "reason": "too_few_skin_pixels" (fewer than `min_pixels`
    skin pixels or under `min_fraction` of the region) or "ita", "monk", "ita_category", "lab_median".
    """
    lab = rgb_to_lab(rgb)
    mask = skin_mask(rgb, rule, lab=lab)
    n = int(mask.sum())
    if n < min_pixels or n < min_fraction * mask.size:
        return {"reason": "too_few_skin_pixels", "n_skin_pixels": n}
    median = np.median(lab[mask], axis=0)
    ita = float(ita_degrees(median[0], median[2]))
    return {"ita": ita, "monk": nearest_monk(median), "ita_category": ita_category(ita),
            "lab_median": [round(float(v), 3) for v in median], "n_skin_pixels": n}


class SkinTone(Metric):
    """skin_tone: ITA (value, degrees; higher is lighter) and Monk tone (label "monk_1".."monk_10") of the
    largest face's skin, or label "unknown" with a reason ("no_face", "too_few_skin_pixels").

    Args:
        rule: skin rule, "lab-band" or "chai-ngan".
        core: fraction of the face box's width and height kept around its centre.
        min_skin_pixels: fewer skin pixels than this in the core gives "unknown".
        min_skin_fraction: a smaller share of skin pixels in the core gives "unknown".
        faces: `FaceSettings` fields; give the same as the `faces` metric to share its detections.
    """

    info = METRICS["skin_tone"]

    def __init__(self, rule: str = "lab-band", core: float = 0.6, min_skin_pixels: int = 200,
                 min_skin_fraction: float = 0.2, faces: dict[str, Any] | None = None) -> None:
        if rule not in SKIN_RULES:
            raise UsageError(f"skin_tone: unknown rule {rule!r}{suggest(rule, SKIN_RULES)}")
        if not 0.0 < core <= 1.0 or min_skin_pixels < 1 or not 0.0 <= min_skin_fraction <= 1.0:
            raise UsageError("skin_tone: need 0 < core <= 1, min_skin_pixels >= 1, 0 <= min_skin_fraction <= 1")
        self.rule, self.core = rule, core
        self.min_skin_pixels, self.min_skin_fraction = min_skin_pixels, min_skin_fraction
        self.face_settings = FaceSettings.from_args(faces or {})

    def config(self, ctx: ScoringContext) -> dict[str, Any]:
        from importlib.metadata import version

        return {"rule": self.rule, "thresholds": dict(LAB_BAND if self.rule == "lab-band" else CHAI_NGAN),
                "core": self.core, "min_skin_pixels": self.min_skin_pixels,
                "min_skin_fraction": self.min_skin_fraction, "face": "largest", "faces": describe(self.face_settings),
                "lab": "skimage.color.rgb2lab, D65, 2 degree observer", "skimage": version("scikit-image"),
                "statistic": "per-channel median over skin pixels", "ita": "atan2(L-50, b)*180/pi",
                "monk": "nearest swatch by CIEDE2000", "monk_hex": list(MONK_HEX)}

    def score(self, items: Sequence[ImageItem], ctx: ScoringContext) -> list[Score]:
        return [self._score_one(item, ctx) for item in items]

    def _score_one(self, item: ImageItem, ctx: ScoringContext) -> Score:
        rgb = load_rgb(item)
        face = largest_face(faces_for(item, ctx, self.face_settings, rgb=rgb))
        if face is None:
            return Score(metric=self.name, value=None, key=item.key, label="unknown",
                         extra={"reason": "no_face", "n_skin_pixels": 0})
        rows, cols = face_core(face, self.core, rgb.shape)
        measured = measure_skin(rgb[rows, cols], self.rule, self.min_skin_pixels, self.min_skin_fraction)
        measured["face"] = face.xywh()
        if "reason" in measured:
            return Score(metric=self.name, value=None, key=item.key, label="unknown", extra=measured)
        ita = measured.pop("ita")
        return Score(metric=self.name, value=ita, key=item.key, label=f"monk_{measured['monk']}", extra=measured)
