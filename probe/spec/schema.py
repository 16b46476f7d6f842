"""The suite schema: the user-facing YAML contract (see DESIGN.md), as strict pydantic models.

Shorthands (a model given as a preset name, a prompt given as a string, `seeds: 16`, `size: 512`)
are normalised before validation so each field has one shape and errors have one path.

Numbers are strict: YAML's `true` is not the integer 1, "4" is not 4, and `.inf` / `.nan` are not
guidance values; every count, size, seed and text is bounded (probe.spec.limits), so nothing a suite says
can overflow a column, a file name or memory later.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from probe.spec.limits import MAX_NAME_CHARS, MAX_PROMPT_CHARS, MAX_SEED, MAX_SIDE, MAX_STEPS, max_jobs, shown

Float = Annotated[float, Strict(), AllowInfNan(False)]
"""A finite number; integers are accepted (`guidance: 7`), bools, strings, inf and nan are not."""
Steps = Annotated[StrictInt, Field(ge=1, le=MAX_STEPS)]
Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]
Scalar = str | StrictBool | StrictInt | Float | None
ProbeKind = Literal["quality", "demographic", "text", "img2img"]


def _text(value: str) -> str:
    """Prompts, templates, variable values and target texts: not blank (an empty prompt is a mistake, not a
    probe of the unconditional model) and at most MAX_PROMPT_CHARS."""
    if not value.strip():
        raise ValueError("is empty or only whitespace")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"is {shown(len(value))} characters long; the limit is {shown(MAX_PROMPT_CHARS)}")
    return value


def _label(value: str) -> str:
    """A model label: free text (spaces allowed) that still fits a file name, since results and exports may
    be written per model."""
    if not value.strip() or value != value.strip() or value in (".", ".."):
        raise ValueError(f"{value!r} is not a usable name (blank, '.', '..' or with spaces around it)")
    if len(value) > MAX_NAME_CHARS:
        raise ValueError(f"is {len(value)} characters long; a name may have at most {MAX_NAME_CHARS}")
    bad = next((c for c in value if c in "/\\" or ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ValueError(f"{value!r} contains {bad!r}; a name must fit a file name (no path separators or "
                         "control characters)")
    return value


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _name(value: str) -> str:
    """Suite and probe names become folder names (reports/<suite>/...): a portable file-name subset."""
    if len(value) > MAX_NAME_CHARS:
        raise ValueError(f"is {len(value)} characters long; a name may have at most {MAX_NAME_CHARS}")
    if not _NAME.fullmatch(value):
        raise ValueError(f"{value!r:.60} is not a usable name: start with a letter or digit, then only letters, digits, "
                         "'_', '.' and '-' (it names a folder)")
    return value


Text = Annotated[str, AfterValidator(_text)]
Name = Annotated[str, AfterValidator(_name)]
Label = Annotated[str, AfterValidator(_label)]


class StrictModel(BaseModel):
    """Base for suite records: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _size_pair(value: Any) -> Any:
    """`512` -> [512, 512]; sizes must be positive multiples of 8 (the VAE downsamples by 8)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if isinstance(value, list | tuple) and len(value) == 2 and all(type(v) is int for v in value):
        bad = [v for v in value if v <= 0 or v % 8]
        if bad:
            raise ValueError(f"size {bad[0]} is not a positive multiple of 8 (width and height must be)")
        if max(value) > MAX_SIDE:
            raise ValueError(f"size {max(value)} is larger than {MAX_SIDE} pixels")
        return tuple(value)
    return value


class ModelEntry(StrictModel):
    """One model in the comparison: a preset, optionally with its own settings and weights."""

    preset: str
    name: Label | None = Field(default=None, description="Label in results; defaults to the preset name.")
    model_id: str | None = Field(default=None, description="Hub id or local folder replacing the preset's.")
    revision: str | None = None
    lora_id: str | None = None
    lora_revision: str | None = None
    steps: list[Steps] | None = Field(default=None, min_length=1)
    guidance: Float | None = Field(default=None, ge=0)
    size: tuple[StrictInt, StrictInt] | None = None

    _size = field_validator("size", mode="before")(_size_pair)

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[int] | None) -> list[int] | None:
        return _positive_unique(value, "steps")

    @property
    def label(self) -> str:
        """Model label used in results and reports."""
        return self.name or self.preset


class PromptEntry(StrictModel):
    """A literal prompt with optional per-prompt fields."""

    prompt: Text
    text: Text | None = Field(default=None, description="Target text the image should render.")
    attrs: dict[str, Scalar] = Field(default_factory=dict)


class PromptFile(StrictModel):
    """Prompts read from a TSV/CSV file (path relative to the suite file) or a named dataset."""

    file: str | None = None
    dataset: str | None = Field(default=None, description="A dataset fetched by `probe data pull NAME`.")
    column: str = "prompt"
    text_column: str | None = None
    attrs: list[str] = Field(default_factory=list, description="Columns carried to results.")
    where: dict[str, list[str]] = Field(default_factory=dict, description="Keep rows whose column is in the list.")

    @model_validator(mode="after")
    def _one_source(self) -> PromptFile:
        if (self.file is None) == (self.dataset is None):
            raise ValueError("give exactly one of `file` or `dataset`")
        return self


class VarValue(StrictModel):
    """One value of a template variable, with attributes (e.g. a reference share) carried to results."""

    value: Text
    attrs: dict[str, Scalar] = Field(default_factory=dict)


class VarFile(StrictModel):
    """Variable values read from a column of a TSV/CSV file (path relative to the suite file)."""

    file: str
    column: str
    attrs: list[str] = Field(default_factory=list, description="Columns carried to results as attrs.")


def _to_prompt_entries(value: Any) -> Any:
    if isinstance(value, list):
        return [{"prompt": v} if isinstance(v, str) else v for v in value]
    return value


def _to_var_values(value: Any) -> Any:
    if isinstance(value, dict):
        return value
    if isinstance(value, list):
        return [{"value": v} if isinstance(v, str) else v for v in value]
    return value


class MetricReference(StrictModel):
    """What a set metric (fid, kid, cmmd) compares each group of images with."""

    model: str | None = Field(default=None, description="Another model's images in the same probe.")
    steps: Steps | None = Field(default=None, description="Only that model's images at these steps.")
    folder: str | None = Field(default=None, description="A folder of real images (relative to the suite).")

    @model_validator(mode="after")
    def _one_source(self) -> MetricReference:
        if (self.model is None) == (self.folder is None):
            raise ValueError("give exactly one of `model` or `folder`")
        if self.steps is not None and self.model is None:
            raise ValueError("`steps` only applies to a `model` reference")
        return self


class MetricSpec(StrictModel):
    """A metric by name with its arguments; `clip_score` is shorthand for `{name: clip_score}`."""

    name: str
    args: dict[str, Any] = Field(default_factory=dict, description="Passed to the metric's constructor.")
    reference: MetricReference | None = Field(default=None, description="Set metrics: what to compare with.")
    group_by: list[str] = Field(default_factory=list, description="Set metrics: extra variables to group by.")


def _to_metric_specs(value: Any) -> Any:
    if isinstance(value, list):
        return [{"name": v} if isinstance(v, str) else v for v in value]
    return value


class Probe(StrictModel):
    """A set of prompts and a generation grid, with the metrics that score its images."""

    name: Name
    kind: ProbeKind = "quality"
    description: str = ""
    template: Text | None = None
    vars: dict[str, list[VarValue] | VarFile] = Field(default_factory=dict)
    prompts: list[PromptEntry] | PromptFile | None = None
    attrs: dict[str, Scalar] = Field(default_factory=dict)
    steps: list[Steps] | None = Field(default=None, min_length=1)
    guidance: Float | None = Field(default=None, ge=0)
    strength: list[Float] | None = Field(default=None, min_length=1)
    init_images: list[str] | None = Field(default=None, min_length=1)
    seeds: list[Seed] | None = Field(default=None, min_length=1)
    metrics: list[MetricSpec] = Field(default_factory=list)

    _metrics = field_validator("metrics", mode="before")(_to_metric_specs)

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("the prompt list is empty")
        return _to_prompt_entries(value)

    @field_validator("vars", mode="before")
    @classmethod
    def _vars(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: _to_var_values(v) for k, v in value.items()}
        return value

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, value: Any, info: ValidationInfo) -> Any:
        return _seed_list(value, info)

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[int] | None) -> list[int] | None:
        return _positive_unique(value, "steps")

    @field_validator("strength")
    @classmethod
    def _strength(cls, value: list[float] | None) -> list[float] | None:
        for s in value or []:
            if not 0 < s <= 1:
                raise ValueError(f"strength {s} is outside (0, 1]")
        return value

    @model_validator(mode="after")
    def _one_prompt_source(self) -> Probe:
        if (self.template is None) == (self.prompts is None):
            raise ValueError("give exactly one of `template` (with `vars`) or `prompts`")
        if self.prompts is not None and self.vars:
            raise ValueError("`vars` only applies to a `template`")
        return self


class Check(StrictModel):
    """A quality gate evaluated by `probe check` (see the CI gate issue)."""

    metric: str
    probe: str | None = None
    model: str | None = None
    steps: Steps | None = None
    min: Float | None = None
    max: Float | None = None
    max_drop: Float | None = None
    max_increase: Float | None = None
    min_win_rate: Float | None = None
    """The least share of paired images (ties half) on which `model` must beat the `against` model."""
    against: str | None = None
    """The opponent model (its label) of a `min_win_rate` check."""
    against_steps: Steps | None = None
    """The opponent's steps (default: each of its step counts is judged)."""
    mode: Literal["strict", "significant"] = "significant"

    @model_validator(mode="after")
    def _one_bound(self) -> Check:
        given = [k for k in BOUND_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of min, max, max_drop, max_increase or min_win_rate")
        if self.min_win_rate is not None and not self.against:
            raise ValueError("min_win_rate needs `against`: the model whose paired images are to be beaten")
        if self.min_win_rate is None and (self.against or self.against_steps is not None):
            raise ValueError("against and against_steps belong to a min_win_rate check")
        if self.min_win_rate is not None and not 0 <= self.min_win_rate <= 1:
            raise ValueError(f"min_win_rate is a share between 0 and 1, not {self.min_win_rate}")
        return self

    @property
    def bound(self) -> tuple[str, float]:
        """(kind, tolerance) of the one bound this check sets."""
        kind = next(k for k in BOUND_KINDS if getattr(self, k) is not None)
        return kind, float(getattr(self, kind))

    @property
    def title(self) -> str:
        """E.g. 'clip_score[probe=quality] max_drop 0.5 (significant)'."""
        keys = ("probe", "model", "steps", "against", "against_steps")
        scope = ",".join(f"{k}={v}" for k in keys if (v := getattr(self, k)) is not None)
        kind, value = self.bound
        return f"{self.metric}[{scope or 'all'}] {kind} {value:g} ({self.mode})"


BOUND_KINDS = ("min", "max", "max_drop", "max_increase", "min_win_rate")


def _seed_list(value: Any, info: ValidationInfo) -> Any:
    """`16` -> [0..15]; seeds must be distinct non-negative integers.

    A count is checked against the job limit before the list is built: every seed is at least one job, so
    `seeds: 1000000000` is refused here instead of filling memory with a billion integers.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError("seeds must be a positive count or a list of seeds")
        limit = (info.context or {}).get("max_jobs") or max_jobs()
        if value > limit:
            raise ValueError(f"{shown(value)} seeds plan at least {shown(value)} jobs; the limit is {shown(limit)}: "
                             "raise it with --max-jobs")
        return list(range(value))
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        if any(v < 0 for v in value) or len(set(value)) != len(value):
            raise ValueError("seeds must be distinct non-negative integers")
    return value


def _positive_unique(value: list[int] | None, what: str) -> list[int] | None:
    if value is not None and (any(v < 1 for v in value) or len(set(value)) != len(value)):
        raise ValueError(f"{what} must be distinct integers >= 1")
    return value


class PreferenceProxies(StrictModel):
    """Which per-image metrics the report's Preference section charts as the model card's two questions.

    None picks the first of the defaults the run scored: image quality from aesthetic, pickscore, hps;
    prompt following from clip_score, pickscore, hps (probe.report.preference).
    """

    quality: str | None = None
    prompt_following: str | None = None


class ReportOptions(StrictModel):
    """How the report shows a run."""

    blur_flagged: bool = Field(
        default=True, description="Blur images a safety detector flagged (nsfw, sd_safety); false only for "
                                  "internal review.")


class Suite(StrictModel):
    """A declarative evaluation: models x probes x grid. The first model is the subject."""

    name: Name
    description: str = ""
    models: list[ModelEntry] = Field(min_length=1)
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2, 3], min_length=1)
    size: tuple[StrictInt, StrictInt] | None = None
    clip_model: str | None = Field(
        default=None, description="CLIP for every CLIP-based metric: hub id, local folder, or 'tiny'."
    )
    probes: list[Probe] = Field(min_length=1)
    checks: list[Check] = Field(default_factory=list)
    preference: PreferenceProxies = Field(default_factory=PreferenceProxies)
    report: ReportOptions = Field(default_factory=ReportOptions)

    _size = field_validator("size", mode="before")(_size_pair)

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"preset": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, value: Any, info: ValidationInfo) -> Any:
        return _seed_list(value, info)


ALL_FIELD_NAMES: frozenset[str] = frozenset(
    name
    for model in (Suite, Probe, ModelEntry, PromptEntry, PromptFile, VarValue, VarFile, Check, MetricSpec, MetricReference,
                  PreferenceProxies, ReportOptions)
    for name in model.model_fields
)
