"""A probe's prompts: a template over variables (their cartesian product), a list, or rows of a table.

Planning and expanding are separate steps. `plan_prompts` reads what the probe names (tables included)
and knows how many prompts there will be and how long the longest can get, without making any: a template
with 4 variables of 300 values is 8.1e9 prompts, and the loader refuses it from that count (see
probe.spec.limits) before `PromptPlan.expand` would try to build it.
"""

from __future__ import annotations

import csv
import itertools
import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probe.errors import ProbeError, suggest
from probe.spec.datasets import DATASETS, dataset_path
from probe.spec.limits import MAX_PROMPT_CHARS, MAX_TABLE_BYTES, is_file, shown
from probe.spec.schema import Probe, PromptFile, VarFile
from probe.spec.yaml_source import FieldPath

Issue = tuple[FieldPath, str]
Values = list[tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class PromptItem:
    """One expanded prompt of a probe, with the variables and attributes that made it."""

    prompt: str
    variables: dict[str, str] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    text: str | None = None


@dataclass(frozen=True)
class PromptPlan:
    """A probe's prompts before expansion: a template with its variables' values, or the listed items."""

    factors: tuple[int, ...]
    """Values per template variable in template order, or (number of listed prompts,)."""
    template: str | None = None
    values: dict[str, Values] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    listed: tuple[PromptItem, ...] = ()

    @property
    def count(self) -> int:
        """How many prompts `expand` makes (computed, never by making them)."""
        return math.prod(self.factors)

    def expand(self) -> list[PromptItem]:
        """Every prompt; call only after `count` was checked against the job limit."""
        if self.template is None:
            return list(self.listed)
        names = list(self.values)
        items = []
        for combo in itertools.product(*(self.values[n] for n in names)):
            variables = {n: v for n, (v, _) in zip(names, combo, strict=True)}
            attrs = dict(self.attrs)
            for _, extra in combo:
                attrs.update(extra)
            items.append(PromptItem(prompt=self.template.format_map(variables), variables=variables, attrs=attrs))
        return items


EMPTY = PromptPlan(factors=(0,))


def template_fields(template: str) -> list[str]:
    """Variable names a template uses, once each per use, in order; only plain `{name}` fields are allowed."""
    names: list[str] = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"template field {{{name}}} must be a plain {{variable}} name")
        names.append(name)
    return names


def plan_prompts(probe: Probe, base: Path, where: FieldPath, issues: list[Issue]) -> PromptPlan:
    """Read a probe's prompt source (files included) into a plan; problems become issues."""
    if probe.prompts is not None:
        if isinstance(probe.prompts, PromptFile):
            listed = _prompts_from_file(probe.prompts, base, (*where, "prompts"), issues)
        else:
            listed = [PromptItem(prompt=p.prompt, attrs={**probe.attrs, **p.attrs}, text=p.text) for p in probe.prompts]
        return PromptPlan(factors=(len(listed),), listed=tuple(listed))
    assert probe.template is not None
    try:
        uses = template_fields(probe.template)
    except ValueError as exc:
        issues.append(((*where, "template"), str(exc)))
        return EMPTY
    names = list(dict.fromkeys(uses))
    for name in names:
        if name not in probe.vars:
            hint = suggest(name, probe.vars)
            issues.append(((*where, "template"), f"template uses {{{name}}} but `vars` has no {name!r}{hint}"))
    values: dict[str, Values] = {}
    for name, spec in probe.vars.items():
        vpath = (*where, "vars", name)
        if name not in names:
            issues.append((vpath, f"variable {name!r} is not used in the template"))
        before = len(issues)
        rows = _var_values(spec, base, vpath, issues)
        if not rows and len(issues) == before:
            issues.append((vpath, f"variable {name!r} has no values"))
        values[name] = rows
    if any(not values.get(n) for n in names):
        return EMPTY
    used = {n: values[n] for n in names}
    _check_template_length(probe.template, uses, used, (*where, "template"), issues)
    return PromptPlan(factors=tuple(len(v) for v in used.values()), template=probe.template, values=used,
                      attrs=dict(probe.attrs))


