"""Gate records and the decision for one group: a rule (the suite's `Check`), its outcome and the verdict.

Each group gets pass, fail or inconclusive. Inconclusive means there was nothing to judge (no values, every
label unknown / no_person, no baseline pair) or, in significant mode, no CI to judge by; it fails the gate
unless the verdict allows it, because a gate that cannot see must not say "pass".
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import ValidationError, model_validator

from probe.errors import UsageError, suggest
from probe.spec.metric_catalog import direction_of
from probe.spec.schema import BOUND_KINDS, Check

Mode = Literal["strict", "significant"]


Status = Literal["pass", "fail", "inconclusive"]


BOUNDS = BOUND_KINDS


class Rule(Check):
    """A gate: the suite's `Check` record (one schema for `checks:` and `--rule`) with a finite threshold.

    Every comparison with NaN is false, so a NaN threshold could never fail a group, and an infinite one
    always passes or always fails: neither gates anything. Both sources of rules (a suite's `checks:` and
    `--rule`) become a Rule here, so neither can bring one in.
    """

    @model_validator(mode="after")
    def _finite_threshold(self) -> Rule:
        for kind in BOUNDS:
            value = getattr(self, kind)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{kind} must be a finite number, not {value}")
        return self


@dataclass
class Outcome:
    """The result of one rule on one group (probe x model x steps x strength [x series])."""

    rule: str
    group: dict[str, Any]
    status: Status
    estimate: float
    low: float | None
    high: float | None
    threshold: float
    n: int
    detail: str
    baseline: float | None = None

    @property
    def passed(self) -> bool:
        return self.status == "pass"


@dataclass
class Verdict:
    """All outcomes; passed when every outcome passed (inconclusive ones too, if allowed) and there is one."""

    outcomes: list[Outcome] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    allow_inconclusive: bool = False
    warnings: list[str] = field(default_factory=list)
    """What the verdict was allowed to overlook, e.g. an incomplete run gated with --allow-incomplete."""

    def ok(self, outcome: Outcome) -> bool:
        """Whether this outcome lets the gate pass."""
        return outcome.passed or (outcome.status == "inconclusive" and self.allow_inconclusive)

    @property
    def passed(self) -> bool:
        return bool(self.outcomes) and all(self.ok(o) for o in self.outcomes)

    @property
    def inconclusive(self) -> int:
        return sum(o.status == "inconclusive" for o in self.outcomes)

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": "pass" if self.passed else "fail", "allow_inconclusive": self.allow_inconclusive,
                "warnings": list(self.warnings), "rules": [r.model_dump() | {"name": r.title} for r in self.rules],
                "outcomes": [asdict(o) for o in self.outcomes]}


def parse_rule(text: str) -> Rule:
    """'clip_score:probe=occupations,max_drop=0.5,mode=strict' -> Rule (validated like a suite's checks).

    The metric may be a series with brackets: 'kid[features=clip,subset_size=50]:max_increase=0.01'.
    """
    closing = text.find("]")
    split_at = text.find(":", closing if closing >= 0 else 0)
    metric, rest = (text, "") if split_at < 0 else (text[:split_at], text[split_at + 1:])
    fields: dict[str, Any] = {"metric": metric.strip()}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise UsageError(f"--rule {text!r}: bad part {part!r} (expected key=value)")
        fields[key.strip()] = _typed(key.strip(), value.strip())
    return _validated(fields, f"--rule {text!r}")


def _typed(key: str, value: str) -> Any:
    """A --rule value as the suite's YAML would give it: a number for a bound ('nan' too, which the Rule then
    refuses by name), a whole number for steps, text otherwise (a bad one fails validation, naming the field)."""
    if key in BOUNDS:
        try:
            return float(value)
        except ValueError:
            return value
    if key in ("steps", "against_steps") and value.isascii() and value.isdigit():
        return int(value)
    return value


def _validated(fields: Any, where: str) -> Rule:
    """A Rule from a mapping (or a Check); a UsageError naming `where`, the field and the problem otherwise."""
    try:
        return Rule.model_validate(fields.model_dump() if isinstance(fields, Check) else fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        field_name = ".".join(str(p) for p in error["loc"])
        hint = suggest(field_name, Rule.model_fields) if error["type"] == "extra_forbidden" else ""
        message = error["msg"].removeprefix("Value error, ")
        raise UsageError(f"{where}: {field_name + ': ' if field_name else ''}{message}{hint}") from None


def rules_from_checks(checks: Iterable[Check | dict[str, Any]], where: str = "checks") -> list[Rule]:
    """The suite's `checks:` (records, or their dicts as a manifest holds them) as validated rules.

    Raises:
        UsageError: a check that is no valid rule, e.g. a NaN or infinite threshold; the message names
            `where[index]`.
    """
    return [check if isinstance(check, Rule) else _validated(check, f"{where}[{index}]")
            for index, check in enumerate(checks)]


def nothing(rule: Rule, group: dict[str, Any], why: str, estimate: float = float("nan"), n: int = 0,
             base: float | None = None) -> Outcome:
    """An inconclusive outcome: the rule had nothing to judge in this group (or no CI to judge it by)."""
    _, tol = rule.bound
    return Outcome(rule=rule.title, group=group, status="inconclusive", estimate=estimate, low=None, high=None,
                   threshold=tol, n=n, detail=f"inconclusive: {why}", baseline=base)


def decide(rule: Rule, group: dict[str, Any], estimate: float, low: float | None, high: float | None, n: int,
            base: float | None) -> Outcome:
    """Pass, fail or inconclusive for one group; in significant mode the whole CI must lie beyond the tolerance."""
    kind, tol = rule.bound
    if not math.isfinite(tol):  # a Rule cannot hold one; a bare Check could
        raise UsageError(f"rule {rule.title}: {kind} must be a finite number, not {tol}")
    if estimate is None or math.isnan(estimate):
        return nothing(rule, group, "no value to check (no scores, or every label unknown / no_person)")
    has_ci = low is not None and high is not None and not (math.isnan(low) or math.isnan(high))
    if rule.mode == "significant" and not has_ci:
        return nothing(rule, group, f"estimate {estimate:.4g} has no CI (fewer than 2 prompts or groups?); "
                                     "use mode: strict to judge the point estimate", float(estimate), n, base)
    significant = rule.mode == "significant"
    if kind in ("min", "min_win_rate"):
        failed = (high < tol) if significant else (estimate < tol)  # type: ignore[operator]
    else:  # max, max_drop, max_increase: the checked quantity must not exceed tol
        failed = (low > tol) if significant else (estimate > tol)  # type: ignore[operator]
    what = {"min": "mean", "max": "mean", "max_drop": "drop", "max_increase": "increase",
            "min_win_rate": "win rate"}[kind]
    ci = f" [{low:.4g}, {high:.4g}]" if has_ci else ""
    mode = "CI" if significant else "point estimate"
    detail = f"{what} {estimate:.4g}{ci} vs {kind} {tol:g} ({mode}, n={n})"
    return Outcome(rule=rule.title, group=group, status="fail" if failed else "pass", estimate=float(estimate),
                   low=None if not has_ci else float(low), high=None if not has_ci else float(high),  # type: ignore[arg-type]
                   threshold=tol, n=n, detail=detail, baseline=base)


def sign_of(rule: Rule, metric: str) -> float:
    """+1 when the checked change is value - baseline, -1 when a drop of a higher-is-better metric is checked."""
    kind, _ = rule.bound
    if kind == "max_increase":
        return 1.0
    return -1.0 if direction_of(metric) != "lower" else 1.0
