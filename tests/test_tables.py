"""Schema 3 of the run folder's tables: groups as var_* columns, se/df columns, `extra` as a struct; older
folders (tests/fixtures/run-v2, written by probe at 9a7120f with JSON strings) load to the same numbers."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import probe
from probe.analyse.aggregate import aggregate, with_series
from probe.gate.baseline import baseline_from_run, load_baseline
from probe.gate.rules import evaluate
from probe.gate.verdict import Rule
from probe.store.score_cache import ScoreCache
from probe.store.tables import SCHEMA_VERSION, ScoresTable, detail_array, read_scores

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def v2_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / "run-v2", run_dir)
    return run_dir


def _json_strings(table: pa.Table) -> list[str]:
    """Columns of a parquet table holding JSON objects as text (what schema 3 no longer writes)."""
    found = []
    for name in table.column_names:
        if pa.types.is_string(table.schema.field(name).type) or pa.types.is_large_string(table.schema.field(name).type):
            if any(isinstance(v, str) and v.startswith("{") for v in table.column(name).to_pylist()):
                found.append(name)
    return found


def test_a_schema_2_folder_reads_as_typed_columns(v2_run):
    manifest = json.loads((v2_run / "manifest.json").read_text())
    assert manifest["schema_version"] == 2 and pq.read_schema(v2_run / "scores.parquet").field("group")
    scores = read_scores(v2_run)
    assert "group" not in scores.columns
    sets = scores[scores["key"].isna()]
    grouped = sets[sets["var_occupation"].notna()]
    assert sorted(grouped["var_occupation"]) == ["a nurse", "a pilot"]
    # se / df come out of the old JSON `extra` into their own columns
    for row in sets.itertuples():
        assert row.se == pytest.approx(row.extra["ci_se"]) and row.df == row.extra["ci_df"]
    truncated = scores[scores["series"] == "clip_score"]["extra"]
    assert all(isinstance(e, dict) and isinstance(e["truncated"], bool) for e in truncated)


def test_old_aggregates_and_a_recomputation_from_upgraded_scores_agree(v2_run):
    stored = with_series(pd.read_parquet(v2_run / "aggregates.parquet"))
    run = probe.load_run(v2_run)
    fresh = aggregate(run.jobs, run.scores)
    key = ["probe", "model", "steps", "series", "kind", "var_occupation"]
    assert "group" not in stored.columns and set(stored["var_occupation"].dropna()) == {"a nurse", "a pilot"}
    merged = stored.merge(fresh, on=key, suffixes=("_old", "_new"))
    assert len(merged) == len(stored) == len(fresh)
    for column in ("mean", "n_prompts", "n_truncated"):
        pd.testing.assert_series_equal(merged[f"{column}_old"], merged[f"{column}_new"], check_names=False,
                                       check_dtype=False)
    # The fixture's per-image intervals predate the small-sample widening: the same resamples, widened.
    from probe.stats.bootstrap import widened

    image = merged[merged["kind"] == "image"]
    for row in image.itertuples():
        low, high = widened(row.mean_old, row.low_old, row.high_old, int(row.n_prompts_old))
        assert (row.low_new, row.high_new) == pytest.approx((float(low), float(high)), nan_ok=True)
    sets = merged[merged["kind"] == "set"]
    pd.testing.assert_series_equal(sets["low_old"], sets["low_new"], check_names=False, check_dtype=False)
    assert merged.loc[merged["series"] == "clip_score", "n_truncated_new"].max() == 2


def test_an_old_baseline_gates_a_new_run_group_by_group(v2_run, tmp_path):
    """baseline-v2.json holds `group` as JSON text; it still matches var_* groups and combines se/df."""
    old = load_baseline(FIXTURES / "baseline-v2.json")
    assert "group" not in old.sets.columns and set(old.sets["var_occupation"].dropna()) == {"a nurse", "a pilot"}
    verdict = evaluate(probe.load_run(v2_run), old, [Rule(metric="cmmd", max_increase=0.5)])
    groups = sorted(o.group["var_occupation"] for o in verdict.outcomes)
    assert groups == ["a nurse", "a pilot"] and all(o.status == "pass" for o in verdict.outcomes)
    scores = read_scores(v2_run)
    nurse = scores[(scores["series"] == "cmmd") & (scores["var_occupation"] == "a nurse")].iloc[0]
    outcome = next(o for o in verdict.outcomes if o.group["var_occupation"] == "a nurse")
    from scipy import stats

    half = stats.t.ppf(0.975, 2 * nurse.df) * (2 * nurse.se**2) ** 0.5  # equal se, df on both sides
    assert outcome.high - outcome.estimate == pytest.approx(half, rel=1e-9)
    # a baseline saved now has var_* columns, and gates the same way
    new = baseline_from_run(v2_run)
    again = evaluate(probe.load_run(v2_run), new, [Rule(metric="cmmd", max_increase=0.5)])
    assert [o.group for o in again.outcomes] == [o.group for o in verdict.outcomes]
    for fresh, saved in zip(again.outcomes, verdict.outcomes, strict=True):  # the JSON keeps 15 digits
        assert (fresh.low, fresh.high) == pytest.approx((saved.low, saved.high), rel=1e-9, abs=1e-15)


def test_a_new_run_writes_no_json_strings(tmp_path):
    from typer.testing import CliRunner

    from probe.cli import app

    result = CliRunner().invoke(app, ["run", str(FIXTURES / "run-v2.suite.yaml"), "--out", str(tmp_path / "out"),
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    run_dir = next(p for p in (tmp_path / "out" / "schema-two").iterdir() if p.is_dir() and not p.is_symlink())
    assert json.loads((run_dir / "manifest.json").read_text())["schema_version"] == SCHEMA_VERSION == 3
    for name in ("scores.parquet", "aggregates.parquet"):
        table = pq.read_table(run_dir / name)
        # `args` stays canonical JSON text on purpose: it is part of a metric's identity, a key tables group by
        assert "group" not in table.column_names and _json_strings(table) in ([], ["args"]), name
        field = table.schema.field("var_occupation").type
        assert pa.types.is_string(field) or pa.types.is_large_string(field), name
    scores = pq.read_table(run_dir / "scores.parquet")
    assert pa.types.is_struct(scores.schema.field("extra").type)
    assert pa.types.is_float64(scores.schema.field("se").type) and pa.types.is_float64(scores.schema.field("df").type)
    frame = read_scores(run_dir)
    grouped = frame[frame["var_occupation"].notna()]
    assert len(grouped) == 2 and grouped["se"].notna().all() and grouped["df"].notna().all()
    assert frame.loc[frame["series"] == "clip_score", "extra"].map(lambda e: e["truncated"]).sum() == 4


def test_detail_keys_whose_types_clash_are_kept_as_text_and_the_rest_stays_typed(caplog):
    with caplog.at_level(logging.WARNING):
        array = detail_array([{"reason": "no_face", "n": 1}, {"reason": 3, "n": 2}, None, {}])
    assert array.type.field("n").type == pa.int64() and array.type.field("reason").type == pa.string()
    assert array.to_pylist() == [{"n": 1, "reason": '"no_face"'}, {"n": 2, "reason": "3"}, None, None]
    assert "reason" in caplog.text


def test_the_sink_reuses_rows_another_run_cached_and_records_new_ones(tmp_path):
    row = {"metric": "m", "args": "", "series": "m", "config_id": "c1", "score_id": "s1", "key": "k1", "value": 0.5,
           "extra": {"truncated": False}}
    first = ScoresTable(tmp_path / "a", ScoreCache(tmp_path / "cache"))
    (tmp_path / "a").mkdir()
    first.add([row, {**row, "key": None, "score_id": None, "config_id": "set", "var_occupation": "nurse"}])
    assert set(ScoreCache(tmp_path / "cache").rows("c1")) == {"s1"}  # per-image rows only
    assert ScoreCache(tmp_path / "cache").rows("set") == {}
    (tmp_path / "b").mkdir()
    second = ScoresTable(tmp_path / "b", ScoreCache(tmp_path / "cache"))
    assert second.reuse("c1", ["s1", "s2"]) == {"s1"}
    stored = read_scores(tmp_path / "b")
    assert stored["score_id"].tolist() == ["s1"] and stored["extra"].tolist() == [{"truncated": False}]
    assert len(ScoreCache(tmp_path / "cache").rows("c1")["s1"]) == 1  # reusing does not append it again
