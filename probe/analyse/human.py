"""What the human votes of a run's studies say: win rates, Elo, agreement, attention, and the metrics' agreement.

A vote's outcome is 1 when the rater picked the pair's first image (the study's subject), 0 for the baseline.
Raters are screened by attention checks (an image against a degraded copy of itself): a rater who answered any
and passed fewer than `min_attention` of them is excluded from every table, and `attention` says who and why.
Win rates are per study and question with intervals clustered by prompt and by rater (probe.stats.human); Elo is
per question over every configuration the run's studies compare (intervals over prompts and raters, too); agreement between
raters is Krippendorff's alpha (nominal) over the pairs; each automatic per-image metric with a direction is
scored against the human majority of each pair (pairs with a tied majority left out and counted), with a
prompt-clustered interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from probe.analyse.aggregate import per_image
from probe.spec.metric_catalog import direction_of
from probe.stats.human import crossed_elo, crossed_win_rate, krippendorff_alpha
from probe.stats.preference import outcomes, win_rate
from probe.store.votes import Study, open_store

MIN_ATTENTION = 0.8
ATTENTION_COLUMNS = ["study", "rater", "checks", "passed", "pass_rate", "excluded"]
WIN_COLUMNS = ["study", "question", "subject", "baseline", "win_rate", "low", "high", "p_value", "n_votes", "n_pairs",
               "n_prompts", "n_raters"]
ELO_COLUMNS = ["question", "configuration", "elo", "low", "high", "games", "n_prompts"]
ALPHA_COLUMNS = ["study", "question", "alpha", "n_pairs", "n_raters"]
METRIC_COLUMNS = ["study", "question", "series", "agreement", "low", "high", "n_pairs", "n_prompts", "tied_majorities"]


@dataclass
class HumanResults:
    """Every table of the human analysis (empty frames when there are no votes)."""

    votes: pd.DataFrame
    attention: pd.DataFrame
    win_rates: pd.DataFrame
    elo: pd.DataFrame
    agreement: pd.DataFrame
    metric_agreement: pd.DataFrame
    min_attention: float
    studies: list[Study] = field(default_factory=list)

    @property
    def excluded(self) -> list[str]:
        rows = self.attention[self.attention["excluded"]] if not self.attention.empty else self.attention
        return [f"{r.rater} ({r.study})" for r in rows.itertuples()]


def load_human(run_dir: Path, jobs: pd.DataFrame, scores: pd.DataFrame,
               min_attention: float = MIN_ATTENTION) -> HumanResults | None:
    """The analysis of the run's ratings.sqlite, or None when the run has no studies."""
    store = open_store(run_dir)
    if store is None:
        return None
    return human_results(store.votes(), store.studies(), jobs, scores, min_attention)


def human_results(votes: pd.DataFrame, studies: list[Study], jobs: pd.DataFrame, scores: pd.DataFrame,
                  min_attention: float = MIN_ATTENTION) -> HumanResults:
    votes = votes.assign(outcome=(votes["chosen"] == votes["a_key"]).astype(float))
    attention = attention_table(votes, min_attention)
    dropped = set(zip(attention.loc[attention["excluded"], "study"], attention.loc[attention["excluded"], "rater"],
                      strict=True))
    kept = votes[(votes["kind"] == "pair") & ~pd.Series([(s, r) in dropped for s, r in
                                                         zip(votes["study"], votes["rater"], strict=True)],
                                                        index=votes.index, dtype=bool)]
    by_id = {s.id: s for s in studies}
    return HumanResults(votes, attention, win_table(kept, by_id), elo_table(kept, by_id), alpha_table(kept),
                        metric_table(kept, jobs, scores), min_attention, studies)


def attention_table(votes: pd.DataFrame, min_attention: float) -> pd.DataFrame:
    checks = votes[votes["kind"] == "attention"]
    rows = []
    for (study, rater), group in checks.groupby(["study", "rater"], sort=True):
        passed = int(group["outcome"].sum())
        rate = passed / len(group)
        rows.append({"study": study, "rater": rater, "checks": len(group), "passed": passed, "pass_rate": rate,
                     "excluded": bool(rate < min_attention)})
    return pd.DataFrame(rows, columns=ATTENTION_COLUMNS)


