"""The human-vote analysis on simulated votes (known preference recovered, a careless rater excluded), the
metrics' agreement with the majority against a hand count, the report section, and export / import."""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd
import pytest

from probe.analyse.aggregate import per_image
from probe.analyse.human import load_human
from probe.errors import UsageError
from probe.rate.exchange import export_votes, import_votes
from probe.store.tables import load_run_tables
from tests.conftest import probe_cli
from tests.rating_helpers import new_study


def _simulate(store, study, p_subject: float, raters: int, careless: str | None = None, seed: int = 0,
              question: str = "quality") -> None:
    """Every rater votes on every pair: the subject's image with probability p_subject; attention checks are
    passed, except by `careless`, who answers pairs at random and fails every check."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(raters):
        name = f"r{i}"
        for pair in store.pairs(study.id):
            attention = pair.kind == "attention"
            p = (0.0 if attention else 0.5) if name == careless else (1.0 if attention else p_subject)
            chosen = pair.a_key if rng.random() < p else pair.b_key
            left = pair.a_key if rng.random() < 0.5 else pair.b_key
            rows.append((study.id, pair.pair, name, question, "left" if chosen == left else "right", chosen, left,
                         None, "2026-12-02T00:00:00.000Z", "test"))
    assert store.insert_many(rows) == len(rows)


def test_simulated_votes_recover_the_known_preference_and_exclude_a_careless_rater(rating_run):
    store, study, _ = new_study(rating_run, pairs=16, attention=6)
    _simulate(store, study, p_subject=0.75, raters=12, careless="r11", seed=3)
    tables = load_run_tables(rating_run)
    results = load_human(rating_run, tables.jobs, tables.scores)
    assert results is not None
    assert results.attention.set_index("rater").loc["r11", "excluded"]
    assert results.excluded == [f"r11 ({study.id})"]
    assert not results.attention.set_index("rater").drop("r11")["excluded"].any()
    row = results.win_rates.iloc[0]
    assert row["n_raters"] == 11 and row["n_votes"] == 11 * 16  # the careless rater's votes are left out
    assert row["low"] <= 0.75 <= row["high"] and row["low"] > 0.5
    elo = results.elo.set_index("configuration")["elo"]
    gap = elo["tiny@1"] - elo["tiny-cfg@4"]
    assert gap == pytest.approx(400 * np.log10(0.75 / 0.25), abs=90)  # 190.8 Elo for 3:1 odds
    alpha = results.agreement.iloc[0]["alpha"]
    assert -0.3 < alpha < 0.3  # independent coin flips with a fixed bias agree only by chance


def test_raters_who_agree_perfectly_have_alpha_one(rating_run):
    store, study, _ = new_study(rating_run, pairs=8, attention=1)
    rows = [(study.id, p.pair, f"r{i}", "quality", "left", p.a_key if p.pair % 3 else p.b_key,
             p.a_key if p.pair % 3 else p.b_key, None, "2026-12-02T00:00:00.000Z", "test")
            for i in range(3) for p in store.pairs(study.id)]
    store.insert_many(rows)
    tables = load_run_tables(rating_run)
    results = load_human(rating_run, tables.jobs, tables.scores)
    assert results.agreement.iloc[0]["alpha"] == pytest.approx(1.0)


def test_metric_agreement_with_the_human_majority_is_counted_by_hand(rating_run):
    store, study, _ = new_study(rating_run, pairs=12, attention=0)
    _simulate(store, study, p_subject=0.6, raters=3, seed=8)
    tables = load_run_tables(rating_run)
    results = load_human(rating_run, tables.jobs, tables.scores)
    clip = per_image(tables.jobs, tables.scores)
    clip = clip[clip["series"] == "clip_score"].set_index("key")["value"]
    votes = store.votes(study.id)
    agree = []
    for _, group in votes.groupby("pair"):
        share = float((group["chosen"] == group["a_key"]).mean())
        if share == 0.5:
            continue
        human_a = share > 0.5
        a, b = clip[group["a_key"].iloc[0]], clip[group["b_key"].iloc[0]]
        agree.append(0.5 if a == b else float((a > b) == human_a))
    row = results.metric_agreement.set_index("series").loc["clip_score"]
    assert row["n_pairs"] == len(agree) and row["agreement"] == pytest.approx(np.mean(agree))
    assert row["low"] <= row["agreement"] <= row["high"]


def test_the_report_shows_human_preference_beside_the_automatic_win_rates(rating_run):
    from probe.report import build_report

    store, study, _ = new_study(rating_run, questions=("quality", "prompt"), pairs=16, attention=4)
    _simulate(store, study, p_subject=0.8, raters=5, careless="r4", seed=1)
    _simulate(store, study, p_subject=0.6, raters=5, careless="r4", seed=2, question="prompt")
    html = build_report(rating_run).read_text()
    assert 'id="human"' in html and "Human preference" in html
    assert f"Excluded: r4 ({study.id})" in html
    assert "Krippendorff" in html and "tiny@1" in html and "tiny-cfg@4" in html
    section = html.split('id="human"', 1)[1].split("</section>", 1)[0]
    rows = {row.split("</td>", 2)[1].removeprefix("<td>"): row for row in section.split("<tr><td>")[1:3]}
    automatic = load_run_wins(rating_run)
    assert f"{automatic:.2f}" in rows["prompt"] and "(clip_score)</td>" in rows["prompt"]  # the proxy beside it
    assert "<td>—</td>" in rows["quality"]  # no quality proxy scored (clip_score answers prompt following)


def load_run_wins(run_dir) -> float:
    from probe.api import load_run

    wins = load_run(run_dir).win_rates()
    row = wins[(wins["metric"] == "clip_score") & (wins["model"] == "tiny") & (wins["opponent"] == "tiny-cfg")]
    return float(row["win_rate"].iloc[0])


def test_export_then_import_round_trips_and_reimporting_adds_nothing(rating_run, tmp_path):
    store, study, _ = new_study(rating_run, pairs=6, attention=1)
    _simulate(store, study, p_subject=0.7, raters=2)
    before = store.votes()
    for suffix in ("csv", "parquet"):
        out = tmp_path / f"votes.{suffix}"
        assert export_votes(store, out) == len(before)
        with store.transaction() as db:
            db.execute("DELETE FROM votes")
        assert import_votes(store, out) == (len(before), 0)
        after = store.votes()
        keep = ["study", "pair", "rater", "question", "choice", "chosen", "left", "answered_at"]
        pd.testing.assert_frame_equal(before[keep].astype(str), after[keep].astype(str))
        assert import_votes(store, out) == (0, len(before))


def test_import_accepts_a_platforms_choice_and_left_columns(rating_run, tmp_path):
    store, study, _ = new_study(rating_run, pairs=3, attention=0)
    pairs = store.pairs(study.id)
    rows = [{"pair": p.pair, "rater": "worker-7", "question": "quality", "choice": "right", "left": p.b_key}
            for p in pairs]
    pd.DataFrame(rows).to_csv(tmp_path / "platform.csv", index=False)
    assert import_votes(store, tmp_path / "platform.csv", study.id) == (3, 0)
    votes = store.votes()
    assert (votes["chosen"] == votes["a_key"]).all()  # right of a b-left pair is the subject's image


@pytest.mark.parametrize(("row", "message"), [
    ({"pair": 99}, "line 3: pair '99' is not a pair of study"),
    ({"question": "beauty"}, "line 3: question 'beauty' is not asked"),
    ({"chosen": "f" * 64}, "line 3: chosen 'fff"),
    ({"rater": ""}, "line 3: rater is empty"),
    ({"study": "nope"}, "line 3: study 'nope' is not in this run"),
])
def test_a_bad_row_refuses_the_whole_file_naming_its_line(rating_run, tmp_path, row, message):
    store, study, _ = new_study(rating_run, pairs=3, attention=0)
    pairs = store.pairs(study.id)
    good = {"study": study.id, "pair": pairs[0].pair, "rater": "w", "question": "quality", "chosen": pairs[0].a_key}
    frame = pd.DataFrame([good, {**good, "pair": pairs[1].pair, "chosen": pairs[1].a_key, **row}])
    frame.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        import_votes(store, tmp_path / "bad.csv")
    with sqlite3.connect(rating_run / "ratings.sqlite") as db:
        assert db.execute("SELECT count(*) FROM votes").fetchone()[0] == 0


@pytest.mark.slow
def test_rate_export_and_import_from_the_command_line(rating_run, tmp_path):
    store, study, _ = new_study(rating_run, pairs=4, attention=1)
    _simulate(store, study, p_subject=0.7, raters=2)
    out = tmp_path / "votes.csv"
    exported = probe_cli("rate", "export", str(rating_run), "--out", str(out))
    assert exported.returncode == 0 and f"{len(store.votes())} votes written" in exported.stdout
    again = probe_cli("rate", "import", str(rating_run), str(out))
    assert again.returncode == 0 and f"0 votes added, {len(store.votes())} already present" in again.stdout
    missing = probe_cli("rate", "import", str(rating_run), str(tmp_path / "none.csv"))
    assert missing.returncode == 2 and "none.csv: no such file" in missing.stderr
    unknown = probe_cli("rate", str(rating_run), "--compare", "tiny", "sd-turbo")
    assert unknown.returncode == 2 and "no images of 'sd-turbo'" in unknown.stderr


def test_the_python_api_reads_the_studies(rating_run):
    from probe.api import load_run

    assert load_run(rating_run).human() is None  # no studies yet
    store, study, _ = new_study(rating_run, pairs=6, attention=1)
    _simulate(store, study, p_subject=0.7, raters=3)
    results = load_run(rating_run).human()
    assert results is not None and len(results.votes) == 3 * 7
    assert list(results.win_rates["study"]) == [study.id]
