"""Load a suite file: safe YAML -> pydantic schema -> semantic checks -> resolved prompts and images.

Every problem is collected (not just the first) and reported as `file:line: field.path: message`, before
any work starts. Nothing here imports torch.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import itertools
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from probe.errors import ProbeError, UsageError, suggest
from probe.spec.datasets import DATASETS, dataset_path
from probe.spec.metric_catalog import METRICS, check_names
from probe.spec.presets import PRESETS
from probe.spec.schema import ALL_FIELD_NAMES, MetricSpec, Probe, PromptFile, Suite, VarFile
from probe.spec.yaml_source import FieldPath, YamlProblem, format_path, line_of, load_yaml

Issue = tuple[FieldPath, str]


class SuiteError(UsageError):
    """A suite that cannot be run, with every problem found and where it is."""

    def __init__(self, file: Path, problems: list[tuple[int | None, FieldPath, str]]) -> None:
        self.file = file
        problems = sorted(dict.fromkeys(problems), key=lambda p: (p[0] is None, p[0] or 0))
        self.problems = problems
        lines = [
            f"{file}:{line or '?'}: {format_path(path)}: {message}" if path else f"{file}:{line or '?'}: {message}"
            for line, path, message in problems
        ]
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{file}: {len(problems)} {noun} in the suite; nothing was run.\n" + "\n".join(lines))


@dataclass(frozen=True)
class PromptItem:
    """One expanded prompt of a probe, with the variables and attributes that made it."""

    prompt: str
    variables: dict[str, str] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    text: str | None = None


@dataclass(frozen=True)
class InitImage:
    """An img2img init image: the path as matched (relative to the suite) and its content hash."""

    path: str
    absolute: Path
    sha256: str


@dataclass(frozen=True)
class LoadedSuite:
    """A validated suite with everything read from disk that the planner needs."""

    suite: Suite
    path: Path
    prompts: dict[str, list[PromptItem]]
    init_images: dict[str, list[InitImage]]

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def load_suite(path: str | Path) -> LoadedSuite:
    """Read and validate a suite file; raise SuiteError listing every problem with its line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: suite file not found")
    try:
        data, lines = load_yaml(path)
    except YamlProblem as exc:
        raise SuiteError(path, [(exc.line, exc.path, exc.message)]) from None
    if not isinstance(data, dict):
        raise SuiteError(path, [(1, (), "a suite must be a YAML mapping with `name`, `models` and `probes`")])
    try:
        suite = Suite.model_validate(data)
    except ValidationError as exc:
        found = _pydantic_issues(exc, data)
        raise SuiteError(path, [(line_of(lines, p), p, m) for p, m in found]) from None
    issues: list[Issue] = []
    prompts: dict[str, list[PromptItem]] = {}
    images: dict[str, list[InitImage]] = {}
    _check_models(suite, issues)
    _check_probes(suite, issues, path.parent)
    for index, probe in enumerate(suite.probes):
        where: FieldPath = ("probes", index)
        prompts[probe.name] = _expand_prompts(probe, path.parent, where, issues)
        _check_duplicates(prompts[probe.name], (*where, "prompts" if probe.prompts is not None else "vars"), issues)
        images[probe.name] = _match_init_images(probe, path.parent, where, issues)
        _check_grid(suite, probe, where, issues)
    if issues:
        raise SuiteError(path, [(line_of(lines, p), p, m) for p, m in issues])
    return LoadedSuite(suite=suite, path=path, prompts=prompts, init_images=images)


def _pydantic_issues(exc: ValidationError, data: Any) -> list[Issue]:
    """Turn pydantic errors into (data path, message), dropping union-branch noise from the paths."""
    found: list[Issue] = []
    for err in exc.errors():
        path = _data_path(err["loc"], data)
        if err["type"] == "extra_forbidden":
            key = str(path[-1])
            message = f"unknown key {key!r}{suggest(key, ALL_FIELD_NAMES)}"
        elif err["type"] == "missing":
            message = f"missing required key {err['loc'][-1]!r}"
        else:
            message = err["msg"].removeprefix("Value error, ")
        found.append((path, message))
    # A union reports one error per branch; keep the most specific (deepest) ones for each item.
    deepest = [p for p, _ in found]
    kept = [(p, m) for p, m in found if not any(len(q) > len(p) and q[: len(p)] == p for q in deepest)]
    return list(dict.fromkeys(kept))


