"""`probe check`: quality and bias gates for CI, with statistical thresholds so noise does not fail a build.

A rule names a metric and a scope (probe, model, steps) and one kind of bound:
- `min` / `max`: an absolute bound on the mean (e.g. ocr_exact >= 0.05);
- `max_drop`: how far quality may fall against the baseline, in the metric's bad direction (clip_score
  falling, cmmd rising);
- `max_increase`: how far the value may rise against the baseline (e.g. a bias gap: `reference_gap`,
  `parity_gap` and `feminine_share` are computed from perceived_gender labels per group, see probe/gate/bias_gaps.py);
- `min_win_rate` with `against: MODEL`: the least share of paired images on which the scope beats another model
  of the same run (probe/gate/wins.py), no baseline needed.
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
from collections.abc import Iterable
from typing import Any, Protocol

import pandas as pd

from probe.analyse.aggregate import latest_config, per_image
from probe.analyse.groups import groups
from probe.analyse.pairing import pair
from probe.errors import UsageError, suggest
from probe.gate.baseline import Baseline
from probe.gate.bias_gaps import BIAS_GAPS, bias_outcomes
from probe.gate.sets import set_outcomes
from probe.gate.verdict import Outcome, Rule, Verdict, decide, nothing, rules_from_checks, sign_of
from probe.gate.wins import win_outcomes
from probe.spec.metric_catalog import is_binary
from probe.stats.proportion import delta_estimate, mean_estimate

SCOPE = ["probe", "model", "steps", "strength"]


class RunLike(Protocol):
    """What a gate reads of a run: its manifest and tables (probe.store.tables.RunTables, probe.Run)."""

    @property
    def manifest(self) -> dict[str, Any]: ...
    @property
    def jobs(self) -> pd.DataFrame: ...
    @property
    def scores(self) -> pd.DataFrame: ...


def evaluate(run: RunLike, baseline: Baseline | None, rules: list[Rule], *, allow_inconclusive: bool = False) -> Verdict:
    """Evaluate every rule; UsageError (exit 2) for misuse: unknown metric, no baseline, another suite."""
    if not rules:
        raise UsageError("no rules: add `checks:` to the suite or pass --rule")
    rules = rules_from_checks(rules, "rules")  # a bare Check with a NaN threshold would pass every group
    if baseline is not None and baseline.suite_name != run.manifest["suite_name"]:
        raise UsageError(f"baseline is for suite {baseline.suite_name!r}, the run for {run.manifest['suite_name']!r}")
    images = per_image(run.jobs, run.scores)
    scores = latest_config(run.scores)
    sets = scores[scores["key"].isna()] if not scores.empty else scores
    verdict = Verdict(rules=rules, allow_inconclusive=allow_inconclusive)
    for rule in rules:
        if rule.metric in BIAS_GAPS:
            outcomes = bias_outcomes(rule, images, run.jobs, baseline)
        elif rule.bound[0] == "min_win_rate":
            outcomes = win_outcomes(rule, images)
        else:
            outcomes = _evaluate_rule(rule, images, sets, baseline)
        verdict.outcomes.extend(outcomes or [nothing(rule, {}, "no group in scope")])
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
    return outcomes + (set_outcomes(rule, mine_sets, baseline) if not mine_sets.empty else [])


def _groups(frame: pd.DataFrame, rule: Rule) -> Iterable[tuple[dict[str, Any], pd.DataFrame]]:
    """(group, rows) per scope x series; the series is named in the group when the rule names its base metric."""
    for coords, rows in groups(frame, [*SCOPE, "series"]):
        if coords["series"] == rule.metric:
            del coords["series"]
        yield coords, rows


def _per_image_outcomes(rule: Rule, mine: pd.DataFrame, baseline: Baseline | None) -> list[Outcome]:
    kind, _ = rule.bound
    outcomes = []
    if kind in ("min", "max"):
        for group, rows in _groups(mine, rule):
            rows = rows[rows["value"].notna()]
            est = mean_estimate(rows["value"].to_numpy(), rows["prompt"].to_numpy(),
                                binary=is_binary(str(rows["metric"].iloc[0])) if len(rows) else False)
            outcomes.append(decide(rule, group, est.mean, est.low, est.high, est.n, None))
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
            outcomes.append(nothing(rule, group, "no image pairs with the baseline that both have a value"))
            continue
        metric = str(rows["metric"].iloc[0])
        sign = sign_of(rule, metric)
        mine_v, base_v = rows["value"].to_numpy(), rows["value_base"].to_numpy()
        est = delta_estimate(*((mine_v, base_v) if sign > 0 else (base_v, mine_v)), rows["prompt"].to_numpy(),
                             binary=is_binary(metric))  # the checked change: sign * (run - baseline)
        outcomes.append(decide(rule, group, est.mean, est.low, est.high, est.n, float(rows["value_base"].mean())))
    return outcomes


def _group_id(group: dict[str, Any]) -> str:
    return json.dumps({k: (float(v) if isinstance(v, int | float) else v) for k, v in group.items()}, sort_keys=True)
