"""`probe check`: quality and bias gates for CI, with statistical thresholds so noise does not fail a build.

A rule names a metric and a scope (probe, model, steps) and one kind of bound:
- `min` / `max`: an absolute bound on the mean (e.g. ocr_exact >= 0.05);
- `max_drop`: how far quality may fall against the baseline, in the metric's bad direction (clip_score
  falling, cmmd rising);
- `max_increase`: how far the value may rise against the baseline (e.g. a bias gap: `reference_gap`,
  `parity_gap` and `feminine_share` are computed from perceived_gender labels per group, see check_bias.py).
Mode `significant` (the default) fails only when the 95% CI of the (paired) change, or of the mean for a
bound, lies entirely beyond the tolerance; `strict` compares point estimates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
from pydantic import ValidationError

from probe.analysis.aggregate import latest_config, per_image
from probe.analysis.stats import cluster_bootstrap
from probe.baseline import COORDINATES, Baseline
from probe.check_bias import BIAS_GAPS, bias_outcomes
from probe.errors import UsageError, suggest
from probe.metrics.catalog import direction_of
from probe.suite import Check

if TYPE_CHECKING:
    from probe.api import Run

Mode = Literal["strict", "significant"]
SCOPE = ["probe", "model", "steps", "strength"]


#: A gate is the suite's `Check` record (one schema for `checks:` and `--rule`).
Rule = Check


@dataclass
class Outcome:
    """The result of one rule on one group (probe x model x steps x strength)."""

    rule: str
    group: dict[str, Any]
    passed: bool
    estimate: float
    low: float | None
    high: float | None
    threshold: float
    n: int
    detail: str
    baseline: float | None = None


@dataclass
class Verdict:
    """All outcomes; failed when any outcome failed."""

    outcomes: list[Outcome] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outcomes)

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": "pass" if self.passed else "fail",
                "rules": [r.model_dump() | {"name": r.title} for r in self.rules],
                "outcomes": [asdict(o) for o in self.outcomes]}


def parse_rule(text: str) -> Rule:
    """'clip_score:probe=occupations,max_drop=0.5,mode=strict' -> Rule (validated like a suite's checks)."""
    metric, _, rest = text.partition(":")
    fields: dict[str, Any] = {"metric": metric.strip()}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise UsageError(f"--rule {text!r}: bad part {part!r} (expected key=value)")
        fields[key.strip()] = value.strip()
    try:
        return Rule.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        hint = suggest(where, Rule.model_fields) if error["type"] == "extra_forbidden" else ""
        message = error["msg"].removeprefix("Value error, ")
        raise UsageError(f"--rule {text!r}: {where + ': ' if where else ''}{message}{hint}") from None


def rules_from_checks(checks: Iterable[Check]) -> list[Rule]:
    """The suite's `checks:` as rules."""
    return list(checks)


def evaluate(run: Run, baseline: Baseline | None, rules: list[Rule]) -> Verdict:
    """Evaluate every rule; UsageError (exit 2) for misuse: unknown metric, no baseline, no overlap."""
    if not rules:
        raise UsageError("no rules: add `checks:` to the suite or pass --rule")
    if baseline is not None and baseline.suite_name != run.manifest["suite_name"]:
        raise UsageError(f"baseline is for suite {baseline.suite_name!r}, the run for {run.manifest['suite_name']!r}")
    images = per_image(run.jobs, run.scores)
    scores = latest_config(run.scores)
    sets = scores[scores["key"].isna()] if not scores.empty else scores
    verdict = Verdict(rules=rules)
    for rule in rules:
        if rule.metric in BIAS_GAPS:
            verdict.outcomes.extend(bias_outcomes(rule, images, run.jobs, baseline, _decide))
        else:
            verdict.outcomes.extend(_evaluate_rule(rule, images, sets, baseline))
    return verdict


def _in_scope(frame: pd.DataFrame, rule: Rule) -> pd.DataFrame:
    frame = frame[frame["metric"] == rule.metric]
    for column in ("probe", "model", "steps"):
        value = getattr(rule, column)
        if value is not None:
            frame = frame[frame[column] == value]
    return frame


def _evaluate_rule(rule: Rule, images: pd.DataFrame, sets: pd.DataFrame, baseline: Baseline | None) -> list[Outcome]:
    kind, _ = rule.bound
    mine = _in_scope(images, rule)
    mine_sets = _in_scope(sets, rule) if not sets.empty else sets
    if mine.empty and mine_sets.empty:
        known = sorted(set(images["metric"]) | set(sets["metric"] if not sets.empty else []))
        raise UsageError(f"rule {rule.title}: the run has no {rule.metric!r} scores in that scope"
                         f"{suggest(rule.metric, known)}")
    if kind in ("max_drop", "max_increase") and baseline is None:
        raise UsageError(f"rule {rule.title} compares with a baseline: pass --baseline FILE_OR_RUN_DIR")
    if not mine.empty:
        return _per_image_outcomes(rule, mine, baseline)
    return _set_outcomes(rule, mine_sets, baseline)


def _groups(frame: pd.DataFrame) -> Iterable[tuple[dict[str, Any], pd.DataFrame]]:
    for coords, group in frame.groupby(SCOPE, dropna=False, sort=True):
        group_coords = {k: (None if pd.isna(v) else v) for k, v in zip(SCOPE, coords, strict=True)}
        if group_coords["steps"] is not None:
            group_coords["steps"] = int(group_coords["steps"])
        yield group_coords, group


def _per_image_outcomes(rule: Rule, mine: pd.DataFrame, baseline: Baseline | None) -> list[Outcome]:
    kind, tol = rule.bound
    outcomes = []
    if kind in ("min", "max"):
        for group, rows in _groups(mine[mine["value"].notna()]):
            est = cluster_bootstrap(rows["value"].to_numpy(), rows["prompt"].to_numpy())
            outcomes.append(_decide(rule, group, est.mean, est.low, est.high, est.n, None))
        return outcomes
    assert baseline is not None
    theirs = _in_scope(baseline.per_image, rule)
    pairs = mine.merge(theirs[[*COORDINATES, "metric", "value"]], on=[*COORDINATES, "metric"], suffixes=("", "_base"))
    pairs = pairs[pairs["value"].notna() & pairs["value_base"].notna()]
    if pairs.empty:
        raise UsageError(f"rule {rule.title}: no image pairs between the run and the baseline "
                         "(same probe, model, prompt, seed, steps, strength)")
    sign = _sign(rule)
    for group, rows in _groups(pairs):
        change = sign * (rows["value"] - rows["value_base"]).to_numpy()
        est = cluster_bootstrap(change, rows["prompt"].to_numpy())
        outcomes.append(_decide(rule, group, est.mean, est.low, est.high, est.n, float(rows["value_base"].mean())))
    return outcomes


def _sign(rule: Rule) -> float:
    """+1 when the checked change is value - baseline, -1 when a drop of a higher-is-better metric is checked."""
    kind, _ = rule.bound
    if kind == "max_increase":
        return 1.0
    return -1.0 if direction_of(rule.metric) != "lower" else 1.0


def _set_outcomes(rule: Rule, mine: pd.DataFrame, baseline: Baseline | None) -> list[Outcome]:
    """One outcome per set row (probe x model x steps x strength x group), matched to the same baseline row."""
    kind, _ = rule.bound
    outcomes = []
    for _, row in mine.iterrows():
        group = {k: (None if pd.isna(row[k]) else row[k]) for k in SCOPE}
        group["steps"] = None if group["steps"] is None else int(group["steps"])
        if isinstance(row.get("group"), str) and row["group"]:
            group.update(json.loads(row["group"]))
        low = None if pd.isna(row["low"]) else float(row["low"])
        high = None if pd.isna(row["high"]) else float(row["high"])
        value = float("nan") if pd.isna(row["value"]) else float(row["value"])
        if kind in ("min", "max"):
            outcomes.append(_decide(rule, group, value, low, high, 1, None))
            continue
        assert baseline is not None
        match = _same_set(baseline.sets, row)
        if match.empty:
            continue
        base = float(match["value"].iloc[0])
        sign = _sign(rule)
        bounds = sorted(sign * (b - base) for b in (low, high) if b is not None)
        outcomes.append(_decide(rule, group, sign * (value - base), bounds[0] if bounds else None,
                                bounds[-1] if bounds else None, 1, base))
    if not outcomes:
        raise UsageError(f"rule {rule.title}: no matching set-metric groups between the run and the baseline")
    return outcomes


def _same_set(sets: pd.DataFrame, row: pd.Series) -> pd.DataFrame:
    """Baseline rows with the same metric, probe, model, steps, strength and group (missing equals missing)."""
    mask = pd.Series(True, index=sets.index)
    for column in ("metric", "probe", "model", "steps", "strength", "group"):
        value = row.get(column)
        empty = value is None or (not isinstance(value, str) and pd.isna(value)) or value == ""
        column_empty = sets[column].isna() | (sets[column] == "")
        mask &= column_empty if empty else (sets[column] == value)
    return sets[mask]


def _decide(rule: Rule, group: dict[str, Any], estimate: float, low: float | None, high: float | None, n: int,
            base: float | None) -> Outcome:
    """Pass or fail one group; in significant mode the whole CI must lie beyond the tolerance to fail."""
    kind, tol = rule.bound
    if estimate is None or math.isnan(estimate):  # nothing to judge (e.g. a set too small): never a silent pass
        return Outcome(rule=rule.title, group=group, passed=False, estimate=float("nan"), low=None, high=None,
                       threshold=tol, n=n, detail="no value to check (metric missing for this group)", baseline=base)
    has_ci = low is not None and high is not None and not (math.isnan(low) or math.isnan(high))
    significant = rule.mode == "significant" and has_ci
    if kind == "min":
        failed = (high < tol) if significant else (estimate < tol)  # type: ignore[operator]
    else:  # max, max_drop, max_increase: the checked quantity must not exceed tol
        failed = (low > tol) if significant else (estimate > tol)  # type: ignore[operator]
    what = {"min": "mean", "max": "mean", "max_drop": "drop", "max_increase": "increase"}[kind]
    ci = f" [{low:.4g}, {high:.4g}]" if has_ci else ""
    mode = "CI" if significant else "point estimate"
    detail = f"{what} {estimate:.4g}{ci} vs {kind} {tol:g} ({mode}, n={n})"
    return Outcome(rule=rule.title, group=group, passed=not failed, estimate=float(estimate),
                   low=None if not has_ci else float(low), high=None if not has_ci else float(high),  # type: ignore[arg-type]
                   threshold=tol, n=n, detail=detail, baseline=base)
