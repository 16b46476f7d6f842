"""The report's Preference section: the model card's chart (win rates of the subject against each baseline for an
image-quality proxy and a prompt-following proxy, with CIs), an Elo table, and Elo against seconds per image
(the ADD paper's speed plot). Built from preference.parquet and elo.parquet (recomputed when absent).

Which metric answers which question is the suite's `preference:` choice; by default the first the run scored of
QUALITY_DEFAULTS and PROMPT_DEFAULTS.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pandas as pd

from probe.analyse.preference import stored_or_computed
from probe.report.data import RunData
from probe.report.plots import model_colours, slug
from probe.store.atomic import atomic_write_bytes

QUALITY_DEFAULTS = ("aesthetic", "pickscore", "hps")
PROMPT_DEFAULTS = ("clip_score", "pickscore", "hps")


def proxies(data: RunData, wins: pd.DataFrame) -> dict[str, str]:
    """{"quality": metric, "prompt following": metric} for the metrics the run has win rates of."""
    chosen = ((data.manifest.get("suite") or {}).get("preference") or {})
    scored = set(wins["metric"]) if not wins.empty else set()
    picks: dict[str, str] = {}
    for question, key, defaults in (("image quality", "quality", QUALITY_DEFAULTS),
                                    ("prompt following", "prompt_following", PROMPT_DEFAULTS)):
        metric = chosen.get(key) or next((m for m in defaults if m in scored), None)
        if metric is not None and metric in scored:
            picks[question] = str(metric)
    return picks


def _config(model: object, steps: object) -> str:
    """`model @ steps`, or just the model for images made elsewhere (no step count)."""
    return str(model) if pd.isna(steps) else f"{model} @ {int(steps)}"  # type: ignore[call-overload]


def _ci(low: float, high: float, digits: int = 2) -> str:
    return "" if math.isnan(low) or math.isnan(high) else f"[{low:.{digits}f}, {high:.{digits}f}]"


def preference_section(data: RunData, out: Path) -> dict[str, Any] | None:
    """What _preference.html.j2 shows; None when the run has no pairs of configurations to compare."""
    wins, elo = stored_or_computed(data.path, data.jobs, data.scores)
    if wins.empty:
        return None
    out.mkdir(parents=True, exist_ok=True)
    prefix = out.resolve().relative_to(data.path.resolve()).as_posix()
    subject = data.subject
    picks = proxies(data, wins)
    charts, rows = [], []
    for question, metric in picks.items():
        mine = wins[(wins["metric"] == metric) & (wins["model"] == subject) & (wins["opponent"] != subject)]
        if mine.empty:
            continue
        name = f"winrate-{slug(question)}.png"
        _win_chart(mine, f"{metric}: {question}", out / name)
        charts.append({"file": f"{prefix}/{name}", "question": question, "metric": metric,
                       "alt": f"win rate of {subject} against each baseline on {metric} ({question}), 95% CIs"})
        for r in mine.itertuples():
            rows.append({"question": question, "metric": metric, "subject": _config(r.model, r.steps),
                         "probe": r.probe, "opponent": _config(r.opponent, r.opponent_steps),
                         "rate": f"{r.win_rate:.2f}", "ci": _ci(r.low, r.high), "n": int(r.n_pairs),
                         "p_holm": f"{r.p_holm:.3g}", "holm": bool(r.significant_holm),
                         "better": r.win_rate > 0.5})
    elo_rows, speed = [], []
    metrics = list(dict.fromkeys([*picks.values(), *sorted(set(elo["metric"]))]))
    for metric in metrics:
        table = elo[elo["metric"] == metric].sort_values("elo", ascending=False)
        for r in table.itertuples():
            elo_rows.append({"metric": metric, "probe": r.probe, "config": _config(r.model, r.steps),
                             "elo": f"{r.elo:.0f}", "ci": _ci(r.low, r.high, 0), "games": int(r.games),
                             "seconds": "" if math.isnan(r.seconds_per_image) else f"{r.seconds_per_image:.3g}"})
        if metric in picks.values() and not table.empty and table["seconds_per_image"].notna().any():
            name = f"elo-speed-{slug(metric)}.png"
            _speed_chart(table, data.models, f"Elo on {metric} against seconds per image", out / name)
            speed.append({"file": f"{prefix}/{name}", "metric": metric,
                          "alt": f"Elo on {metric} against seconds per image, one point per model and steps"})
    n_tests = int(wins.groupby(["probe", "series", "strength"], dropna=False).size().max() // 2)
    return {"charts": charts, "rows": rows, "elo": elo_rows, "speed": speed, "proxies": picks,
            "tests": n_tests, "subject": subject}


def _save(figure: Any, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue(), durable=False)


def _win_chart(rows: pd.DataFrame, title: str, path: Path) -> None:
    """Horizontal bars: the subject's win rate against each baseline configuration, CI whiskers, 0.5 marked."""
    from matplotlib.figure import Figure

    rows = rows.sort_values(["model", "steps", "opponent", "opponent_steps"])
    labels = [f"{_config(r.model, r.steps)} vs {_config(r.opponent, r.opponent_steps)}" for r in rows.itertuples()]
    figure = Figure(figsize=(5.6, 0.45 * len(rows) + 1.0), dpi=100, layout="constrained")
    axes = figure.subplots()
    rates = rows["win_rate"].to_numpy(dtype=float)
    low = (rates - rows["low"].to_numpy(dtype=float)).clip(min=0)
    high = (rows["high"].to_numpy(dtype=float) - rates).clip(min=0)
    positions = range(len(rows))
    colours = ["#2ca02c" if r > 0.5 else "#d62728" if r < 0.5 else "#999999" for r in rates]
    axes.barh(positions, rates, color=colours, alpha=0.75)
    axes.errorbar(rates, positions, xerr=[low, high], fmt="none", color="#222222", capsize=3)
    axes.axvline(0.5, color="#555555", linestyle="--", linewidth=1)
    axes.set_yticks(list(positions), labels, fontsize=8)
    axes.set_xlim(0, 1)
    axes.set_xlabel("win rate (ties count half)")
    axes.set_title(title, fontsize=10)
    _save(figure, path)


def _speed_chart(table: pd.DataFrame, models: list[str], title: str, path: Path) -> None:
    """Elo (with CI) against seconds per image, log x: the speed-quality frontier."""
    from matplotlib.figure import Figure

    colours = model_colours(models)
    figure = Figure(figsize=(4.8, 3.2), dpi=100, layout="constrained")
    axes = figure.subplots()
    for r in table[table["seconds_per_image"].notna()].itertuples():
        colour = colours.get(r.model, "#333333")
        yerr = [[max(r.elo - r.low, 0.0)], [max(r.high - r.elo, 0.0)]] if not math.isnan(r.low) else None
        axes.errorbar([r.seconds_per_image], [r.elo], yerr=yerr, fmt="o", color=colour, capsize=3)
        axes.annotate(_config(r.model, r.steps), (r.seconds_per_image, r.elo), fontsize=7, xytext=(4, 3),
                      textcoords="offset points")
    from matplotlib.ticker import FuncFormatter

    axes.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:.3g}")
    axes.xaxis.set_major_formatter(plain)
    axes.xaxis.set_minor_formatter(plain)
    axes.tick_params(axis="x", which="both", labelsize=7)
    axes.set_xlabel("seconds per image (generation)")
    axes.set_ylabel("Elo")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    _save(figure, path)
