"""Paired preference analysis: win rates of every configuration (model x steps) against every other, and a
Bradley-Terry (Elo) rating of all of them, per per-image metric with a direction.

A pair is two images answering the same request (probe.analyse.pairing.ITEM: prompt, target text, variables,
seed, strength, init image); the image with the better value wins, a tie counts half. Win rates get a bootstrap
interval over prompts and a p-value against 0.5; Holm's correction runs over each metric's unordered pairs of
configurations (one family per probe x series x strength), and both markings are kept (`significant`: the
interval excludes 0.5; `significant_holm`: Holm-adjusted p < 0.05) so a report says which it shows. Every pair
of every two configurations is one game for the Elo fit, whose intervals also resample prompts.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from probe.analyse.aggregate import per_image
from probe.analyse.pairing import pair
from probe.spec.metric_catalog import direction_of
from probe.stats.preference import elo_ratings, holm, outcomes, win_rate

FAMILY = ["probe", "series", "metric", "strength"]
WIN_COLUMNS = [*FAMILY, "model", "steps", "opponent", "opponent_steps", "win_rate", "low", "high", "p_value",
               "p_holm", "significant", "significant_holm", "n_pairs", "n_prompts", "ties"]
ELO_COLUMNS = [*FAMILY, "model", "steps", "elo", "low", "high", "games", "n_prompts", "seconds_per_image"]
ALPHA = 0.05


def _directional(metric: str) -> bool:
    try:
        return direction_of(metric) in ("higher", "lower")
    except Exception:  # noqa: BLE001 - a metric no longer registered: no direction, so no winner
        return False


def preference_tables(jobs: pd.DataFrame, scores: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(win rates, Elo ratings) of every family with at least two configurations that share pairs."""
    frame = per_image(jobs, scores)
    frame = frame[frame["value"].notna()]
    frame = frame[frame["metric"].map(_directional)] if not frame.empty else frame
    seconds = _seconds_per_image(jobs)
    wins: list[dict[str, object]] = []
    elos: list[dict[str, object]] = []
    for coords, group in frame.groupby(FAMILY, dropna=False, sort=True):
        family = dict(zip(FAMILY, coords, strict=True))
        family_wins, family_elo = _family(family, group, seconds)
        wins += family_wins
        elos += family_elo
    return pd.DataFrame(wins, columns=WIN_COLUMNS), pd.DataFrame(elos, columns=ELO_COLUMNS)


def stored_or_computed(run_dir: Path, jobs: pd.DataFrame, scores: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The run's preference.parquet and elo.parquet, or both recomputed when either is missing or torn."""
    from probe.store.tables import read_derived

    wins, elo = read_derived(run_dir / "preference.parquet"), read_derived(run_dir / "elo.parquet")
    return (wins, elo) if wins is not None and elo is not None else preference_tables(jobs, scores)


def _family(family: dict[str, object], group: pd.DataFrame,
            seconds: dict[tuple[str, int | None], float]) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    higher = direction_of(str(family["metric"])) == "higher"
    configs = sorted({(str(m), _steps(s)) for m, s in zip(group["model"], group["steps"], strict=True)},
                     key=lambda c: (c[0], -1 if c[1] is None else c[1]))
    if len(configs) < 2:
        return [], []
    index = {config: i for i, config in enumerate(configs)}
    rows: list[dict[str, object]] = []
    games: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for a, b in combinations(configs, 2):
        left, right = group[_is(group, a)], group[_is(group, b)]
        merged = pair(left, right, extra=["series", "metric"])
        if merged.empty:
            continue
        results = outcomes(merged["value"].to_numpy(), merged["value_b"].to_numpy(), higher)
        prompts = merged["prompt"].to_numpy()
        rate = win_rate(results, prompts)
        base = {**family, "p_value": rate.p_value, "n_pairs": rate.n_pairs, "n_prompts": rate.n_prompts,
                "ties": rate.ties}
        rows.append({**base, "model": a[0], "steps": a[1], "opponent": b[0], "opponent_steps": b[1],
                     "win_rate": rate.rate, "low": rate.low, "high": rate.high})
        rows.append({**base, "model": b[0], "steps": b[1], "opponent": a[0], "opponent_steps": a[1],
                     "win_rate": 1 - rate.rate, "low": 1 - rate.high, "high": 1 - rate.low})
        n = len(results)
        games.append((np.full(n, index[a]), np.full(n, index[b]), results, prompts))
    _mark(rows)
    if not games:
        return rows, []
    a_idx, b_idx, score, prompts = (np.concatenate(parts) for parts in zip(*games, strict=True))
    ratings = elo_ratings(a_idx, b_idx, score, prompts, len(configs))
    elo = [{**family, "model": m, "steps": s, "elo": float(ratings.elo[i]), "low": float(ratings.low[i]),
            "high": float(ratings.high[i]), "games": int(ratings.games[i]), "n_prompts": ratings.n_prompts,
            "seconds_per_image": seconds.get((m, s), float("nan"))}
           for (m, s), i in index.items() if ratings.games[i] > 0]
    return rows, elo


def _steps(value: object) -> int | None:
    """Steps as an int; None for images made elsewhere (`probe score`), which carry no step count."""
    return None if pd.isna(value) else int(value)  # type: ignore[call-overload]


def _is(group: pd.DataFrame, config: tuple[str, int | None]) -> pd.Series:
    steps = group["steps"].isna() if config[1] is None else group["steps"] == config[1]
    return (group["model"] == config[0]) & steps


def _mark(rows: list[dict[str, object]]) -> None:
    """Holm over the family's unordered pairs (each appears twice, once per side, with one p-value)."""
    p = np.array([float(r["p_value"]) for r in rows[::2]])  # type: ignore[arg-type]
    adjusted = holm(p)
    for i, row in enumerate(rows):
        row["p_holm"] = float(adjusted[i // 2])
        low, high = float(row["low"]), float(row["high"])  # type: ignore[arg-type]
        row["significant"] = bool(not np.isnan(low) and (low > 0.5 or high < 0.5))
        row["significant_holm"] = bool(adjusted[i // 2] < ALPHA)


def _seconds_per_image(jobs: pd.DataFrame) -> dict[tuple[str, int | None], float]:
    """Mean generation seconds per image of each (model, steps): Elo against speed."""
    if "seconds" not in jobs.columns:
        return {}
    made = jobs[jobs["seconds"].notna() & jobs["image"].notna()]
    means = made.groupby(["model", "steps"])["seconds"].mean()
    return {(str(m), _steps(s)): float(v) for (m, s), v in means.items()}