def _data_path(loc: tuple[Any, ...], data: Any) -> FieldPath:
    """Follow a pydantic `loc` through the raw data, skipping parts that name union branches."""
    path: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
            path.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            path.append(part)
        elif isinstance(node, dict) and isinstance(part, str) and part not in node and part.isidentifier():
            path.append(part)  # a missing or unknown key: name it, stop descending
            node = None
    return tuple(path)


def _check_models(suite: Suite, issues: list[Issue]) -> None:
    labels: set[str] = set()
    for index, entry in enumerate(suite.models):
        if entry.preset not in PRESETS:
            issues.append((("models", index, "preset"), f"unknown preset {entry.preset!r}{suggest(entry.preset, PRESETS)}"))
        if entry.label in labels:
            issues.append((("models", index), f"model {entry.label!r} is listed twice; give one a `name:`"))
        labels.add(entry.label)


def _check_probes(suite: Suite, issues: list[Issue], base: Path) -> None:
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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted (empty when it is not a folder)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _check_metric(
    suite: Suite, probe: Probe, spec: MetricSpec, where: FieldPath, issues: list[Issue], base: Path
) -> None:
    """Known metric; set metrics need a reference that exists; group_by names real variables."""
    info = METRICS.get(spec.name)
    if info is None:
        issues.append((where, f"unknown metric {spec.name!r}{suggest(spec.name, METRICS)}"))
        return
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
    if spec.reference.folder is not None and not image_files(base / spec.reference.folder):
        issues.append(((*where, "reference", "folder"), f"no images (png/jpg/webp) in {base / spec.reference.folder}"))
    for g_index, name in enumerate(spec.group_by):
        if name not in probe.vars:
            issues.append(((*where, "group_by", g_index), f"{name!r} is not a variable of this probe"
                                                          f"{suggest(name, probe.vars)}"))


def _template_fields(template: str) -> list[str]:
    """Variable names used in a template, in order; only plain `{name}` fields are allowed."""
    names: list[str] = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"template field {{{name}}} must be a plain {{variable}} name")
        if name not in names:
            names.append(name)
    return names


def _expand_prompts(probe: Probe, base: Path, where: FieldPath, issues: list[Issue]) -> list[PromptItem]:
    """Expand a probe's template (cartesian product of its variables) or read its prompt list."""
    if probe.prompts is not None:
        if isinstance(probe.prompts, PromptFile):
            return _prompts_from_file(probe.prompts, base, (*where, "prompts"), issues)
        return [PromptItem(prompt=p.prompt, attrs={**probe.attrs, **p.attrs}, text=p.text) for p in probe.prompts]
    assert probe.template is not None
    try:
        names = _template_fields(probe.template)
    except ValueError as exc:
        issues.append(((*where, "template"), str(exc)))
        return []
    for name in names:
        if name not in probe.vars:
            hint = suggest(name, probe.vars)
            issues.append(((*where, "template"), f"template uses {{{name}}} but `vars` has no {name!r}{hint}"))
    values: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name, spec in probe.vars.items():
        vpath = (*where, "vars", name)
        if name not in names:
            issues.append((vpath, f"variable {name!r} is not used in the template"))
        before = len(issues)
        rows = _var_values(spec, base, vpath, issues)
        if not rows and len(issues) == before:
            issues.append((vpath, f"variable {name!r} has no values"))
        values[name] = rows
    if any(n not in values or not values[n] for n in names):
        return []
    items = []
    for combo in itertools.product(*(values[n] for n in names)):
        variables = {n: v for n, (v, _) in zip(names, combo, strict=True)}
        attrs = dict(probe.attrs)
        for _, extra in combo:
            attrs.update(extra)
        items.append(PromptItem(prompt=probe.template.format_map(variables), variables=variables, attrs=attrs))
    return items


def _check_duplicates(items: list[PromptItem], where: FieldPath, issues: list[Issue]) -> None:
    """The same prompt twice in one probe would double its weight in every mean and multiply paired rows."""
    seen: set[tuple[object, ...]] = set()
    for item in items:
        identity = (item.prompt, item.text, tuple(sorted(item.variables.items())))
        if identity in seen:
            issues.append((where, f"prompt {item.prompt!r} appears more than once in this probe"))
            return
        seen.add(identity)


