"""Scores appended as parts (probe.store.score_parts), folded into scores.parquet when the pass ends: what a
reader, a resumed run and a compaction see is what the old whole-table rewrite wrote, row for row and type
for type; a kill at any point leaves every row once; a torn part is refused clearly or set aside."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

import pandas as pd
import pyarrow.parquet as pq
import pytest

from probe.errors import UsageError
from probe.score.protocol import Score, ScoringContext
from probe.score.scorer import PreparedMetric, score_run
from probe.spec.schema import MetricSpec
from probe.store import score_parts
from probe.store.features import FeatureCache
from probe.store.score_cache import ScoreCache
from probe.store.tables import SCORE_COLUMNS, ScoresTable, compact_scores, detail_of, read_scores, scores_to_arrow

PARTS = score_parts.PARTS


def _image_rows(start: int, count: int, metric: str = "clip_score") -> list[dict[str, Any]]:
    """Rows shaped like scorer._image_row: a few detail shapes (a flag, boxes as lists of lists, readings)."""
    rows = []
    for i in range(start, start + count):
        extra: dict[str, Any] | None = {"truncated": i % 3 == 0}
        if i % 5 == 0:
            extra = {"boxes": [[1.0, 2.0, 3.0, 4.0]], "n_faces": 1, "detectors": ["a"]}
        elif i % 7 == 0:
            extra = None
        rows.append({"metric": metric, "args": "", "series": metric, "config_id": f"cfg-{metric}",
                     "score_id": f"s{i:05d}", "key": f"k{i:05d}", "value": i / 100, "label": None,
                     "text": "OPEN" if i % 2 else None, "extra": extra})
    return rows


def _set_row(occupation: str | None, set_hash: str, value: float) -> dict[str, Any]:
    return {"metric": "cmmd", "args": "", "series": "cmmd", "config_id": "cfg-cmmd", "key": None, "value": value,
            "low": value - 1, "high": value + 1, "se": 0.5, "df": 3.0, "probe": "bias", "model": "tiny", "steps": 1.0,
            "strength": None, "reference": "folder:ref", "set_hash": set_hash, "n": 8, "n_reference": 3,
            **({"var_occupation": occupation} if occupation else {}),
            "extra": {"ci": "jackknife", "ci_groups": 4, "ci_design": "independent reference"}}


def _chunks() -> list[list[dict[str, Any]]]:
    """What a scoring pass adds: chunks of 64 image rows, set rows with and without a group, ocr's many rows."""
    return [_image_rows(0, 64), _image_rows(64, 64), [_set_row("a nurse", "h1", 1.0)], _image_rows(128, 10, "ocr_cer"),
            [_set_row(None, "h2", 2.0)], [_set_row("a pilot", "h3", 3.0)], _image_rows(200, 64)]


def _old_single_file(run_dir: Path, chunks: list[list[dict[str, Any]]]) -> None:
    """scores.parquet as the whole-table rewrite wrote it (ScoresTable before parts): concat, then write."""
    frame = pd.DataFrame(columns=SCORE_COLUMNS)
    for rows in chunks:
        groups = sorted({k for r in rows for k in r if k.startswith("var_")})
        new = pd.DataFrame(rows, columns=[*SCORE_COLUMNS, *groups])
        new["extra"] = [detail_of(v) for v in new["extra"]]
        frame = new if frame.empty else pd.concat([frame, new], ignore_index=True)
    run_dir.mkdir(parents=True)
    pq.write_table(scores_to_arrow(frame), run_dir / "scores.parquet")


def _parts(run_dir: Path) -> list[str]:
    folder = run_dir / PARTS
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _written(run_dir: Path, chunks: list[list[dict[str, Any]]]) -> ScoresTable:
    table = ScoresTable(run_dir)
    for rows in chunks:
        table.add(rows)
    return table


def test_each_write_is_a_part_and_compaction_folds_them_into_one_table(tmp_path):
    run = tmp_path / "run"
    table = _written(run, _chunks())
    assert _parts(run) == [f"{seq:08d}.parquet" for seq in range(1, 8)] and not (run / "scores.parquet").exists()
    before = read_scores(run)
    compacted = table.compact()
    assert (run / "scores.parquet").is_file() and not (run / PARTS).exists()
    pd.testing.assert_frame_equal(compacted, before)
    pd.testing.assert_frame_equal(read_scores(run), before)
    table.add(_image_rows(300, 5))  # writes go on after a compaction, numbered past what it folded in
    assert _parts(run) == ["00000008.parquet"] and len(read_scores(run)) == len(before) + 5


