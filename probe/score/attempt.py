"""One metric on one chunk of images, failing per image: shared by the scoring pass and its CPU workers.

A chunk is scored in one call; when the metric raises, each image is tried alone so that only the images
that fail are recorded (any exception: one bad image must not stop the other images or metrics). Failures
come back as (key, "Type: message") text, which crosses a process boundary where an exception might not.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from probe.score.protocol import ImageItem, ImageMetric, Score, ScoringContext

log = logging.getLogger(__name__)

Failed = tuple[str, str]
"""(image key, "ErrorType: message") of an image a metric could not score."""


def attempt(metric: ImageMetric, images: Sequence[ImageItem], ctx: ScoringContext) -> tuple[list[Score], list[Failed]]:
    """The chunk's scores and the images that failed (tried one by one after a chunk-wide error)."""
    try:
        return list(metric.score(images, ctx)), []
    except Exception as exc:  # noqa: BLE001 - recorded per image, with its error
        if len(images) == 1:
            log.debug("%s failed on %s", metric.name, images[0].key, exc_info=True)
            return [], [(images[0].key, f"{type(exc).__name__}: {exc}")]
    scores: list[Score] = []
    failed: list[Failed] = []
    for image in images:
        more, bad = attempt(metric, [image], ctx)
        scores += more
        failed += bad
    return scores, failed
