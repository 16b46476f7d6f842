"""Names of the metrics a suite may list, with lazy "module:attr" targets (no torch at import).

A metric appears here only once it is implemented and tested; suites are validated against this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: The CLIP every CLIP-based metric uses unless a suite or --clip-model says otherwise (as HEIM and torchmetrics).
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


@dataclass(frozen=True)
class MetricInfo:
    """What validation and reports need to know about a metric without importing it."""

    target: str
    """"module:attr" of the metric's class, imported only when a run scores with it."""
    kind: Literal["image", "set"]
    direction: Literal["higher", "lower", "none"]
    description: str


METRICS: dict[str, MetricInfo] = {
    "clip_score": MetricInfo("probe.score.metrics.clip:ClipScore", "image", "higher",
                             "prompt-image alignment: 100*max(cos(image, prompt), 0) on CLIP embeddings"),
    "cmmd": MetricInfo("probe.score.metrics.clip:Cmmd", "set", "lower",
                       "CLIP-embedding MMD to a reference set (Jayasumana et al. 2024), small-sample friendly"),
    "faces": MetricInfo("probe.score.metrics.faces:Faces", "image", "none",
                        "face count and boxes (OpenCV Haar cascades: frontal alt2 + mirrored profile, NMS)"),
    "skin_tone": MetricInfo("probe.score.metrics.skin:SkinTone", "image", "none",
                            "ITA of the largest face's skin pixels (CIELab median) and the nearest Monk Skin Tone "
                            "(CIEDE2000); unknown when no face or too few skin pixels"),
    "perceived_gender": MetricInfo("probe.score.metrics.gender:PerceivedGender", "image", "none",
                                   "perceived gender presentation of the largest face by CLIP zero-shot "
                                   "(feminine/masculine/unclear/no_person); never gender identity"),
    "ocr": MetricInfo("probe.score.metrics.text:Ocr", "image", "higher",
                      "OCR read-back of the requested text (rapidocr with its bundled PP-OCR models); writes the rows "
                      "ocr_exact, ocr_cer, ocr_f1 and ocr_detected"),
    "fid": MetricInfo("probe.score.metrics.fid:Fid", "set", "lower",
                      "Frechet distance to a reference set on Inception (clean-fid preprocessing) or CLIP features"),
    "kid": MetricInfo("probe.score.metrics.fid:Kid", "set", "lower",
                      "Kernel (unbiased polynomial MMD^2) distance to a reference set; subset size adapts to small sets"),
}


#: Directions of score rows whose name is not a suite metric: rows another metric writes (e.g. ocr's ocr_cer).
DERIVED_DIRECTIONS: dict[str, Literal["higher", "lower", "none"]] = {
    "ocr_exact": "higher",  # exact match after normalisation
    "ocr_cer": "lower",  # character error rate, edit distance / target length (uncapped)
    "ocr_f1": "higher",  # MARIO-Eval word F1
    "ocr_detected": "higher",  # any text detected
}


#: Names `probe check` rules accept that are computed from labels per group, not stored as score rows
#: (see probe/gate/bias_gaps.py): gaps of perceived gender presentation from parity and from a reference share.
CHECK_ONLY_METRICS: dict[str, Literal["higher", "lower", "none"]] = {
    "feminine_share": "none",
    "parity_gap": "lower",
    "reference_gap": "lower",
}


def direction_of(metric: str) -> Literal["higher", "lower", "none"]:
    """Whether higher or lower values of a score row are better ("none" for descriptive values)."""
    if metric in METRICS:
        return METRICS[metric].direction
    return DERIVED_DIRECTIONS.get(metric, CHECK_ONLY_METRICS.get(metric, "none"))