def _var_values(spec: Any, base: Path, vpath: FieldPath, issues: list[Issue]) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(spec, VarFile):
        rows = _read_table(base / spec.file, [spec.column, *spec.attrs], vpath, issues)
        return [(r[spec.column], {a: r[a] for a in spec.attrs}) for r in rows if r[spec.column]]
    return [(v.value, dict(v.attrs)) for v in spec]


def _prompts_from_file(spec: PromptFile, base: Path, ppath: FieldPath, issues: list[Issue]) -> list[PromptItem]:
    columns = [spec.column, *spec.attrs, *spec.where, *([spec.text_column] if spec.text_column else [])]
    if spec.dataset is not None:
        if spec.dataset not in DATASETS:
            issues.append(((*ppath, "dataset"), f"unknown dataset {spec.dataset!r}{suggest(spec.dataset, DATASETS)}"))
            return []
        try:  # a pulled copy, else the shipped one (sha256-checked); a broken install is an issue, not a crash
            file = dataset_path(spec.dataset)
        except ProbeError as exc:
            issues.append(((*ppath, "dataset"), str(exc)))
            return []
    else:
        file = base / str(spec.file)
    rows = _read_table(file, columns, ppath, issues)
    rows = [r for r in rows if all(r[c] in allowed for c, allowed in spec.where.items())]
    if not rows and not issues:
        issues.append((ppath, f"no prompts left in {file.name} after `where`"))
    text = spec.text_column
    return [PromptItem(prompt=r[spec.column], attrs={a: r[a] for a in spec.attrs}, text=r[text] if text else None)
            for r in rows]


def _read_table(file: Path, columns: list[str], where: FieldPath, issues: list[Issue]) -> list[dict[str, str]]:
    """Rows of a TSV (.tsv) or CSV file as dicts; missing file or columns become issues."""
    if not file.is_file():
        issues.append(((*where, "file"), f"file not found: {file}"))
        return []
    with file.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if file.suffix.lower() == ".tsv" else ",")
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            issues.append((where, f"{file.name} has no column {missing[0]!r}{suggest(missing[0], header)}"))
            return []
        return [{c: (row.get(c) or "").strip() for c in header} for row in reader]


def _match_init_images(probe: Probe, base: Path, where: FieldPath, issues: list[Issue]) -> list[InitImage]:
    """Expand init image globs (relative to the suite file); each pattern must match a file."""
    found: list[InitImage] = []
    for index, pattern in enumerate(probe.init_images or []):
        matches = sorted(p for p in glob.glob(str(base / pattern), recursive=True) if Path(p).is_file())
        if not matches:
            issues.append(((*where, "init_images", index), f"{pattern!r} matches no file (relative to {base})"))
        for match in matches:
            absolute = Path(match)
            digest = hashlib.sha256(absolute.read_bytes()).hexdigest()
            shown = Path(os.path.relpath(absolute, base)).as_posix() if absolute.is_relative_to(base) else str(absolute)
            found.append(InitImage(path=shown, absolute=absolute, sha256=digest))
    return found


def _check_grid(suite: Suite, probe: Probe, where: FieldPath, issues: list[Issue]) -> None:
    """img2img needs init images and strengths, and int(steps * strength) >= 1 for every pair."""
    if probe.kind == "img2img" and not probe.init_images:
        issues.append((where, "an img2img probe needs `init_images`"))
    if probe.init_images and not probe.strength:
        issues.append(((*where, "strength"), "`init_images` needs a `strength` list (e.g. [0.5, 1.0])"))
    if probe.strength and not probe.init_images:
        issues.append(((*where, "strength"), "`strength` applies only to img2img probes with `init_images`"))
    if not (probe.strength and probe.init_images):
        return
    for entry in suite.models:
        preset = PRESETS.get(entry.preset)
        steps = entry.steps or probe.steps or (list(preset.steps) if preset else [])
        for s in steps:
            for strength in probe.strength:
                if s * strength < 1:
                    issues.append((
                        (*where, "strength"),
                        f"(steps={s}, strength={strength}) for model {entry.label!r} runs int({s}*{strength}) = "
                        f"{int(s * strength)} denoising steps; steps*strength must be >= 1",
                    ))
