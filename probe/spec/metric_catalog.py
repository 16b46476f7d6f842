"""The metric registry: what each metric is called, what rows it writes and which way is better, as data.

Validation (`probe suites validate`) and reports read this without importing torch or probe.score, so a
metric's implementation is a lazy "module:attr" target, imported only when a run scores with it. Each
metric's identity (name, kind, outputs with their directions and descriptions) lives in one `MetricInfo`;
the implementation classes read theirs from here (`info = METRICS["clip_score"]`) instead of repeating it.

A user's package adds a metric without editing probe, as lm-eval's `register_metric` and inspect's `@scorer`
do: in-process with `register_metric(info)` (or `@registered` on a class, probe.score.protocol), or across
packages with an entry point in group `probe.metrics` naming a `MetricInfo` object. Entry points are read
once, on the first lookup, so `import probe` stays cheap; a broken one is a ProbeError that names it.

Each record also declares the `args` its constructor accepts (`params`), so `probe suites validate` refuses
`{name: clip_score, args: {bogus: 1}}` naming the allowed ones, instead of the run failing after the models
have loaded. A record without `params` (a third-party metric that declares none) accepts any args.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Union

from probe.errors import ProbeError
from probe.spec.registry import Registry

Direction = Literal["higher", "lower", "none"]
Kind = Literal["image", "set"]
DIRECTIONS: tuple[Direction, ...] = ("higher", "lower", "none")
ParamKind = Literal["int", "float", "bool", "str", "strs", "mapping"]
"""What a metric argument must be: "strs" is a string or a list of them, "float" any finite number."""
Params = Mapping[str, Union[ParamKind, "Params"]]
"""Argument name -> kind, or the params of a nested mapping (the `faces:` settings of skin_tone)."""
_NAME = re.compile(r"[a-z][a-z0-9_]*")

#: The CLIP every CLIP-based metric uses unless a suite or --clip-model says otherwise (as HEIM and torchmetrics).
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


@dataclass(frozen=True)
class MetricOutput:
    """One score row a metric writes: scores.parquet holds one value per row, so a metric may write several."""

    direction: Direction
    """Which values are better: "higher", "lower", or "none" for descriptive values (face counts, labels)."""
    description: str = ""
    """What the value means, with its unit; shown as the report column's tooltip."""
    binary: bool = False
    """Every value is 0 or 1 (a flag, an exact match): its mean is a share, whose interval is Korn-Graubard's and
    whose paired differences are MOVER's (probe.stats.proportion), not the bootstrap's, which fails near 0 and 1."""


@dataclass(frozen=True)
class MetricInfo:
    """Everything validation and reports need to know about a metric, without importing its implementation.

    A metric writing one row gives `direction` (its row is named after it); one writing several gives
    `outputs` instead, e.g. ocr's ocr_exact, ocr_cer, ocr_f1 and ocr_detected, each with its own direction.
    """

    name: str
    """What a suite lists (snake_case); also the row name of a single-output metric."""
    kind: Kind
    """"image": one value per image; "set": one value per group of images against a reference set."""
    description: str
    target: str = ""
    """"module:attr" of the implementation, imported only when a run scores with it ("" until `@registered`)."""
    direction: Direction | None = None
    """Direction of the metric's own row; None when it writes several rows (see `outputs`)."""
    outputs: Mapping[str, MetricOutput] = field(default_factory=dict, hash=False)
    """Row name -> output; filled from `direction` for a single-output metric."""
    params: Params | None = field(default=None, hash=False)
    """The constructor's keyword arguments a suite may give in `args`, with their kinds; None accepts any."""
    cpu_bound: bool = False
    """Pure CPU work needing no model on the run's device and no other metric's state (faces, skin tone, OCR):
    a scoring pass may run it in worker processes, one per core, beside the device metrics."""

    def __post_init__(self) -> None:
        where = f"metric {self.name!r}"
        if not _NAME.fullmatch(self.name):
            raise ProbeError(f"{where}: a metric name is snake_case (lower-case letters, digits, _)")
        if self.kind not in ("image", "set"):
            raise ProbeError(f"{where}: kind must be 'image' or 'set', not {self.kind!r}")
        if self.target and (self.target.count(":") != 1 or not all(self.target.split(":"))):
            raise ProbeError(f"{where}: target {self.target!r} must look like 'package.module:Class'")
        own = {self.name: MetricOutput(self.direction, self.description)} if self.direction is not None else {}
        # dataclasses.replace() passes both: the old outputs of the metric's own row give way to `direction`.
        if not (own or self.outputs) or (own and self.outputs and set(self.outputs) != {self.name}):
            raise ProbeError(f"{where}: give either `direction` (one row, named {self.name!r}) or `outputs`")
        outputs = own or dict(self.outputs)
        for row, output in outputs.items():
            if not _NAME.fullmatch(row) or output.direction not in DIRECTIONS:
                raise ProbeError(f"{where}: output {row!r} needs a snake_case name and a direction in {DIRECTIONS}")
        if self.kind == "set" and list(outputs) != [self.name]:
            raise ProbeError(f"{where}: a set metric writes one row per group, named after the metric")
        object.__setattr__(self, "outputs", MappingProxyType(outputs))