def test_parts_and_the_compacted_table_read_as_the_old_single_file(tmp_path):
    chunks = _chunks()
    _old_single_file(tmp_path / "old", chunks)
    old = read_scores(tmp_path / "old")
    _written(tmp_path / "new", chunks)
    pd.testing.assert_frame_equal(read_scores(tmp_path / "new"), old)  # from the parts
    pd.testing.assert_frame_equal(compact_scores(tmp_path / "new"), old)
    pd.testing.assert_frame_equal(read_scores(tmp_path / "new"), old)  # from the compacted file
    assert "var_occupation" in old.columns and old["extra"].map(lambda e: e is None or isinstance(e, dict)).all()
    schema_old = pq.read_schema(tmp_path / "old" / "scores.parquet").remove_metadata()
    schema_new = pq.read_schema(tmp_path / "new" / "scores.parquet").remove_metadata()
    assert schema_new == schema_old, (schema_new, schema_old)  # the `extra` struct's fields included


def test_the_frame_is_the_table_a_reader_sees_even_while_rows_arrive(tmp_path):
    run = tmp_path / "run"
    table = ScoresTable(run)
    for rows in _chunks():
        table.add(rows)
        assert len(table.frame) == len(read_scores(run))
    assert list(table.frame["score_id"].dropna()) == list(read_scores(run)["score_id"].dropna())