def _check_template_length(template: str, uses: list[str], values: dict[str, Values], where: FieldPath,
                           issues: list[Issue]) -> None:
    """The longest prompt a template can make, from its literal text and each variable's longest value."""
    literal = sum(len(text) for text, *_ in string.Formatter().parse(template))
    longest = literal + sum(max(len(v) for v, _ in values[name]) for name in uses)
    if longest > MAX_PROMPT_CHARS:
        issues.append((where, f"the template makes prompts of up to {shown(longest)} characters; the limit is "
                              f"{shown(MAX_PROMPT_CHARS)}"))


def check_duplicates(items: list[PromptItem], where: FieldPath, issues: list[Issue]) -> None:
    """The same prompt twice in one probe would double its weight in every mean and multiply paired rows."""
    seen: set[tuple[object, ...]] = set()
    for item in items:
        identity = (item.prompt, item.text, tuple(sorted(item.variables.items())))
        if identity in seen:
            issues.append((where, f"prompt {item.prompt!r:.200} appears more than once in this probe"))
            return
        seen.add(identity)


def _var_values(spec: Any, base: Path, vpath: FieldPath, issues: list[Issue]) -> Values:
    if isinstance(spec, VarFile):
        rows = _read_table(base / spec.file, [spec.column, *spec.attrs], vpath, issues)
        if not _texts_ok(rows, spec.column, base / spec.file, vpath, issues):
            return []
        return [(r[spec.column], {a: r[a] for a in spec.attrs}) for r in rows]
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
    before = len(issues)
    rows = _read_table(file, columns, ppath, issues)
    rows = [r for r in rows if all(r[c] in allowed for c, allowed in spec.where.items())]
    if not rows and len(issues) == before:
        issues.append((ppath, f"no prompts left in {file.name} after `where`"))
    text = spec.text_column
    if not _texts_ok(rows, spec.column, file, ppath, issues) or (text and not _texts_ok(rows, text, file, ppath, issues)):
        return []
    return [PromptItem(prompt=r[spec.column], attrs={a: r[a] for a in spec.attrs}, text=r[text] if text else None)
            for r in rows]


def _texts_ok(rows: list[dict[str, str]], column: str, file: Path, where: FieldPath, issues: list[Issue]) -> bool:
    """Prompts, values and target texts read from a table follow the rules of inline ones: not blank, not huge.

    A blank cell used to be dropped without a word (a value silently missing from the product) or, for a
    prompt, to become an empty prompt."""
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        value = row[column]
        if not value or len(value) > MAX_PROMPT_CHARS:
            what = "is empty" if not value else f"has {shown(len(value))} characters (the limit is {MAX_PROMPT_CHARS:,})"
            issues.append((where, f"{file.name} row {number}: {column!r} {what}"))
            return False
    return True


def _read_table(file: Path, columns: list[str], where: FieldPath, issues: list[Issue]) -> list[dict[str, str]]:
    """Rows of a TSV (.tsv) or CSV file as dicts; a missing, huge, undecodable or malformed file, or missing
    columns, become issues."""
    if not is_file(file):
        issues.append(((*where, "file"), f"file not found: {str(file):.300}"))
        return []
    if file.stat().st_size > MAX_TABLE_BYTES:
        issues.append(((*where, "file"), f"{file.name} is larger than {shown(MAX_TABLE_BYTES)} bytes"))
        return []
    try:
        with file.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if file.suffix.lower() == ".tsv" else ",")
            header = reader.fieldnames or []
            missing = [c for c in columns if c not in header]
            if missing:
                issues.append((where, f"{file.name} has no column {missing[0]!r}{suggest(missing[0], header)}"))
                return []
            return [{c: (row.get(c) or "").strip() for c in header} for row in reader]
    except (UnicodeDecodeError, csv.Error, OSError) as exc:
        issues.append(((*where, "file"), f"cannot read {file.name}: {exc}"))
        return []