def win_table(kept: pd.DataFrame, studies: dict[str, Study]) -> pd.DataFrame:
    rows = []
    for (study, question), group in kept.groupby(["study", "question"], sort=True):
        rate = crossed_win_rate(group["outcome"].to_numpy(), group["prompt"].to_numpy(), group["rater"].to_numpy())
        rows.append({"study": study, "question": question, "subject": studies[study].subject,
                     "baseline": studies[study].baseline, "win_rate": rate.rate, "low": rate.low, "high": rate.high,
                     "p_value": rate.p_value, "n_votes": rate.n_pairs, "n_pairs": group["pair"].nunique(),
                     "n_prompts": rate.n_prompts, "n_raters": group["rater"].nunique()})
    return pd.DataFrame(rows, columns=WIN_COLUMNS)


def elo_table(kept: pd.DataFrame, studies: dict[str, Study]) -> pd.DataFrame:
    rows = []
    for question, group in kept.groupby("question", sort=True):
        subjects = [studies[s].subject for s in group["study"]]
        baselines = [studies[s].baseline for s in group["study"]]
        players = sorted(set(subjects) | set(baselines))
        index = {p: i for i, p in enumerate(players)}
        ratings = crossed_elo(np.array([index[s] for s in subjects]), np.array([index[b] for b in baselines]),
                              group["outcome"].to_numpy(), group["prompt"].to_numpy(), group["rater"].to_numpy(),
                              len(players))
        rows += [{"question": question, "configuration": p, "elo": float(ratings.elo[i]), "low": float(ratings.low[i]),
                  "high": float(ratings.high[i]), "games": int(ratings.games[i]), "n_prompts": ratings.n_prompts}
                 for p, i in index.items()]
    return pd.DataFrame(rows, columns=ELO_COLUMNS)


def alpha_table(kept: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (study, question), group in kept.groupby(["study", "question"], sort=True):
        matrix = group.pivot_table(index="rater", columns="pair", values="outcome", aggfunc="first")
        rows.append({"study": study, "question": question, "alpha": krippendorff_alpha(matrix.to_numpy()),
                     "n_pairs": matrix.shape[1], "n_raters": matrix.shape[0]})
    return pd.DataFrame(rows, columns=ALPHA_COLUMNS)


def majorities(kept: pd.DataFrame) -> pd.DataFrame:
    """Per (study, question, pair): the share of raters who chose the subject, and the majority (1, 0; NaN tie)."""
    shares = kept.groupby(["study", "question", "pair"], sort=True).agg(
        share=("outcome", "mean"), prompt=("prompt", "first"), a_key=("a_key", "first"), b_key=("b_key", "first"))
    shares["majority"] = np.where(shares["share"] > 0.5, 1.0, np.where(shares["share"] < 0.5, 0.0, np.nan))
    return shares.reset_index()


def metric_table(kept: pd.DataFrame, jobs: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    if kept.empty or scores.empty:
        return pd.DataFrame(columns=METRIC_COLUMNS)
    frame = per_image(jobs, scores)
    frame = frame[frame["value"].notna() & frame["metric"].map(_directional)]
    values = frame.groupby(["series", "key"])["value"].mean()
    directions = frame.groupby("series")["metric"].first().map(direction_of)
    rows = []
    majority = majorities(kept)
    for (study, question), group in majority.groupby(["study", "question"], sort=True):
        decided = group[group["majority"].notna()]
        for series, direction in directions.items():
            a = values.reindex(list(zip([series] * len(decided), decided["a_key"], strict=True))).to_numpy()
            b = values.reindex(list(zip([series] * len(decided), decided["b_key"], strict=True))).to_numpy()
            scored = ~(np.isnan(a) | np.isnan(b))
            if not scored.any():
                continue
            metric = outcomes(a[scored], b[scored], direction == "higher")
            human = decided["majority"].to_numpy()[scored]
            agree = np.where(metric == 0.5, 0.5, (metric == human).astype(float))
            rate = win_rate(agree, decided["prompt"].to_numpy()[scored])
            rows.append({"study": study, "question": question, "series": series, "agreement": rate.rate,
                         "low": rate.low, "high": rate.high, "n_pairs": rate.n_pairs, "n_prompts": rate.n_prompts,
                         "tied_majorities": int(group["majority"].isna().sum())})
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def _directional(metric: str) -> bool:
    try:
        return direction_of(metric) in ("higher", "lower")
    except Exception:  # noqa: BLE001 - a metric no longer registered: no direction, so no winner
        return False
