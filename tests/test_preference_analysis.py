"""preference.parquet and elo.parquet of a tiny run: every win rate is the hand count over pairs, the two sides
of a pair add to one, Holm's column is the adjustment of the family's p-values, and Elo orders configurations
as their win rates do."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from probe.run.driver import RunOptions, run_suite
from probe.stats.preference import holm

SUITE = """
name: prefs
models: [tiny, {preset: tiny, name: tiny-cfg, steps: [2], guidance: 3.0}]
seeds: 3
probes:
  - name: p
    prompts: [a red apple on a table, a lighthouse at dusk, a bowl of soup, two cats on a sofa]
    steps: [1, 2]
    metrics: [clip_score, pickscore]
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefs")
    suite = root / "suite.yaml"
    suite.write_text(SUITE)
    summary = run_suite(suite, RunOptions(reports_root=root / "out", cache_dir=root / "cache"))
    assert not summary.failures
    return summary.run_dir


def _values(run_dir, metric: str, model: str, steps: int) -> pd.Series:
    jobs = pd.read_parquet(run_dir / "jobs.parquet")
    scores = pd.read_parquet(run_dir / "scores.parquet")
    rows = scores[(scores["metric"] == metric) & scores["key"].notna()][["key", "value"]]
    mine = jobs[(jobs["model"] == model) & (jobs["steps"] == steps)].merge(rows, on="key")
    return mine.set_index(["prompt", "seed"])["value"]


def test_win_rates_are_the_hand_count_over_pairs(run):
    wins = pd.read_parquet(run / "preference.parquet")
    assert set(wins["metric"]) == {"clip_score", "pickscore"}
    configs = {("tiny", 1), ("tiny", 2), ("tiny-cfg", 2)}
    assert set(zip(wins["model"], wins["steps"], strict=True)) == configs
    for metric in ("clip_score", "pickscore"):
        a, b = _values(run, metric, "tiny", 1), _values(run, metric, "tiny-cfg", 2)
        both = pd.concat([a, b], axis=1, keys=["a", "b"]).dropna()
        expected = float(np.mean(np.where(both.a == both.b, 0.5, (both.a > both.b).astype(float))))
        row = wins[(wins["metric"] == metric) & (wins["model"] == "tiny") & (wins["steps"] == 1)
                   & (wins["opponent"] == "tiny-cfg")].iloc[0]
        assert row["win_rate"] == pytest.approx(expected) and row["n_pairs"] == len(both) == 12
        assert row["n_prompts"] == 4 and row["low"] <= row["win_rate"] <= row["high"]
        back = wins[(wins["metric"] == metric) & (wins["model"] == "tiny-cfg") & (wins["opponent"] == "tiny")
                    & (wins["opponent_steps"] == 1)].iloc[0]
        assert back["win_rate"] == pytest.approx(1 - expected)
        assert back["low"] == pytest.approx(1 - row["high"]) and back["p_value"] == row["p_value"]


def test_holm_runs_over_each_metrics_pairs_of_configurations(run):
    wins = pd.read_parquet(run / "preference.parquet")
    for _, family in wins.groupby("metric"):
        firsts = family.iloc[::2]  # one row per unordered pair (its mirror follows it)
        assert len(firsts) == 3  # three configurations, three pairs
        np.testing.assert_allclose(firsts["p_holm"], holm(firsts["p_value"].to_numpy()))
        np.testing.assert_allclose(family.iloc[1::2]["p_holm"], firsts["p_holm"])
        assert (family["significant_holm"] == (family["p_holm"] < 0.05)).all()
        assert (family["significant"] == ((family["low"] > 0.5) | (family["high"] < 0.5))).all()


def test_elo_orders_configurations_as_their_win_rates_and_carries_their_speed(run):
    wins = pd.read_parquet(run / "preference.parquet")
    elo = pd.read_parquet(run / "elo.parquet")
    for metric, table in elo.groupby("metric"):
        assert len(table) == 3 and np.isclose(table["elo"].mean(), 1000.0)
        assert ((table["low"] <= table["elo"]) & (table["elo"] <= table["high"])).all()
        assert (table["seconds_per_image"] > 0).all()
        mean_rate = wins[wins["metric"] == metric].groupby(["model", "steps"])["win_rate"].mean()
        by_elo = table.set_index(["model", "steps"])["elo"]
        strongest = by_elo.idxmax()
        if mean_rate.max() - mean_rate.drop(strongest).max() > 0.05:  # a clear winner wins on both
            assert mean_rate.idxmax() == strongest


def test_the_report_shows_the_preference_section_with_the_tables_numbers(run, tmp_path):
    from pathlib import Path

    from probe.report.build import build_report
    from tests.chrome import CHROMIUM, Chrome

    html = build_report(run).read_text()
    section = html[html.index('<section id="preference">'):]
    section = section[:section.index("</section>")]
    wins = pd.read_parquet(run / "preference.parquet")
    clip = wins[(wins["metric"] == "clip_score") & (wins["model"] == "tiny") & (wins["opponent"] == "tiny-cfg")]
    for rate in clip["win_rate"]:
        assert f"{rate:.2f}" in section
    # The suite scores no aesthetic, so image quality falls back to pickscore, prompt following is clip_score.
    assert "image quality is read\nfrom <strong>pickscore</strong>" in section
    assert "prompt following from\n<strong>clip_score</strong>" in section
    for name in ("winrate-image-quality.png", "winrate-prompt-following.png", "elo-speed-clip-score.png"):
        assert (run / "assets" / "plots" / name).stat().st_size > 5_000 and name in section
    elo = pd.read_parquet(run / "elo.parquet")
    assert all(f"{e:.0f}" in section for e in elo["elo"])
    if not Path(CHROMIUM).exists():
        pytest.skip("the browser half needs Debian's chromium")
    with Chrome(tmp_path / "profile") as chrome:
        chrome.open((run / "index.html").as_uri())
        assert chrome.problems() == []
        shown = chrome.evaluate("[...document.querySelectorAll('#preference img')].filter(i => i.naturalWidth)"
                                ".length", timeout=60)
        assert shown == 4  # two win-rate charts, two speed plots


def test_the_python_api_reads_the_same_tables_and_recomputes_them_when_missing(run, tmp_path):
    import shutil

    import probe

    loaded = probe.load_run(run)
    pd.testing.assert_frame_equal(loaded.win_rates(), pd.read_parquet(run / "preference.parquet"))
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("preference.parquet", "elo.parquet", "assets"))
    again = probe.load_run(copy)
    pd.testing.assert_frame_equal(again.elo(), pd.read_parquet(run / "elo.parquet"))



def test_images_without_step_counts_are_compared_by_model(run):
    from probe.analyse.preference import preference_tables
    from probe.store.tables import load_run_tables

    tables = load_run_tables(run)
    jobs = tables.jobs.copy()
    jobs.loc[jobs["model"] == "tiny-cfg", "steps"] = None  # as `probe score` records images made elsewhere
    wins, elo = preference_tables(jobs, tables.scores)
    against = wins[(wins["opponent"] == "tiny-cfg") & (wins["metric"] == "clip_score")]
    assert len(against) == 2 and against["opponent_steps"].isna().all()
    assert elo[elo["model"] == "tiny-cfg"]["steps"].isna().all()
