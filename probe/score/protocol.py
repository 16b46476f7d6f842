"""Metric protocol, score records and the registry that builds metrics by name (lazily).

Two kinds of metric:
- per-image metrics (`ImageMetric`) emit one Score per image (clip_score, faces, ocr ...);
- set metrics (`SetMetric`) emit one Score per group of images they describe (fid, kid, cmmd), e.g. the
  images of one probe x model x steps x strength against a reference set.
Both give a `config()` recorded in the manifest, so every number can be traced to the model, revision and
preprocessing that produced it. What a metric is called and which way is better is not declared here but in
its catalog record (probe.spec.metric_catalog), which reports and validation read without importing this
package; a `Metric` subclass links to its record with `info = METRICS["name"]`, and `@registered` adds a
user's metric in-process.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeVar, runtime_checkable

from probe.errors import ProbeError
from probe.spec.metric_catalog import DEFAULT_CLIP_MODEL, METRICS, Direction, Kind, MetricInfo, register_metric

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from probe.stats.jackknife import Design, Interval
    from probe.store.features import FeatureCache

__all__ = ["Direction", "ImageItem", "ImageMetric", "ImageSet", "Metric", "Score", "ScoringContext", "SetMetric",
           "build_metric", "rebuildable", "registered"]


@dataclass(frozen=True)
class ImageItem:
    """One image to score: where it is, what it was asked to show."""

    key: str
    path: Path
    prompt: str
    text: str | None = None
    pixels: Image.Image | None = field(default=None, compare=False, repr=False, kw_only=True)
    """The decoded image when the scoring pass has decoded it already (once, for every metric of the pass);
    shared, so a metric must not change it in place."""

    def open(self) -> Image.Image:
        """The image as RGB, fully loaded (the pass's decoded pixels when there are some)."""
        from PIL import Image

        if self.pixels is not None:
            return self.pixels
        with Image.open(self.path) as image:
            return image.convert("RGB")

    def decoded(self) -> ImageItem:
        """This item with its pixels attached; unchanged when they cannot be read (the metric that opens it
        then meets the error and records it for this image alone)."""
        if self.pixels is not None:
            return self
        try:
            return replace(self, pixels=self.open())
        except Exception:  # noqa: BLE001 - unreadable, truncated, a decompression bomb: each metric records it
            return self


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
    clip_model: str = DEFAULT_CLIP_MODEL
    run_dir: Path | None = None
    base_dir: Path = Path(".")
    all_tiny: bool = False
    """Every image comes from the embedded tiny model: stand-in feature networks may replace real ones."""
    cpu_threads: int | None = None
    """Threads a CPU library may use (onnxruntime's intra-op pool); None lets it take every core. A CPU worker
    process sets 1: its siblings take the other cores."""
    _shared: dict[str, Any] = field(default_factory=dict)

    def shared(self, name: str, factory: Any) -> Any:
        """One instance per context of an expensive object (a loaded CLIP model), built on first use."""
        if name not in self._shared:
            self._shared[name] = factory()
        return self._shared[name]

    def shared_names(self, prefix: str) -> list[str]:
        """The names of the shared objects built so far that start with `prefix`."""
        return [name for name in self._shared if name.startswith(prefix)]


@runtime_checkable
class ImageMetric(Protocol):
    """A metric computed independently for each image."""

    name: ClassVar[str]
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
    kind: ClassVar[Literal["set"]]
    ci_groups: int

    def config(self, ctx: ScoringContext) -> dict[str, Any]: ...

    def embed(self, items: Sequence[ImageItem], ctx: ScoringContext) -> np.ndarray: ...

    def compare(self, features: np.ndarray, reference: np.ndarray) -> tuple[float, dict[str, Any]]: ...

    def interval(self, features: np.ndarray, reference: np.ndarray, design: Design, estimate: float,
                 extra: dict[str, Any]) -> Interval: ...


class Metric:
    """Base for metric implementations: name, kind and direction come from the catalog record `info`.

    A subclass sets only `info` (`info = METRICS["clip_score"]`, or a user's own `MetricInfo`), so these
    facts are written once, in data that validation and reports read without importing the class.
    """

    info: ClassVar[MetricInfo]
    name: ClassVar[str]
    kind: ClassVar[Kind]
    direction: ClassVar[Direction | None]
    """The direction of the metric's own row; None for a metric writing several rows (see `info.outputs`)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        info = cls.__dict__.get("info")
        if isinstance(info, MetricInfo):
            cls.name, cls.kind, cls.direction = info.name, info.kind, info.direction


M = TypeVar("M", bound=type[Metric])

#: Classes registered with `@registered`, by metric name: built from here, so a class defined in a notebook or a
#: function works although its "module:attr" target could not be imported again.
_IN_PROCESS: dict[str, Callable[..., Any]] = {}


def registered(cls: M) -> M:
    """Class decorator: register a `Metric` subclass in-process under its `info` (target filled in from the class).

    Raises:
        ProbeError: the metric's name or one of its rows is already taken (the message names both).
    """
    info = cls.__dict__.get("info")
    if not isinstance(info, MetricInfo):
        raise ProbeError(f"@registered {cls.__qualname__}: set `info = MetricInfo(...)` on the class")
    if not info.target:
        info = replace(info, target=f"{cls.__module__}:{cls.__qualname__}")
        cls.info = info
    register_metric(info)
    _IN_PROCESS[info.name] = cls
    return cls


def build_metric(name: str, args: dict[str, Any] | None = None) -> ImageMetric | SetMetric:
    """Import the metric's module (only now) and build it with its suite args.

    Raises:
        UsageError: unknown name (with a suggestion).
        ProbeError: the implementation cannot be imported, or is not the kind its record says.
    """
    info = METRICS.lookup(name)
    factory = _IN_PROCESS.get(name) or _import_target(info)
    metric = factory(**(args or {}))
    expected = SetMetric if info.kind == "set" else ImageMetric
    if not isinstance(metric, expected):
        raise ProbeError(f"metric {name!r} ({METRICS.origin(name)}): {info.target} builds a {type(metric).__name__}, "
                         f"which lacks the {expected.__name__} protocol's members (a {info.kind} metric)")
    return metric


def rebuildable(name: str) -> bool:
    """Whether a fresh process can build the metric from its name (not one registered in this process only)."""
    return name not in _IN_PROCESS and bool(METRICS.lookup(name).target)


def _import_target(info: MetricInfo) -> Callable[..., Any]:
    """The object a record's "module:attr" target names; a missing one is a ProbeError naming where it came from."""
    module_name, attr = info.target.split(":")
    try:
        factory: Callable[..., Any] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ProbeError(f"metric {info.name!r} ({METRICS.origin(info.name)}): cannot import {info.target}: "
                         f"{type(exc).__name__}: {exc}") from exc
    return factory
