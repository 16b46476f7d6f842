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
    "clip_score": MetricInfo("probe.metrics.clip:ClipScore", "image", "higher",
                             "prompt-image alignment: 100*max(cos(image, prompt), 0) on CLIP embeddings"),
    "cmmd": MetricInfo("probe.metrics.clip:Cmmd", "set", "lower",
                       "CLIP-embedding MMD to a reference set (Jayasumana et al. 2024), small-sample friendly"),
    "fid": MetricInfo("probe.metrics.fid:Fid", "set", "lower",
                      "Frechet distance to a reference set on Inception (clean-fid preprocessing) or CLIP features"),
    "kid": MetricInfo("probe.metrics.fid:Kid", "set", "lower",
                      "Kernel (unbiased polynomial MMD^2) distance to a reference set; subset size adapts to small sets"),
}
