"""`min_win_rate` rules: how often the run's images beat their pairs from another model of the same run.

`{metric: pickscore, model: sd-turbo, against: lcm-lora-sdxl, min_win_rate: 0.5}` pairs every image of the
scope with the `against` model's image of the same request (probe.analyse.pairing.ITEM), counts a better value
as a win and a tie as half, and judges the share with its prompt-clustered interval (probe.stats.preference):
in significant mode the rule fails only when the whole interval lies below the bound. One outcome per scope
group (probe x model x steps x strength [x series]) and opponent step count; no pairs: inconclusive.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from probe.analyse.groups import groups
from probe.analyse.pairing import pair
from probe.errors import UsageError
from probe.gate.verdict import Outcome, Rule, decide, nothing
from probe.spec.metric_catalog import direction_of
from probe.stats.preference import outcomes, win_rate

SCOPE = ["probe", "model", "steps", "strength", "series"]


def win_outcomes(rule: Rule, images: pd.DataFrame) -> list[Outcome]:
    """One outcome per group of the rule's scope and step count of its opponent."""
    named = images[((images["series"] == rule.metric) | (images["metric"] == rule.metric)) & images["value"].notna()]
    if named.empty:
        raise UsageError(f"rule {rule.title}: the run has no per-image {rule.metric!r} scores")
    theirs = named[named["model"] == rule.against]
    if rule.against_steps is not None:
        theirs = theirs[theirs["steps"] == rule.against_steps]
    if theirs.empty:
        models = sorted(set(named["model"]))
        raise UsageError(f"rule {rule.title}: no {rule.metric!r} scores of model {rule.against!r}"
                         f"{'' if rule.against_steps is None else f' at {rule.against_steps} steps'} in the run "
                         f"(models with scores: {', '.join(models)})")
    mine = named[named["model"] != rule.against]
    for column in ("probe", "model", "steps"):
        value = getattr(rule, column)
        if value is not None:
            mine = mine[mine[column] == value]
    results: list[Outcome] = []
    for their_steps, opponent in theirs.groupby("steps"):
        for group, rows in groups(mine, SCOPE):
            if group["series"] == rule.metric:
                del group["series"]
            group = {**group, "against": rule.against, "against_steps": int(their_steps)}
            results.append(_one(rule, group, rows, opponent))
    return results


def _one(rule: Rule, group: dict[str, Any], rows: pd.DataFrame, opponent: pd.DataFrame) -> Outcome:
    merged = pair(rows, opponent.drop(columns=["model", "steps", "key", "label"], errors="ignore"),
                  extra=["series", "metric"], suffixes=("", "_against"))
    if merged.empty:
        return nothing(rule, group, f"no image pairs with {rule.against} (same prompt, text, variables, seed, strength)")
    higher = direction_of(str(merged["metric"].iloc[0])) != "lower"
    rate = win_rate(outcomes(merged["value"].to_numpy(), merged["value_against"].to_numpy(), higher),
                    merged["prompt"].to_numpy())
    return decide(rule, group, rate.rate, rate.low, rate.high, rate.n_pairs, None)
