"""Semantic checks of a suite that the schema cannot make alone: names that must exist, files that must be
there, metric arguments, the img2img grid, and the size of the whole plan.

Each check appends (field path, message) issues instead of raising, so one `probe suites validate` reports
every problem at once. Anything a run would trip on after loading its models belongs here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from probe.errors import suggest
from probe.spec.images import has_image_files
from probe.spec.limits import exists, is_file, shown
from probe.spec.metric_catalog import METRICS, arg_problems, check_names
from probe.spec.presets import PRESETS
from probe.spec.schema import MetricSpec, Probe, Suite
from probe.spec.yaml_source import FieldPath

Issue = tuple[FieldPath, str]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?(@[\w./-]+)?")


def value_problems(data: Any, path: FieldPath = ()) -> list[Issue]:
    """Values no field may hold, wherever they are (metric args and attrs included): NaN and infinite numbers,
    and text with NUL or other control characters, or that cannot be written as UTF-8 (a lone surrogate
    from a "\\ud800" escape), which would crash a path lookup or a results file later."""
    if isinstance(data, float) and not math.isfinite(data):
        return [(path, f"{data} is not a finite number")]
    if isinstance(data, str):
        problem = _text_problem(data)
        return [(path, problem)] if problem else []
    found: list[Issue] = []
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str) and (problem := _text_problem(key)):
                found.append(((*path, key), f"key: {problem}"))
            found += value_problems(value, (*path, str(key)))
    elif isinstance(data, list):
        for index, item in enumerate(data):
            found += value_problems(item, (*path, index))
    return found


def _text_problem(text: str) -> str | None:
    bad = next((c for c in text if (ord(c) < 32 and c not in "\t\n\r") or ord(c) == 127), None)
    if bad is not None:
        return f"contains the control character U+{ord(bad):04X}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains U+{ord(text[exc.start]):04X}, which is not a character (a lone surrogate)"
    return None


def path_problem(reference: str, bases: Sequence[Path], what: str) -> str | None:
    """Why a model or CLIP reference cannot be used (None when it can): one that reads as a path (starts with
    '.', '/' or '~', has a backslash or several '/') must exist, relative to one of `bases` or the working
    folder; hub ids (`org/name[@revision]`) are left to pre-flight, which knows the cache."""
    path = Path(reference).expanduser()
    if exists(path) or any(exists(base / reference) for base in bases):
        return None
    pathlike = reference.startswith((".", "/", "~")) or "\\" in reference or reference.count("/") > 1
    if not pathlike and _HUB_ID.fullmatch(reference) and ".." not in reference and "--" not in reference:
        return None
    where = ", ".join(str(base / reference) for base in bases) or str(path)
    return f"{what} {reference!r:.200} reads as a path, but there is nothing there (looked at {where:.300})"


def clip_model_problem(spec: str, bases: Sequence[Path]) -> str | None:
    """Why a `clip_model` / `--clip-model` cannot load (None when it may): 'tiny', 'open_clip:ARCH:FILE'
    with an existing FILE, an existing folder, or a hub id."""
    if spec == "tiny":
        return None
    if spec.startswith("open_clip:"):
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            return f"open_clip spec must be open_clip:ARCH:WEIGHTS_FILE, got {spec!r}"
        weights = Path(parts[2]).expanduser()  # read relative to the working folder, as the CLIP loader does
        return None if is_file(weights) else f"open_clip weights file {str(weights)!r:.200} not found"
    return path_problem(spec, bases, "clip_model")


def check_models(suite: Suite, base: Path, issues: list[Issue]) -> None:
    """Known presets, distinct labels, and local weights that exist."""
    labels: set[str] = set()
    for index, entry in enumerate(suite.models):
        if entry.preset not in PRESETS:
            issues.append((("models", index, "preset"), f"unknown preset {entry.preset!r}{suggest(entry.preset, PRESETS)}"))
        if entry.label in labels:
            issues.append((("models", index), f"model {entry.label!r} is listed twice; give one a `name:`"))
        labels.add(entry.label)
        for key in ("model_id", "lora_id"):
            reference = getattr(entry, key)
            problem = path_problem(reference, [base], key) if reference else None
            if problem:
                issues.append((("models", index, key), problem))
    if suite.clip_model is not None and (problem := clip_model_problem(suite.clip_model, [base])):
        issues.append((("clip_model",), problem))


def check_probes(suite: Suite, base: Path, issues: list[Issue]) -> None:
    """Distinct probe names, usable metrics, and `checks:` that gate on things the suite makes."""
    names: set[str] = set()
    labels = {m.label for m in suite.models}
    for index, probe in enumerate(suite.probes):
        if probe.name in names:
            issues.append((("probes", index, "name"), f"duplicate probe name {probe.name!r}"))
        names.add(probe.name)
        for m_index, spec in enumerate(probe.metrics):
            _check_metric(suite, probe, spec, ("probes", index, "metrics", m_index), issues, base)
    for index, check in enumerate(suite.checks):
        _check_check_metric(check.metric, ("checks", index, "metric"), issues)
        if check.probe is not None and check.probe not in names:
            issues.append((("checks", index, "probe"), f"unknown probe {check.probe!r}{suggest(check.probe, names)}"))
        if check.model is not None and check.model not in labels:
            issues.append((("checks", index, "model"), f"unknown model {check.model!r}{suggest(check.model, labels)}"))
        if check.against is not None and check.against not in labels:
            issues.append((("checks", index, "against"),
                           f"unknown model {check.against!r}{suggest(check.against, labels)}"))


def _check_check_metric(metric: str, where: FieldPath, issues: list[Issue]) -> None:
    """A rule gates on a score row some metric writes (or one of its series, 'fid[features=clip]'), or a bias gap."""
    base = metric.split("[", 1)[0]
    names = check_names()
    if base in names:
        return
    info = METRICS.get(base)
    if info is not None:  # a metric writing rows under other names (ocr): gate on one of them
        issues.append((where, f"{base} writes the rows {', '.join(info.outputs)}: gate on one of them"))
    else:
        issues.append((where, f"unknown metric {metric!r}{suggest(metric, names)}"))


def _check_metric(
    suite: Suite, probe: Probe, spec: MetricSpec, where: FieldPath, issues: list[Issue], base: Path
) -> None:
    """Known metric with arguments it takes; set metrics need a reference that exists; group_by names variables."""
    info = METRICS.get(spec.name)
    if info is None:
        issues.append((where, f"unknown metric {spec.name!r}{suggest(spec.name, METRICS)}"))
        return
    issues += [((*where, "args", *arg), message) for arg, message in arg_problems(info.params, spec.args)]
    if info.kind == "image":
        if spec.reference is not None or spec.group_by:
            issues.append((where, f"{spec.name} is a per-image metric: `reference` and `group_by` do not apply"))
        return
    if spec.reference is None:
        issues.append((where, f"{spec.name} compares sets of images: give `reference: {{model: LABEL}}` "
                              "or `reference: {folder: PATH}`"))
        return
    labels = [m.label for m in suite.models]
    if spec.reference.model is not None and spec.reference.model not in labels:
        issues.append(((*where, "reference", "model"),
                       f"unknown model {spec.reference.model!r}{suggest(spec.reference.model, labels)}"))
    if spec.reference.folder is not None and not has_image_files(base / spec.reference.folder):
        issues.append(((*where, "reference", "folder"), f"no images (png/jpg/webp) in {base / spec.reference.folder}"))
    for g_index, name in enumerate(spec.group_by):
        if name not in probe.vars:
            issues.append(((*where, "group_by", g_index), f"{name!r} is not a variable of this probe"
                                                          f"{suggest(name, probe.vars)}"))


def steps_of(suite: Suite, probe: Probe) -> list[list[int]]:
    """The steps grid of each model in this probe, as the planner uses it (model, then probe, then preset)."""
    grids = []
    for entry in suite.models:
        preset = PRESETS.get(entry.preset)
        grids.append(list(entry.steps or probe.steps or (preset.steps if preset else [1])))
    return grids


def check_grid(suite: Suite, probe: Probe, where: FieldPath, issues: list[Issue]) -> None:
    """img2img needs init images and strengths, and int(steps * strength) >= 1 for every pair."""
    if probe.kind == "img2img" and not probe.init_images:
        issues.append((where, "an img2img probe needs `init_images`"))
    if probe.init_images and not probe.strength:
        issues.append(((*where, "strength"), "`init_images` needs a `strength` list (e.g. [0.5, 1.0])"))
    if probe.strength and not probe.init_images:
        issues.append(((*where, "strength"), "`strength` applies only to img2img probes with `init_images`"))
    if not (probe.strength and probe.init_images):
        return
    for entry, steps in zip(suite.models, steps_of(suite, probe), strict=True):
        for s in steps:
            for strength in probe.strength:
                if s * strength < 1:
                    issues.append((
                        (*where, "strength"),
                        f"(steps={s}, strength={strength}) for model {entry.label!r} runs int({s}*{strength}) = "
                        f"{int(s * strength)} denoising steps; steps*strength must be >= 1",
                    ))


def job_count(suite: Suite, probe: Probe, prompt_factors: Sequence[int], n_inits: int) -> tuple[int, str]:
    """(jobs, how they multiply) for one probe, from the sizes of its grid alone, as the planner will make
    them: prompts x (model, steps) pairs x strengths x init images x seeds."""
    grids = steps_of(suite, probe)
    pairs = sum(len(g) for g in grids)
    strengths = len(probe.strength) if probe.init_images and probe.strength else 1
    seeds = len(probe.seeds or suite.seeds)
    prompts = math.prod(prompt_factors)
    total = prompts * pairs * strengths * max(n_inits, 1) * seeds
    shape = "×".join(shown(f) for f in prompt_factors) + " prompts"
    if len({len(g) for g in grids}) == 1:
        shape += f" × {_plural(len(grids), 'model')} × {_plural(len(grids[0]), 'step')}"
    else:
        shape += f" × {pairs} (model, steps) pairs"
    if probe.init_images:
        shape += f" × {_plural(strengths, 'strength')} × {_plural(n_inits, 'init image')}"
    return total, f"{shape} × {_plural(seeds, 'seed')}"


def _plural(n: int, noun: str) -> str:
    return f"{shown(n)} {noun}{'' if n == 1 else 's'}"


def job_limit_problems(counts: dict[int, tuple[str, int, str]], limit: int) -> list[Issue]:
    """Issues for a plan past `limit` jobs: each probe over it by itself, else the suite as a whole.

    `counts` maps probe index -> (probe name, jobs, how they multiply)."""
    fix = f"the limit is {shown(limit)}: raise it with --max-jobs"
    over: list[Issue] = [(("probes", i), f"probe {name} plans {shown(n)} jobs ({shape}); {fix}")
            for i, (name, n, shape) in counts.items() if n > limit]
    total = sum(n for _, n, _ in counts.values())
    if over or total <= limit:
        return over
    parts = ", ".join(f"{name} {shown(n)}" for name, n, _ in counts.values())
    return [((), f"the suite plans {shown(total)} jobs ({parts}); {fix}")]
