"""Metric protocol, score records and the registry that builds metrics by name (lazily).

Two kinds of metric:
- per-image metrics (`ImageMetric`) emit one Score per image (clip_score, faces, ocr ...);
- set metrics (`SetMetric`) emit one Score per group of images they describe (fid, kid, cmmd), e.g. the
  images of one probe x model x steps x strength against a reference set.
Both declare their direction and a `config()` recorded in the manifest, so every number can be traced to
the model, revision and preprocessing that produced it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

from probe.errors import UsageError, suggest
from probe.spec.metric_catalog import METRICS

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from probe.stats.jackknife import Design, Interval
    from probe.store.features import FeatureCache

Direction = Literal["higher", "lower", "none"]


@dataclass(frozen=True)
class ImageItem:
    """One image to score: where it is, what it was asked to show."""

    key: str
    path: Path
    prompt: str
    text: str | None = None

    def open(self) -> Image.Image:
        """The image as RGB, fully loaded."""
        from PIL import Image

        with Image.open(self.path) as image:
            return image.convert("RGB")


@dataclass(frozen=True)
class ImageSet:
    """A group of images a set metric describes, with the group's coordinates (probe, model, steps ...)."""

    group: dict[str, Any]
    items: tuple[ImageItem, ...]


@dataclass
class Score:
    """One row of scores.parquet. Per-image rows carry `key`; set rows carry `group` (and `key` None)."""

    metric: str
    value: float | None
    key: str | None = None
    label: str | None = None
    text: str | None = None
    group: dict[str, Any] = field(default_factory=dict)
    n: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScoringContext:
    """What metrics share within one scoring pass: the feature cache, device and run-level choices."""

    features: FeatureCache
    device: str = "cpu"
    clip_model: str = "openai/clip-vit-large-patch14"
    run_dir: Path | None = None
    base_dir: Path = Path(".")
    all_tiny: bool = False
    """Every image comes from the embedded tiny model: stand-in feature networks may replace real ones."""
    _shared: dict[str, Any] = field(default_factory=dict)

    def shared(self, name: str, factory: Any) -> Any:
        """One instance per context of an expensive object (a loaded CLIP model), built on first use."""
        if name not in self._shared:
            self._shared[name] = factory()
        return self._shared[name]


@runtime_checkable
class ImageMetric(Protocol):
    """A metric computed independently for each image."""

    name: ClassVar[str]
    direction: ClassVar[Direction]
    kind: ClassVar[Literal["image"]]

    def config(self, ctx: ScoringContext) -> dict[str, Any]: ...

    def score(self, items: Sequence[ImageItem], ctx: ScoringContext) -> list[Score]: ...


@runtime_checkable
class SetMetric(Protocol):
    """A distance between a set of images and a reference set, computed on cached per-image features.

    Split into `embed`, `compare` and `interval` so the scorer can put a jackknife CI over prompts on the
    value from the feature rows, without recomputing any embedding (see probe.stats.jackknife).
    """

    name: ClassVar[str]
    direction: ClassVar[Direction]
    kind: ClassVar[Literal["set"]]
    ci_groups: int

    def config(self, ctx: ScoringContext) -> dict[str, Any]: ...

    def embed(self, items: Sequence[ImageItem], ctx: ScoringContext) -> np.ndarray: ...

    def compare(self, features: np.ndarray, reference: np.ndarray) -> tuple[float, dict[str, Any]]: ...

    def interval(self, features: np.ndarray, reference: np.ndarray, design: Design, estimate: float,
                 extra: dict[str, Any]) -> Interval: ...


def build_metric(name: str, args: dict[str, Any] | None = None) -> ImageMetric | SetMetric:
    """Import the metric's module (only now) and build it with its suite args."""
    if name not in METRICS:
        raise UsageError(f"unknown metric {name!r}{suggest(name, METRICS)}")
    module_name, attr = METRICS[name].target.split(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(**(args or {}))
