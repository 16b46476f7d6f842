"""Load a suite file: safe YAML -> pydantic schema -> semantic checks -> resolved prompts and images.

Every problem is collected (not just the first) and reported as `file:line: field.path: message`, before
any work starts. Nothing here imports torch.

The order is what keeps hostile files cheap: the YAML is bounded while it is composed (probe.spec.yaml_source),
the job count is computed from the grid's sizes before a single prompt is expanded or image decoded, and
only a suite within the job limit (probe.spec.limits) is expanded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from probe.errors import UsageError, suggest
from probe.spec import checks, limits
from probe.spec.images import InitImage, image_files, match_init_images, read_init_images
from probe.spec.limits import EntryBudget
from probe.spec.prompts import PromptItem, PromptPlan, check_duplicates, plan_prompts
from probe.spec.schema import ALL_FIELD_NAMES, Suite
from probe.spec.yaml_source import FieldPath, YamlProblem, format_path, line_of, load_yaml

__all__ = ["InitImage", "LoadedSuite", "PromptItem", "SuiteError", "image_files", "load_suite"]

Issue = tuple[FieldPath, str]
Lines = dict[FieldPath, int]


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
class LoadedSuite:
    """A validated suite with everything read from disk that the planner needs."""

    suite: Suite
    path: Path
    prompts: dict[str, list[PromptItem]]
    init_images: dict[str, list[InitImage]]

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def load_suite(path: str | Path, *, max_jobs: int | None = None) -> LoadedSuite:
    """Read and validate a suite file; raise SuiteError listing every problem with its line.

    Args:
        max_jobs: most jobs the suite may plan (default: the limit in force, see probe.spec.limits).
    """
    path = Path(path)
    limit = max_jobs if max_jobs is not None else limits.max_jobs()
    if not limits.is_file(path):
        raise UsageError(f"{path}: suite file not found")
    try:
        data, lines = load_yaml(path)
    except YamlProblem as exc:
        raise SuiteError(path, [(exc.line, exc.path, exc.message)]) from None
    if not isinstance(data, dict):
        raise SuiteError(path, [(1, (), "a suite must be a YAML mapping with `name`, `models` and `probes`")])
    _raise_if(path, lines, checks.value_problems(data))
    try:
        suite = Suite.model_validate(data, context={"max_jobs": limit})
    except ValidationError as exc:
        found = _pydantic_issues(exc, data) or [((), str(exc))]
        raise SuiteError(path, [(line_of(lines, p), p, m) for p, m in found]) from None
    issues: list[Issue] = []
    checks.check_models(suite, path.parent, issues)
    checks.check_probes(suite, path.parent, issues)
    plans, matches = _size_up(suite, path.parent, issues)
    counts = {i: (probe.name, *checks.job_count(suite, probe, plans[i].factors, sum(map(len, matches[i]))))
              for i, probe in enumerate(suite.probes)}
    if over := checks.job_limit_problems(counts, limit):
        _raise_if(path, lines, issues + over)  # before anything is expanded
    prompts: dict[str, list[PromptItem]] = {}
    images: dict[str, list[InitImage]] = {}
    for index, probe in enumerate(suite.probes):
        where: FieldPath = ("probes", index)
        prompts[probe.name] = plans[index].expand()
        check_duplicates(prompts[probe.name], (*where, "prompts" if probe.prompts is not None else "vars"), issues)
        images[probe.name] = read_init_images(matches[index], path.parent, where, issues)
    _raise_if(path, lines, issues)
    return LoadedSuite(suite=suite, path=path, prompts=prompts, init_images=images)


def _size_up(suite: Suite, base: Path, issues: list[Issue]) -> tuple[list[PromptPlan], list[list[list[Path]]]]:
    """Each probe's prompt plan and init-image matches (what the job count needs, with nothing expanded),
    and the checks of its grid."""
    budget = EntryBudget()
    plans, matches = [], []
    for index, probe in enumerate(suite.probes):
        plans.append(plan_prompts(probe, base, ("probes", index), issues))
        matches.append(match_init_images(probe.init_images or [], base, ("probes", index), issues, budget))
        checks.check_grid(suite, probe, ("probes", index), issues)
    return plans, matches


def _raise_if(path: Path, lines: Lines, issues: list[Issue]) -> None:
    if issues:
        raise SuiteError(path, [(line_of(lines, p), p, m) for p, m in issues])


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
            if err["type"].endswith(("_type", "_parsing")) and isinstance(err.get("input"), str | int | float | bool):
                message += f", not {err['input']!r:.60}"  # "Input should be a valid integer, not True"
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
