"""`probe check`: quality and bias gates for CI, with statistical thresholds so noise does not fail a build.

A rule names a metric and a scope (probe, model, steps) and one kind of bound:
- `min` / `max`: an absolute bound on the mean (e.g. ocr_exact >= 0.05);
- `max_drop`: how far quality may fall against the baseline, in the metric's bad direction (clip_score
  falling, cmmd rising);
- `max_increase`: how far the value may rise against the baseline (e.g. a bias gap: `reference_gap`,
  `parity_gap` and `feminine_share` are computed from perceived_gender labels per group, see check_bias.py).
Mode `significant` (the default) fails only when the 95% CI of the (paired) change, or of the mean for a
bound, lies entirely beyond the tolerance; `strict` compares point estimates.

A rule names a series (`fid[features=clip]`) or a base metric (`fid`: every configuration of it), and its
direction comes from the base metric. Each group gets one of three verdicts: pass, fail, or **inconclusive**
when there is nothing to judge (no values, every label unknown/no_person, no baseline pair, or no CI in
significant mode, e.g. one prompt). Inconclusive fails the gate unless `allow_inconclusive` is set: a gate
that cannot see must not say "pass".
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
from pydantic import ValidationError
from scipy import stats

from probe.analysis.aggregate import latest_config, per_image
from probe.analysis.pairing import pair
from probe.analysis.stats import cluster_bootstrap
from probe.baseline import Baseline
from probe.check_bias import BIAS_GAPS, bias_outcomes
from probe.errors import UsageError, suggest
from probe.metrics.catalog import direction_of
from probe.suite import Check

if TYPE_CHECKING:
    from probe.api import Run

Mode = Literal["strict", "significant"]
Status = Literal["pass", "fail", "inconclusive"]
SCOPE = ["probe", "model", "steps", "strength"]
#: normal quantile for combining two runs' set-metric standard errors.
Z95 = 1.959963984540054


#: A gate is the suite's `Check` record (one schema for `checks:` and `--rule`).
Rule = Check


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
                "rules": [r.model_dump() | {"name": r.title} for r in self.rules],
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


def evaluate(run: Run, baseline: Baseline | None, rules: list[Rule], *, allow_inconclusive: bool = False) -> Verdict:
    """Evaluate every rule; UsageError (exit 2) for misuse: unknown metric, no baseline, another suite."""
    if not rules:
        raise UsageError("no rules: add `checks:` to the suite or pass --rule")
    if baseline is not None and baseline.suite_name != run.manifest["suite_name"]:
        raise UsageError(f"baseline is for suite {baseline.suite_name!r}, the run for {run.manifest['suite_name']!r}")
    images = per_image(run.jobs, run.scores)
    scores = latest_config(run.scores)
    sets = scores[scores["key"].isna()] if not scores.empty else scores
    verdict = Verdict(rules=rules, allow_inconclusive=allow_inconclusive)
    for rule in rules:
        if rule.metric in BIAS_GAPS:
            outcomes = bias_outcomes(rule, images, run.jobs, baseline, _decide)
        else:
            outcomes = _evaluate_rule(rule, images, sets, baseline)
        verdict.outcomes.extend(outcomes or [_nothing(rule, {}, "no group in scope")])
    return verdict


def _named(frame: pd.DataFrame, name: str) -> pd.Series:
    """Rows of the series `name`, or of every series of the base metric `name`."""
    return (frame["series"] == name) | (frame["metric"] == name)


def _in_scope(frame: pd.DataFrame, rule: Rule) -> pd.DataFrame:
    frame = frame[_named(frame, rule.metric)]
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
        known = sorted(set(images["series"]) | set(images["metric"]) | set(sets["series"] if not sets.empty else []))
        raise UsageError(f"rule {rule.title}: the run has no {rule.metric!r} scores in that scope"
                         f"{suggest(rule.metric, known)}")
    if kind in ("max_drop", "max_increase") and baseline is None:
        raise UsageError(f"rule {rule.title} compares with a baseline: pass --baseline FILE_OR_RUN_DIR")
    outcomes = _per_image_outcomes(rule, mine, baseline) if not mine.empty else []
    return outcomes + (_set_outcomes(rule, mine_sets, baseline) if not mine_sets.empty else [])


def _groups(frame: pd.DataFrame, rule: Rule) -> Iterable[tuple[dict[str, Any], pd.DataFrame]]:
    """(group, rows) per scope x series; the series is named in the group when the rule names its base metric."""
    for coords, group in frame.groupby([*SCOPE, "series"], dropna=False, sort=True):
        group_coords = {k: (None if pd.isna(v) else v) for k, v in zip([*SCOPE, "series"], coords, strict=True)}
        if group_coords["steps"] is not None:
            group_coords["steps"] = int(group_coords["steps"])
        if group_coords["series"] == rule.metric:
            del group_coords["series"]
        yield group_coords, group


def _per_image_outcomes(rule: Rule, mine: pd.DataFrame, baseline: Baseline | None) -> list[Outcome]:
    kind, _ = rule.bound
    outcomes = []
    if kind in ("min", "max"):
        for group, rows in _groups(mine, rule):
            rows = rows[rows["value"].notna()]
            est = cluster_bootstrap(rows["value"].to_numpy(), rows["prompt"].to_numpy())
            outcomes.append(_decide(rule, group, est.mean, est.low, est.high, est.n, None))
        return outcomes
    assert baseline is not None
    theirs = _in_scope(baseline.per_image, rule)
    pairs = pair(mine, theirs[[c for c in theirs.columns if c not in ("key", "label")]],
                 extra=["model", "steps", "series", "metric"], suffixes=("", "_base"))
    if pairs.empty:  # not one image in common: the wrong baseline, not an inconclusive group
        unseeded = "seed" in mine.columns and mine["seed"].isna().all()
        why = ("the run's images have no seeds (probe score without a seed column), so none pairs with another "
               "image" if unseeded else "same probe, model, steps, prompt, text, variables, seed, strength")
        raise UsageError(f"rule {rule.title}: no image pairs between the run and the baseline ({why})")
    pairs = pairs[pairs["value"].notna() & pairs["value_base"].notna()]
    by_group = {_group_id(group): rows for group, rows in _groups(pairs, rule)}
    for group, _ in _groups(mine, rule):
        rows = by_group.get(_group_id(group), pairs.iloc[:0])
        if rows.empty:
            outcomes.append(_nothing(rule, group, "no image pairs with the baseline that both have a value"))
            continue
        change = _sign(rule, str(rows["metric"].iloc[0])) * (rows["value"] - rows["value_base"]).to_numpy()
        est = cluster_bootstrap(change, rows["prompt"].to_numpy())
        outcomes.append(_decide(rule, group, est.mean, est.low, est.high, est.n, float(rows["value_base"].mean())))
    return outcomes


def _group_id(group: dict[str, Any]) -> str:
    return json.dumps({k: (float(v) if isinstance(v, int | float) else v) for k, v in group.items()}, sort_keys=True)


def _sign(rule: Rule, metric: str) -> float:
    """+1 when the checked change is value - baseline, -1 when a drop of a higher-is-better metric is checked."""
    kind, _ = rule.bound
    if kind == "max_increase":
        return 1.0
    return -1.0 if direction_of(metric) != "lower" else 1.0


def _se_df(row: pd.Series) -> tuple[float, float] | None:
    """A set row's (standard error, degrees of freedom): the jackknife's `ci_se`/`ci_df` from its record (or the
    baseline's se/df columns), else half its CI width over 1.96 with df infinite (older rows), else None."""
    extra = row.get("extra")
    recorded = json.loads(extra) if isinstance(extra, str) and extra else {}
    se = recorded.get("ci_se", row.get("se"))
    df = recorded.get("ci_df", row.get("df"))
    if se is not None and not pd.isna(se):
        return float(se), float("inf") if df is None or pd.isna(df) else float(df)
    low, high = row.get("low"), row.get("high")
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return None
    return float(high - low) / (2 * Z95), float("inf")


def _change_half_width(mine: tuple[float, float], theirs: tuple[float, float]) -> float:
    """95% half-width of a difference of two independent estimates: t on Welch-Satterthwaite df times the
    combined standard error (a jackknife se from few prompts has few degrees of freedom)."""
    (se_a, df_a), (se_b, df_b) = mine, theirs
    va, vb = se_a**2, se_b**2
    denominator = (va**2 / df_a if math.isfinite(df_a) else 0.0) + (vb**2 / df_b if math.isfinite(df_b) else 0.0)
    df = (va + vb) ** 2 / denominator if denominator > 0 else float("inf")
    quantile = Z95 if not math.isfinite(df) else float(stats.t.ppf(0.975, df))
    return quantile * math.sqrt(va + vb)


def _set_outcomes(rule: Rule, mine: pd.DataFrame, baseline: Baseline | None) -> list[Outcome]:
    """One outcome per set row (probe x model x steps x strength x group), matched to the same baseline row.

    Against a baseline, the change's CI combines both runs' standard errors, sqrt(se² + se_base²) with a t
    quantile on Welch-Satterthwaite degrees of freedom, taking the runs as independent samples (conservative
    when they share prompts and seeds). When either side has no CI the group is inconclusive in significant
    mode (one side's noise alone would be over-confident); strict mode compares the point estimates.
    """
    kind, _ = rule.bound
    outcomes = []
    for _, row in mine.iterrows():
        group = {k: (None if pd.isna(row[k]) else row[k]) for k in SCOPE}
        group["steps"] = None if group["steps"] is None else int(group["steps"])
        if row["series"] != rule.metric:
            group["series"] = row["series"]
        if isinstance(row.get("group"), str) and row["group"]:
            group.update(json.loads(row["group"]))
        low = None if pd.isna(row["low"]) else float(row["low"])
        high = None if pd.isna(row["high"]) else float(row["high"])
        value = float("nan") if pd.isna(row["value"]) else float(row["value"])
        if kind in ("min", "max"):
            outcomes.append(_decide(rule, group, value, low, high, int(row["n"] or 0), None))
            continue
        assert baseline is not None
        match = _same_set(baseline.sets, row)
        if match.empty or pd.isna(match["value"].iloc[0]):
            outcomes.append(_nothing(rule, group, "no value for this group in the baseline"))
            continue
        base = float(match["value"].iloc[0])
        change = _sign(rule, str(row["metric"])) * (value - base)
        mine_se, theirs_se = _se_df(row), _se_df(match.iloc[0])
        half = _change_half_width(mine_se, theirs_se) if mine_se and theirs_se else None
        outcomes.append(_decide(rule, group, change, None if half is None else change - half,
                                None if half is None else change + half, int(row["n"] or 0), base))
    return outcomes


def _same_set(sets: pd.DataFrame, row: pd.Series) -> pd.DataFrame:
    """Baseline rows with the same series, probe, model, steps, strength, group and reference (missing equals
    missing; baselines saved before the reference was stored match any)."""
    mask = pd.Series(True, index=sets.index)
    columns = ["series", "probe", "model", "steps", "strength", "group"]
    if "reference" in sets.columns and sets["reference"].notna().any():
        columns.append("reference")
    for column in columns:
        value = row.get(column)
        empty = value is None or (not isinstance(value, str) and pd.isna(value)) or value == ""
        column_empty = sets[column].isna() | (sets[column] == "")
        mask &= column_empty if empty else (sets[column] == value)
    return sets[mask]


def _nothing(rule: Rule, group: dict[str, Any], why: str, estimate: float = float("nan"), n: int = 0,
             base: float | None = None) -> Outcome:
    """An inconclusive outcome: the rule had nothing to judge in this group (or no CI to judge it by)."""
    _, tol = rule.bound
    return Outcome(rule=rule.title, group=group, status="inconclusive", estimate=estimate, low=None, high=None,
                   threshold=tol, n=n, detail=f"inconclusive: {why}", baseline=base)


def _decide(rule: Rule, group: dict[str, Any], estimate: float, low: float | None, high: float | None, n: int,
            base: float | None) -> Outcome:
    """Pass, fail or inconclusive for one group; in significant mode the whole CI must lie beyond the tolerance."""
    kind, tol = rule.bound
    if estimate is None or math.isnan(estimate):
        return _nothing(rule, group, "no value to check (no scores, or every label unknown / no_person)")
    has_ci = low is not None and high is not None and not (math.isnan(low) or math.isnan(high))
    if rule.mode == "significant" and not has_ci:
        return _nothing(rule, group, f"estimate {estimate:.4g} has no CI (fewer than 2 prompts or groups?); "
                                     "use mode: strict to judge the point estimate", float(estimate), n, base)
    significant = rule.mode == "significant"
    if kind == "min":
        failed = (high < tol) if significant else (estimate < tol)  # type: ignore[operator]
    else:  # max, max_drop, max_increase: the checked quantity must not exceed tol
        failed = (low > tol) if significant else (estimate > tol)  # type: ignore[operator]
    what = {"min": "mean", "max": "mean", "max_drop": "drop", "max_increase": "increase"}[kind]
    ci = f" [{low:.4g}, {high:.4g}]" if has_ci else ""
    mode = "CI" if significant else "point estimate"
    detail = f"{what} {estimate:.4g}{ci} vs {kind} {tol:g} ({mode}, n={n})"
    return Outcome(rule=rule.title, group=group, status="fail" if failed else "pass", estimate=float(estimate),
                   low=None if not has_ci else float(low), high=None if not has_ci else float(high),  # type: ignore[arg-type]
                   threshold=tol, n=n, detail=detail, baseline=base)
