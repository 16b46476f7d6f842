"""The report's "Human preference" section: the votes of the run's `probe rate` studies beside the automatic
win rates: human win rates (intervals over prompts and raters), Elo from votes, agreement between raters,
attention checks (and who was excluded), and how often each preference metric sides with the human majority."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from probe.analyse.human import HumanResults, load_human
from probe.analyse.preference import stored_or_computed
from probe.report.data import RunData
from probe.report.preference import proxies

QUESTION_PROXY = {"quality": "image quality", "prompt": "prompt following"}


def _ci(low: float, high: float, digits: int = 2) -> str:
    return "" if math.isnan(low) or math.isnan(high) else f"[{low:.{digits}f}, {high:.{digits}f}]"


def _split(config: str) -> tuple[str, float | None]:
    model, _, steps = config.rpartition("@")
    return (model, float(steps)) if model and steps.isdigit() else (config, None)


def _automatic(wins: pd.DataFrame, metric: str | None, subject: str, baseline: str) -> str:
    """The metric's win rate (all pairs of the run) of the same two configurations, as shown in the table."""
    if metric is None or wins.empty:
        return ""
    (model, steps), (other, other_steps) = _split(subject), _split(baseline)
    rows = wins[(wins["metric"] == metric) & (wins["model"] == model) & (wins["opponent"] == other)]
    if steps is not None:
        rows = rows[rows["steps"] == steps]
    if other_steps is not None:
        rows = rows[rows["opponent_steps"] == other_steps]
    if rows.empty:
        return ""
    r = rows.iloc[0]
    return f"{r.win_rate:.2f} {_ci(r.low, r.high)} ({metric})"


def human_section(data: RunData) -> dict[str, Any] | None:
    """What _human.html.j2 shows; None when the run has no votes."""
    results = load_human(data.path, data.jobs, data.scores)
    if results is None or results.votes.empty:
        return None
    wins, _ = stored_or_computed(data.path, data.jobs, data.scores)
    picks = proxies(data, wins)
    return {"wins": _win_rows(results, wins, picks), "elo": _elo_rows(results), "alpha": _alpha_rows(results),
            "metrics": _metric_rows(results), "attention": _attention(results),
            "n_votes": len(results.votes), "n_raters": results.votes["rater"].nunique()}


def _win_rows(results: HumanResults, wins: pd.DataFrame, picks: dict[str, str]) -> list[dict[str, Any]]:
    return [{"study": r.study, "question": r.question, "subject": r.subject, "baseline": r.baseline,
             "rate": f"{r.win_rate:.2f}", "ci": _ci(r.low, r.high), "p": f"{r.p_value:.3g}",
             "significant": bool(r.low > 0.5 or r.high < 0.5), "better": r.win_rate > 0.5,
             "votes": int(r.n_votes), "pairs": int(r.n_pairs), "raters": int(r.n_raters),
             "automatic": _automatic(wins, picks.get(QUESTION_PROXY.get(r.question, "")), r.subject, r.baseline)}
            for r in results.win_rates.itertuples()]


def _elo_rows(results: HumanResults) -> list[dict[str, Any]]:
    table = results.elo.sort_values(["question", "elo"], ascending=[True, False])
    return [{"question": r.question, "config": r.configuration, "elo": f"{r.elo:.0f}", "ci": _ci(r.low, r.high, 0),
             "games": int(r.games)} for r in table.itertuples()]


def _alpha_rows(results: HumanResults) -> list[dict[str, Any]]:
    return [{"study": r.study, "question": r.question,
             "alpha": "n/a" if math.isnan(r.alpha) else f"{r.alpha:.2f}", "pairs": int(r.n_pairs),
             "raters": int(r.n_raters)} for r in results.agreement.itertuples()]


def _metric_rows(results: HumanResults) -> list[dict[str, Any]]:
    return [{"study": r.study, "question": r.question, "series": r.series, "rate": f"{r.agreement:.2f}",
             "ci": _ci(r.low, r.high), "pairs": int(r.n_pairs), "ties": int(r.tied_majorities)}
            for r in results.metric_agreement.itertuples()]


def _attention(results: HumanResults) -> dict[str, Any]:
    table = results.attention
    return {"threshold": f"{results.min_attention:.0%}", "excluded": results.excluded,
            "rows": [{"study": r.study, "rater": r.rater, "passed": int(r.passed), "checks": int(r.checks),
                      "rate": f"{r.pass_rate:.0%}", "excluded": bool(r.excluded)} for r in table.itertuples()]}
