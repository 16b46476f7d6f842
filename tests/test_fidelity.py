"""Numbers you can defend: metric identity, honest gate verdicts, one pairing, reports that never crash.

Each test is a finding of the fidelity review that failed on the code before it: constructed run folders
where the right answer is known.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

import probe
from probe.analyse.aggregate import paired_deltas
from probe.gate.baseline import baseline_from_run, load_baseline, save_baseline
from probe.gate.output import write_json
from probe.gate.rules import evaluate
from probe.gate.verdict import Rule
from probe.score.scorer import _reference, metric_label
from probe.spec.schema import MetricSpec
from probe.store.score_cache import ScoreCache
from probe.store.tables import SCORE_COLUMNS, ScoresTable, read_scores, score_id
from tests.conftest import probe_cli

PROMPTS = [f"prompt {i}" for i in range(8)]


def write_run(path: Path, jobs: list[dict], rows: list[dict], suite: str = "fidelity") -> Path:
    path.mkdir(parents=True)
    for job in jobs:
        job.setdefault("strength", None)
        job.setdefault("init_image", None)
        job.setdefault("image", f"images/{job['key']}.png")
        job.setdefault("text", None)
        job.setdefault("variables", "{}")
    for row in rows:
        row.setdefault("args", "")
        row.setdefault("series", metric_label(row["metric"], json.loads(row["args"] or "{}")))
        row.setdefault("config_id", row["series"])
    pd.DataFrame(jobs).to_parquet(path / "jobs.parquet", index=False)
    pd.DataFrame(rows).reindex(columns=SCORE_COLUMNS).to_parquet(path / "scores.parquet", index=False)
    (path / "manifest.json").write_text(json.dumps({"suite_name": suite, "suite": {}, "suite_sha256": "x"}))
    return path


def set_run(path: Path, value: float, *, low: float, high: float, steps: tuple[int, ...] = (1,)) -> Path:
    """Per-image clip_score on two prompts and one FD-on-CLIP set row per step count (model m vs model r)."""
    jobs = [{"key": f"{path.name}-{m}-{p}-{s}", "probe": "q", "model": m, "prompt": PROMPTS[p], "seed": 0, "steps": s}
            for m in ("m", "r") for p in range(2) for s in steps]
    rows = [{"metric": "clip_score", "key": j["key"], "value": 30.0, "score_id": score_id(j["key"], j["prompt"], None)}
            for j in jobs]
    rows += [{"metric": "fid", "args": '{"features":"clip"}', "key": None, "value": value, "low": low, "high": high,
              "probe": "q", "model": "m", "steps": s, "reference": "model:r", "n": 2, "n_reference": 2,
              "extra": json.dumps({"ci_se": (high - low) / 3.92, "ci_df": 4.0})} for s in steps]
    return write_run(path, jobs, rows)


def test_a_configured_metric_keeps_its_direction_in_gates(tmp_path):
    base = baseline_from_run(set_run(tmp_path / "base", 10.0, low=9.0, high=11.0))
    worse = probe.load_run(set_run(tmp_path / "worse", 30.0, low=29.0, high=31.0))
    for name in ("fid[features=clip]", "fid"):  # the configuration, or the base name for all its configurations
        verdict = evaluate(worse, base, [Rule(metric=name, max_drop=1.0)])
        assert not verdict.passed, name
        assert verdict.outcomes[0].estimate == pytest.approx(20.0)  # a drop of 20 in the bad (rising) direction
        assert "drop 20" in verdict.outcomes[0].detail
    assert worse.scores.loc[worse.scores["key"].isna(), "metric"].tolist() == ["fid"]


def test_set_metric_deltas_combine_both_runs_uncertainty(tmp_path):
    base = baseline_from_run(set_run(tmp_path / "base", 10.0, low=9.0, high=11.0))
    run = probe.load_run(set_run(tmp_path / "run", 10.5, low=9.5, high=11.5))
    outcome = evaluate(run, base, [Rule(metric="fid", max_increase=0.1)]).outcomes[0]
    se = 2.0 / 3.92  # each run: jackknife se on 4 degrees of freedom -> Welch-Satterthwaite df 8, t = 2.306
    assert outcome.low == pytest.approx(0.5 - 2.306004 * np.sqrt(2) * se, rel=1e-5)
    assert outcome.passed  # 0.5 above the tolerance, but within both runs' noise
    no_ci = probe.load_run(set_run(tmp_path / "no-ci", 10.5, low=float("nan"), high=float("nan")))
    assert evaluate(no_ci, base, [Rule(metric="fid", max_increase=0.1)]).outcomes[0].status == "inconclusive"


def test_rules_and_suite_checks_may_name_a_series(tmp_path, write_suite):
    from probe.gate.verdict import parse_rule
    from probe.spec.loader import load_suite

    rule = parse_rule("kid[features=clip,subset_size=50]:probe=q,max_increase=0.01")
    assert (rule.metric, rule.probe, rule.max_increase) == ("kid[features=clip,subset_size=50]", "q", 0.01)
    suite = write_suite("""
        name: named-series
        models: [tiny, {preset: tiny, name: other}]
        probes:
          - {name: q, prompts: [a cat], metrics: [{name: fid, args: {features: clip}, reference: {model: other}}]}
        checks:
          - {metric: "fid[features=clip]", probe: q, max_increase: 1.0}
        """)
    assert load_suite(suite).suite.checks[0].metric == "fid[features=clip]"


def test_old_baseline_files_still_pair(tmp_path):
    path = text_run(tmp_path / "run")
    run = probe.load_run(path)
    save_baseline(path, tmp_path / "new.json")
    payload = json.loads((tmp_path / "new.json").read_text())
    for row in payload["per_image"]:  # as saved before text, variables and series were stored
        for column in ("text", "variables", "series"):
            row.pop(column)
    (tmp_path / "old.json").write_text(json.dumps(payload))
    old = load_baseline(tmp_path / "old.json")
    assert set(old.per_image["series"]) == {"ocr_cer"}
    outcomes = evaluate(run, old, [Rule(metric="ocr_cer", max_drop=0.0, mode="strict")]).outcomes
    assert [o.status for o in outcomes] == ["pass", "pass"]


def test_gates_with_nothing_to_judge_are_inconclusive_and_fail_by_default(tmp_path):
    jobs = [{"key": f"k{p}{s}", "probe": "faces", "model": "m", "prompt": PROMPTS[p], "seed": s, "steps": 1}
            for p in range(4) for s in range(3)]
    rows = [{"metric": "skin_tone", "key": j["key"], "value": None, "label": "unknown",
             "score_id": score_id(j["key"], j["prompt"], None)} for j in jobs]
    run = probe.load_run(write_run(tmp_path / "unknown", jobs, rows))
    verdict = evaluate(run, None, [Rule(metric="skin_tone", min=10.0)])
    assert [o.status for o in verdict.outcomes] == ["inconclusive"] and not verdict.passed
    assert evaluate(run, None, [Rule(metric="skin_tone", min=10.0)], allow_inconclusive=True).passed
    path = tmp_path / "verdict.json"
    write_json(verdict, path)
    assert json.loads(path.read_text())["outcomes"][0]["estimate"] is None  # strict JSON: null, not NaN


def test_one_prompt_is_inconclusive_in_significant_mode_not_silently_strict(tmp_path):
    jobs = [{"key": f"k{s}", "probe": "p", "model": "m", "prompt": "only", "seed": s, "steps": 1} for s in range(4)]
    rows = [{"metric": "clip_score", "key": j["key"], "value": 20.0 + j["seed"],
             "score_id": score_id(j["key"], "only", None)} for j in jobs]
    run = probe.load_run(write_run(tmp_path / "one", jobs, rows))
    significant = evaluate(run, None, [Rule(metric="clip_score", min=25.0)])
    assert significant.outcomes[0].status == "inconclusive" and "mode: strict" in significant.outcomes[0].detail
    strict = evaluate(run, None, [Rule(metric="clip_score", min=25.0, mode="strict")])
    assert strict.outcomes[0].status == "fail"


def test_all_unknown_gender_labels_make_a_bias_gap_inconclusive(tmp_path):
    jobs = [{"key": f"k{o}{s}", "probe": "occ", "model": "m", "prompt": f"a photo of {o}", "seed": s, "steps": 1,
             "var_occupation": str(o), "attr_bls_pct_female": 50.0} for o in range(3) for s in range(4)]
    rows = [{"metric": "perceived_gender", "args": '{"margin":0.2}', "key": j["key"], "value": None,
             "label": "no_person", "score_id": score_id(j["key"], j["prompt"], None)} for j in jobs]
    path = write_run(tmp_path / "nobody", jobs, rows)
    run = probe.load_run(path)
    verdict = evaluate(run, baseline_from_run(path), [Rule(metric="reference_gap", max_increase=0.05)])
    assert verdict.outcomes and all(o.status == "inconclusive" for o in verdict.outcomes)
    assert not verdict.passed


def text_run(path: Path) -> Path:
    """One prompt asked for OPEN and for CLOSED, 2 seeds, two models."""
    jobs, rows = [], []
    for model in ("a", "b"):
        for text in ("OPEN", "CLOSED"):
            for seed in (0, 1):
                key = f"{model}-{text}-{seed}"
                jobs.append({"key": key, "probe": "signs", "model": model, "prompt": "a shop sign", "text": text,
                             "seed": seed, "steps": 1})
                rows.append({"metric": "ocr_cer", "key": key, "value": 0.1 * seed + (model == "a"),
                             "score_id": score_id(key, "a shop sign", text)})
    return write_run(path, jobs, rows)


def test_pairs_respect_the_target_text(tmp_path):
    path = text_run(tmp_path / "text")
    run = probe.load_run(path)
    deltas = paired_deltas(run.jobs, run.scores, "a")
    assert deltas["n_pairs"].tolist() == [4] and deltas["mean"].tolist() == pytest.approx([1.0])
    compared = probe.compare(run, run)
    assert set(compared["n_pairs"]) == {4}
    save_baseline(path, tmp_path / "base.json")
    outcome = evaluate(run, load_baseline(tmp_path / "base.json"), [Rule(metric="ocr_cer", max_drop=0.0, mode="strict")]).outcomes
    assert [o.n for o in outcome] == [4, 4]  # per model: 4 pairs each, no OPEN x CLOSED cross pairs


def test_score_cache_records_are_keyed_by_configuration_id(tmp_path):
    cache = ScoreCache(tmp_path)
    row = {"score_id": "s", "key": "k", "metric": "m", "value": 1.0}
    cache.add("0123456789abcdef", [row])
    long_label = metric_label("perceived_gender", {"prompts": ["a photo of a woman " * 20, "a photo of a man " * 20]})
    assert len(long_label) > 255  # once a file name, now only a display label: the id is the record's key
    assert ScoreCache(tmp_path).rows("0123456789abcdef") == {"s": [row]}
    assert ScoreCache(tmp_path).rows(long_label) == {}


def test_scores_of_older_runs_are_upgraded_to_metric_and_series(tmp_path):
    tmp_path.joinpath("run").mkdir()
    pd.DataFrame([{"metric": "ocr_cer[engine=x]", "config_id": "c", "key": "k", "value": 0.5}]).to_parquet(
        tmp_path / "run" / "scores.parquet")
    scores = read_scores(tmp_path / "run")
    assert scores[["metric", "series", "args"]].iloc[0].tolist() == ["ocr_cer", "ocr_cer[engine=x]", ""]


def test_img2img_model_reference_is_taken_at_the_same_strength(tmp_path):
    rows = pd.DataFrame([{"key": f"{m}{st}{p}", "model": m, "steps": 4, "strength": st, "prompt": PROMPTS[p],
                          "image": f"{m}{st}{p}.png", "text": None}
                         for m in ("a", "r") for st in (0.25, 0.5, 1.0) for p in range(3)])
    spec = MetricSpec.model_validate({"name": "cmmd", "reference": {"model": "r"}})
    items, name = _reference(spec, rows, {"model": "a", "steps": 4, "strength": 0.5}, tmp_path, None)  # type: ignore[arg-type]
    assert name == "model:r" and sorted(i.key for i in items) == ["r0.50", "r0.51", "r0.52"]


def test_the_report_renders_a_one_step_line_whose_interval_misses_its_estimate(tmp_path):
    path = set_run(tmp_path / "odd", 10.0, low=12.0, high=11.0)  # as the old basic bootstrap wrote: low > high > value
    for job in pd.read_parquet(path / "jobs.parquet").itertuples():
        (path / job.image).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(path / job.image)
    proc = probe_cli("report", str(path))
    assert proc.returncode == 0, proc.stderr
    assert (path / "index.html").is_file()


def test_a_report_that_fails_is_one_line_and_exit_1(tmp_path, monkeypatch, write_suite):
    path = set_run(tmp_path / "broken", 10.0, low=9.0, high=11.0)
    (path / "aggregates.parquet").write_bytes(b"not parquet")
    proc = probe_cli("report", str(path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "--debug" in proc.stderr

    import probe.report
    from probe.cli.commands import app

    def explode(*args: object, **kwargs: object) -> Path:
        raise RuntimeError("template bug")

    monkeypatch.setattr(probe.report, "build_report", explode)
    suite = write_suite("""
        name: tiny-report
        models: [tiny]
        seeds: 1
        probes:
          - {name: q, prompts: [a red apple], steps: [1], metrics: [clip_score]}
        """)
    result = CliRunner().invoke(app, ["run", str(suite), "--out", str(tmp_path / "reports")])
    assert result.exit_code == 1, result.output
    assert "probe report" in result.output and "template bug" in result.output
    assert "Traceback" not in result.output
    latest = tmp_path / "reports" / "tiny-report" / "latest"
    assert json.loads((latest / "manifest.json").read_text())["status"] == "complete"


def test_images_without_a_seed_are_each_their_own_item(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    lines = ["file,prompt,model"]
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 10, 200 - 30 * i)).save(folder / f"{i}.png")
        lines.append(f"{i}.png,a red cube,{'m1' if i < 3 else 'm2'}")
    (tmp_path / "prompts.csv").write_text("\n".join(lines) + "\n")
    proc = probe_cli("score", str(folder), "--prompts", str(tmp_path / "prompts.csv"), "--clip-model", "tiny",
                     "--out", str(tmp_path / "reports"), env={"PROBE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    run = probe.load_run(tmp_path / "reports" / "score-imgs" / "latest")
    assert run.jobs["seed"].isna().all()
    assert run.deltas().empty  # nothing says which m2 image answers which m1 image: no cross pairs
    assert run.summary().query("series == 'clip_score'")["n_images"].tolist() == [3, 3]
    html = (run.path / "index.html").read_text()
    assert html.count("no seed given)") == 3  # one grid per image, none hidden behind another


class _MeanShift:
    """A set metric on fake 2-d features (derived from the key): |mean(x) - mean(y)|, no CI needed here."""

    name, direction, kind, ci_groups = "fake", "lower", "set", 30

    def config(self, ctx):
        return {}

    def embed(self, items, ctx):
        return np.array([[int(i.key[-1]), 1.0] for i in items])

    def compare(self, features, reference):
        return float(abs(features.mean() - reference.mean())), {}

    def interval(self, features, reference, design, estimate, extra):
        from probe.stats.jackknife import Interval

        return Interval(estimate, estimate, 0.0, 1.0)


def test_a_set_row_whose_images_changed_replaces_the_stale_row(tmp_path):
    from probe.score.protocol import ScoringContext
    from probe.score.scorer import PreparedMetric, score_run
    from probe.store.features import FeatureCache

    def jobs(keys: list[str]) -> pd.DataFrame:
        rows = [{"key": f"m{k}", "probe": "q", "model": "m", "prompt": f"p{k}", "steps": 1, "strength": None,
                 "image": f"m{k}.png", "text": None} for k in keys]
        rows += [{"key": f"r{k}", "probe": "q", "model": "r", "prompt": f"p{k}", "steps": 1, "strength": None,
                  "image": f"r{k}.png", "text": None} for k in "123"]
        return pd.DataFrame(rows)

    spec = MetricSpec.model_validate({"name": "cmmd", "reference": {"model": "r"}})
    prepared = [PreparedMetric("q", spec, _MeanShift(), {}, "cid")]  # type: ignore[arg-type]
    ctx = ScoringContext(features=FeatureCache(tmp_path / "cache"))
    score_run(tmp_path, jobs(["1", "2", "3"]), prepared, ctx, sink=ScoresTable(tmp_path))
    score_run(tmp_path, jobs(["1", "2", "9"]), prepared, ctx, sink=ScoresTable(tmp_path))  # one image of the group regenerated
    rows = read_scores(tmp_path)
    mine = rows[rows["model"] == "m"]
    assert len(mine) == 1 and mine["value"].iloc[0] == pytest.approx((1 + 2 + 9 + 3) / 6 - (1 + 2 + 3 + 3) / 6)


def test_configured_metrics_keep_their_arrows_and_their_bias_section(tmp_path):
    from probe.report.bias import bias_section
    from probe.report.data import load_run as load_report_data
    from probe.report.tables import summary

    data = load_report_data(set_run(tmp_path / "sets", 10.0, low=9.0, high=11.0))
    columns = {c["metric"]: c for c in summary(data, "q")["columns"]}
    assert columns["fid[features=clip]"]["direction"] == "lower" and columns["clip_score"]["direction"] == "higher"

    jobs = [{"key": f"k{o}{s}", "probe": "occ", "model": "m", "prompt": f"a photo of {o}", "seed": s, "steps": 1,
             "var_occupation": str(o), "attr_bls_pct_female": 50.0} for o in range(2) for s in range(4)]
    rows = [{"metric": "perceived_gender", "args": '{"margin":0.2}', "key": j["key"], "value": 0.9,
             "label": "feminine", "score_id": score_id(j["key"], j["prompt"], None)} for j in jobs]
    section = bias_section(load_report_data(write_run(tmp_path / "gender", jobs, rows)))
    assert section is not None and section["gender"], "a configured perceived_gender must reach the bias section"


def test_one_set_metric_against_two_references_keeps_both_rows(tmp_path):
    from probe.score.protocol import ScoringContext
    from probe.score.scorer import PreparedMetric, score_run
    from probe.store.features import FeatureCache

    jobs = pd.DataFrame([{"key": f"{m}{k}", "probe": "q", "model": m, "prompt": f"p{k}", "steps": 1, "strength": None,
                          "image": f"{m}{k}.png", "text": None} for m in ("m", "r", "s") for k in "123"])
    prepared = [PreparedMetric("q", MetricSpec.model_validate({"name": "cmmd", "reference": {"model": ref}}),
                               _MeanShift(), {}, "cid") for ref in ("r", "s")]  # type: ignore[arg-type]
    ctx = ScoringContext(features=FeatureCache(tmp_path / "cache"))
    score_run(tmp_path, jobs, prepared, ctx, sink=ScoresTable(tmp_path))
    again = score_run(tmp_path, jobs, prepared, ctx, sink=ScoresTable(tmp_path))
    rows = read_scores(tmp_path)
    assert sorted(rows.loc[rows["model"] == "m", "reference"]) == ["model:r", "model:s"]
    assert again.computed["cmmd"] == 0