#: Names `probe check` rules accept that are computed from labels per group, not stored as score rows
#: (see probe/gate/bias_gaps.py): gaps of perceived gender presentation from parity and from a reference share.
CHECK_ONLY_METRICS: dict[str, Direction] = {
    "feminine_share": "none",
    "parity_gap": "lower",
    "reference_gap": "lower",
}


class MetricRegistry(Registry[MetricInfo]):
    """Metric names and row names share one namespace: a row's direction must have exactly one source."""

    def names_of(self, item: MetricInfo) -> set[str]:
        return {item.name, *item.outputs}

    def reserved(self) -> Mapping[str, str]:
        return {name: "a `probe check` bias gap" for name in CHECK_ONLY_METRICS}

    def writer_of(self, row: str) -> tuple[MetricInfo, MetricOutput] | None:
        """The metric that writes score rows named `row`, and that output; None for an unknown row."""
        for info in self.values():
            if row in info.outputs:
                return info, info.outputs[row]
        return None


#: The settings of the face detector (probe.score.metrics.faces.FaceSettings), used by three metrics.
FACE_PARAMS: Params = {"frontal": "strs", "profile": "strs", "scale_factor": "float", "min_neighbors": "int",
                       "min_size": "float", "nms_iou": "float", "max_side": "int"}

_BUILTIN = (
    MetricInfo("clip_score", "image", "prompt-image alignment: 100*max(cos(image, prompt), 0) on CLIP embeddings",
               "probe.score.metrics.clip:ClipScore", "higher", params={"batch_size": "int"}),
    MetricInfo("cmmd", "set", "CLIP-embedding MMD to a reference set (Jayasumana et al. 2024), small-sample friendly",
               "probe.score.metrics.clip:Cmmd", "lower",
               params={"sigma": "float", "scale": "float", "batch_size": "int", "ci_groups": "int"}),
    MetricInfo("faces", "image", "face count and boxes (OpenCV Haar cascades: frontal alt2 + mirrored profile, NMS)",
               "probe.score.metrics.faces:Faces", "none", params=FACE_PARAMS, cpu_bound=True),
    MetricInfo("skin_tone", "image", "ITA of the largest face's skin pixels (CIELab median) and the nearest Monk Skin "
               "Tone (CIEDE2000); unknown when no face or too few skin pixels", "probe.score.metrics.skin:SkinTone",
               "none", params={"rule": "str", "core": "float", "min_skin_pixels": "int", "min_skin_fraction": "float",
                               "faces": FACE_PARAMS}, cpu_bound=True),
    MetricInfo("perceived_gender", "image", "perceived gender presentation of the largest face by CLIP zero-shot "
               "(feminine/masculine/unclear/no_person); never gender identity",
               "probe.score.metrics.gender:PerceivedGender", "none",
               params={"margin": "float", "logit_scale": "float", "no_face_policy": "str", "crop_margin": "float",
                       "prompts": "mapping", "faces": FACE_PARAMS, "batch_size": "int"}),
    MetricInfo("ocr", "image", "OCR read-back of the requested text (rapidocr with its bundled PP-OCR models)",
               "probe.score.metrics.text:Ocr", outputs={
                   "ocr_exact": MetricOutput("higher", "exact match of read-back and target after normalisation",
                                             binary=True),
                   "ocr_cer": MetricOutput("lower", "character error rate: edit distance / target length (uncapped)"),
                   "ocr_f1": MetricOutput("higher", "word F1 of read-back against target (MARIO-Eval)"),
                   "ocr_detected": MetricOutput("higher", "whether any text was detected", binary=True),
               }, params={"engine": "str", "casefold": "bool", "nfkc": "bool", "collapse_whitespace": "bool",
                          "drop_punctuation": "bool", "text_score": "float", "box_thresh": "float",
                          "det_limit_side_len": "int"}, cpu_bound=True),
    MetricInfo("pickscore", "image", "PickScore v1 human-preference score: exp(logit_scale)*cos(image, prompt) on a "
               "CLIP ViT-H/14 fine-tune (Kirstain et al. 2023)", "probe.score.metrics.preference:PickScore", "higher",
               params={"model": "str", "processor": "str", "batch_size": "int"}),
    MetricInfo("hps", "image", "Human Preference Score v2.1: cos(image, prompt) on open_clip ViT-H-14 with the HPS "
               "checkpoint (Wu et al. 2023)", "probe.score.metrics.preference:Hps", "higher",
               params={"weights": "str", "arch": "str", "batch_size": "int"}),
    MetricInfo("aesthetic", "image", "LAION aesthetic predictor v2: an MLP over L2-normalised CLIP ViT-L/14 image "
               "embeddings (about 1-10)", "probe.score.metrics.preference:Aesthetic", "higher",
               params={"weights": "str", "clip": "str", "batch_size": "int"}),
    MetricInfo("nsfw", "image", "Yahoo open_nsfw (2016 ResNet-50, sexual content only; not violence or gore) on "
               "onnxruntime: a flag at p(nsfw) >= threshold (default 0.8), and p(nsfw)",
               "probe.score.metrics.safety:Nsfw", outputs={
                   "nsfw": MetricOutput("lower", "1 when open_nsfw's p(nsfw) >= threshold (label flagged), else 0: "
                                        "its mean is the flagged share", binary=True),
                   "nsfw_prob": MetricOutput("lower", "open_nsfw's p(nsfw), 0-1"),
               }, params={"threshold": "float", "batch_size": "int"}, cpu_bound=True),
    MetricInfo("sd_safety", "image", "the Stable Diffusion safety checker (CLIP ViT-L/14 image embedding against 17 "
               "hidden sexual-content concepts; known to over- and under-flag): 1 flagged, 0 safe",
               "probe.score.metrics.safety:SdSafety", outputs={
                   "sd_safety": MetricOutput("lower", "1 when any concept score is above 0 (label flagged), else 0: "
                                             "its mean is the flagged share", binary=True),
               }, params={"model": "str", "adjustment": "float", "batch_size": "int"}),
    MetricInfo("fid", "set", "Frechet distance to a reference set on Inception (clean-fid preprocessing) or CLIP "
               "features", "probe.score.metrics.fid:Fid", "lower", params={"features": "str", "ci_groups": "int"}),
    MetricInfo("kid", "set", "Kernel (unbiased polynomial MMD^2) distance to a reference set; subset size adapts to "
               "small sets", "probe.score.metrics.fid:Kid", "lower",
               params={"features": "str", "subset_size": "int", "n_subsets": "int", "seed": "int", "ci_groups": "int"}),
)