def _flat_kill(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill between writing scores.parquet and removing the parts it folded in."""
    monkeypatch.setattr(score_parts, "remove_folded", lambda run_dir, through: None)


def test_a_kill_during_compaction_counts_no_row_twice(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _written(run, _chunks())
    expected = read_scores(run)
    with monkeypatch.context() as patch:
        _flat_kill(patch)
        compact_scores(run)
    assert (run / "scores.parquet").is_file() and len(_parts(run)) == 7  # folded in, not yet removed
    pd.testing.assert_frame_equal(read_scores(run), expected)
    resumed = ScoresTable(run)
    pd.testing.assert_frame_equal(resumed.frame, expected)
    resumed.add(_image_rows(400, 3))
    assert "00000008.parquet" in _parts(run)  # past the folded parts, which a reader skips
    assert len(read_scores(run)) == len(expected) + 3
    resumed.compact()
    assert not (run / PARTS).exists() and len(read_scores(run)) == len(expected) + 3


class Counting:
    """An image metric that counts what it is asked to score, and dies (like a SIGKILL) on chunk `die_at`."""

    name: ClassVar[str] = "brightness"
    kind: ClassVar[Literal["image"]] = "image"

    def __init__(self, die_at: int | None = None) -> None:
        self.die_at, self.chunks, self.scored = die_at, 0, 0

    def config(self, ctx: ScoringContext) -> dict[str, Any]:
        return {}

    def score(self, items, ctx):
        self.chunks += 1
        if self.chunks == self.die_at:
            raise KeyboardInterrupt  # not an Exception: the pass does not catch it, as it could not catch a kill
        self.scored += len(items)
        return [Score(self.name, 0.5, key=i.key, extra={"truncated": False}) for i in items]


def _score(run: Path, jobs: pd.DataFrame, metric: Counting, ctx: ScoringContext) -> None:
    spec = MetricSpec(name="brightness")
    prepared = PreparedMetric("p", spec, metric, {"name": "brightness"}, "cfg")  # type: ignore[arg-type]
    score_run(run, jobs, [prepared], ctx, sink=ScoresTable(run))


def test_a_pass_killed_mid_scoring_resumes_without_rescoring_or_doubling_what_parts_hold(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    jobs = pd.DataFrame({"key": [f"k{i:04d}" for i in range(300)], "probe": "p", "prompt": "an apple",
                         "text": None, "image": [f"images/{i}.png" for i in range(300)], "model": "tiny"})
    ctx = ScoringContext(features=FeatureCache(tmp_path / "features"))
    with pytest.raises(KeyboardInterrupt):
        _score(run, jobs, Counting(die_at=4), ctx)  # three chunks of 64 written as parts, then killed
    assert len(_parts(run)) == 3 and len(read_scores(run)) == 192
    again = Counting()
    _score(run, jobs, again, ctx)
    assert again.scored == 300 - 192
    scores = compact_scores(run)
    assert len(scores) == 300 and scores["score_id"].is_unique and set(scores["key"]) == set(jobs["key"])


def _mixed(run: Path) -> ScoresTable:
    """Rows in a compacted scores.parquet and in parts after it."""
    table = _written(run, _chunks()[:3])
    table.compact()
    for rows in _chunks()[3:]:
        table.add(rows)
    return table


def test_replacing_a_set_row_drops_the_stale_one_wherever_it_was_written(tmp_path):
    run = tmp_path / "run"
    table = _mixed(run)
    frame = table.frame
    sets = frame["key"].isna()
    nurse = sets & (frame["var_occupation"] == "a nurse")  # in scores.parquet
    table.add([_set_row("a nurse", "h1b", 10.0)], replace=nurse)
    frame = table.frame
    pilot = frame["key"].isna() & (frame["var_occupation"] == "a pilot")  # in a part
    table.add([_set_row("a pilot", "h3b", 30.0)], replace=pilot)
    for scores in (table.frame, read_scores(run), ScoresTable(run).frame, compact_scores(run)):
        set_rows = scores[scores["key"].isna()].sort_values("set_hash")
        assert list(set_rows["set_hash"]) == ["h1b", "h2", "h3b"] and list(set_rows["value"]) == [10.0, 2.0, 30.0]
        assert scores["key"].notna().sum() == 64 * 3 + 10


def test_forgetting_bad_images_removes_their_rows_and_their_probes_set_rows_across_parts(tmp_path):
    run = tmp_path / "run"
    _mixed(run)
    bad = {"k00001", "k00130", "k00201"}  # in scores.parquet, in a part, in the last part
    ScoresTable(run).forget(bad, {"bias"})  # a table of its own, as the driver's writer does
    for scores in (read_scores(run), ScoresTable(run).frame, compact_scores(run)):
        assert not scores["key"].isin(bad).any() and not scores["key"].isna().any()
        assert len(scores) == 64 * 3 + 10 - 3


def test_a_torn_part_is_refused_by_a_reader_and_set_aside_by_the_writer(tmp_path, caplog):
    run = tmp_path / "run"
    _written(run, _chunks())
    torn = run / PARTS / "00000002.parquet"
    torn.write_bytes(torn.read_bytes()[:200])
    with pytest.raises(UsageError) as refused:
        read_scores(run)
    message = str(refused.value)
    assert str(torn) in message and "is not a readable table" in message and "\n" not in message
    with caplog.at_level(logging.WARNING):
        table = ScoresTable(run)  # the run driver repairs: its rows are scored again (or taken from the cache)
    assert "00000002.parquet" in caplog.text and "moved to" in caplog.text
    assert list((run / PARTS).glob("00000002.parquet.corrupt-*")) and not torn.exists()
    assert len(table.frame) == sum(len(c) for c in _chunks()) - 64
    assert not table.frame["score_id"].isin([f"s{i:05d}" for i in range(64, 128)]).any()
    table.add(_image_rows(64, 64))
    assert len(compact_scores(run)) == sum(len(c) for c in _chunks())
    assert _parts(run) == [p.name for p in (run / PARTS).iterdir()] and len(_parts(run)) == 1  # the aside, kept


def test_an_older_schema_table_with_parts_after_it_reads_upgraded(tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "fixtures" / "run-v2", run)
    old = read_scores(run)
    table = ScoresTable(run)
    table.add(_image_rows(0, 4))
    merged = read_scores(run)
    assert len(merged) == len(old) + 4 and "group" not in merged.columns
    (tmp_path / "v3").mkdir()  # the old rows as schema 3 writes them (typed columns where v2 had null ones)
    pq.write_table(scores_to_arrow(old), tmp_path / "v3" / "scores.parquet")
    upgraded = read_scores(tmp_path / "v3")
    pd.testing.assert_frame_equal(merged.iloc[: len(old)].reset_index(drop=True),
                                  upgraded.reindex(columns=merged.columns))
    pd.testing.assert_frame_equal(compact_scores(run), merged)


def test_the_sink_keeps_recording_to_the_score_cache(tmp_path):
    table = ScoresTable(tmp_path / "run", ScoreCache(tmp_path / "cache"))
    table.add(_image_rows(0, 64))
    fresh = ScoresTable(tmp_path / "other", ScoreCache(tmp_path / "cache"))
    assert fresh.reuse("cfg-clip_score", [f"s{i:05d}" for i in range(70)]) == {f"s{i:05d}" for i in range(64)}
    assert _parts(tmp_path / "other") == ["00000001.parquet"] and len(read_scores(tmp_path / "other")) == 64


def test_a_second_table_on_the_folder_never_overwrites_the_parts_of_the_first(tmp_path):
    run = tmp_path / "run"
    _written(run, _chunks()[:2])
    first = ScoresTable(run)
    ScoresTable(run).forget({"k00003"}, set())  # written while `first` is open: part 3
    first.add(_image_rows(500, 2))  # must go to part 4, not over part 3
    assert _parts(run) == [f"{seq:08d}.parquet" for seq in range(1, 5)]
    scores = read_scores(run)
    assert len(scores) == 128 - 1 + 2 and "k00003" not in set(scores["key"])