#: Every metric a suite may list: the built-ins above, then in-process registrations and entry points.
METRICS = MetricRegistry("metric", "probe.metrics", MetricInfo, _BUILTIN)


def register_metric(info: MetricInfo) -> MetricInfo:
    """Add a metric in-process (its `target` must be importable); returns `info` for `X = register_metric(...)`.

    Raises:
        ProbeError: its name or one of its rows is already taken; the message names both metrics.
    """
    if not info.target:
        raise ProbeError(f"metric {info.name!r}: give its implementation as target='module:Class'")
    return METRICS.register(info, f"registered in-process, {info.target}")


def direction_of(metric: str) -> Direction:
    """Whether higher or lower values of a score row are better ("none" for descriptive values and unknown rows)."""
    found = METRICS.writer_of(metric)
    if found is not None:
        return found[1].direction
    return CHECK_ONLY_METRICS.get(metric, "none")


def is_binary(metric: str) -> bool:
    """Whether a score row is a 0/1 outcome (its catalog output says `binary`); False for unknown rows."""
    found = METRICS.writer_of(metric)
    return found is not None and found[1].binary


def description_of(metric: str) -> str:
    """What a score row means ("" for an unknown row)."""
    found = METRICS.writer_of(metric)
    return found[1].description if found is not None else ""


def check_names() -> list[str]:
    """Names a `probe check` rule may gate on: every score row a metric writes, and the bias gaps."""
    return [*(row for info in METRICS.values() for row in info.outputs), *CHECK_ONLY_METRICS]


def arg_problems(
    params: Params | None, args: Mapping[str, Any], prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], str]]:
    """(argument path, message) for each arg `params` does not accept or whose value is of the wrong kind.

    Only names and kinds: ranges and choices (kid's subset_size >= 2, skin_tone's rule) stay with the
    implementation, which checks them when the run builds its metrics, before any image is made.
    """
    if params is None:
        return []
    found: list[tuple[tuple[str, ...], str]] = []
    allowed = ", ".join(sorted(params)) or "none"
    for name, value in args.items():
        where = (*prefix, str(name))
        kind = params.get(str(name))
        if kind is None:
            found.append((where, f"unknown argument {name!r}; the arguments are: {allowed}"))
        elif not isinstance(kind, str):
            if isinstance(value, Mapping):
                found += arg_problems(kind, value, where)
            else:
                found.append((where, f"{name!r} takes a mapping of settings ({', '.join(sorted(kind))})"))
        elif not _is_kind(value, kind):
            found.append((where, f"{name!r} takes {_KIND_WORDS[kind]}, not {value!r:.60}"))
    return found


_KIND_WORDS: dict[str, str] = {"int": "an integer", "float": "a finite number", "bool": "true or false",
                               "str": "a string", "strs": "a string or a list of strings", "mapping": "a mapping"}


def _is_kind(value: object, kind: str) -> bool:
    if kind == "int":
        return type(value) is int
    if kind == "float":
        return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]
    if kind == "bool":
        return type(value) is bool
    if kind == "str":
        return isinstance(value, str)
    if kind == "strs":
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    return isinstance(value, Mapping)
