"""`min_win_rate` gates: judged from the run's own pairs (no baseline), in significant and strict mode, with
inconclusive outcomes when nothing pairs and clear errors for an unknown opponent or a half-given rule."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from probe.errors import UsageError
from probe.gate.verdict import parse_rule
from probe.run.driver import RunOptions, run_suite
from tests.conftest import probe_cli

SUITE = """
name: gate-wins
models: [tiny, {preset: tiny, name: tiny-cfg, steps: [2], guidance: 3.0}]
seeds: 3
probes:
  - name: p
    prompts: [a red apple on a table, a lighthouse at dusk, a bowl of soup, two cats on a sofa]
    steps: [1]
    metrics: [clip_score]
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate-wins")
    (root / "suite.yaml").write_text(SUITE)
    return run_suite(root / "suite.yaml", RunOptions(reports_root=root / "out", cache_dir=root / "cache")).run_dir


def _rate(run) -> float:
    wins = pd.read_parquet(run / "preference.parquet")
    return float(wins[(wins["model"] == "tiny") & (wins["metric"] == "clip_score")]["win_rate"].iloc[0])


def _check(run, rule: str, tmp_path) -> tuple[int, dict]:
    proc = probe_cli("check", str(run), "--rule", rule, "--json", str(tmp_path / "v.json"))
    return proc.returncode, json.loads((tmp_path / "v.json").read_text())


def test_strict_mode_judges_the_point_estimate_against_the_bound(run, tmp_path):
    rate = _rate(run)
    below, above = rate - 0.01, rate + 0.01
    code, verdict = _check(run, f"clip_score:model=tiny,against=tiny-cfg,min_win_rate={below},mode=strict", tmp_path)
    assert code == 0 and verdict["outcomes"][0]["estimate"] == pytest.approx(rate)
    assert verdict["outcomes"][0]["group"]["against"] == "tiny-cfg" and verdict["outcomes"][0]["n"] == 12
    code, verdict = _check(run, f"clip_score:model=tiny,against=tiny-cfg,min_win_rate={above},mode=strict", tmp_path)
    assert code == 1 and verdict["outcomes"][0]["status"] == "fail"


def test_significant_mode_fails_only_when_the_whole_interval_is_below(run, tmp_path):
    code, verdict = _check(run, "clip_score:model=tiny,against=tiny-cfg,min_win_rate=1.0", tmp_path)
    outcome = verdict["outcomes"][0]
    assert outcome["low"] <= _rate(run) <= outcome["high"]
    assert (code == 1) == (outcome["high"] < 1.0)
    code, verdict = _check(run, "clip_score:model=tiny,against=tiny-cfg,min_win_rate=0.0", tmp_path)
    assert code == 0


def test_against_steps_picks_the_opponent_and_bad_rules_are_refused(run, tmp_path):
    code, verdict = _check(run, "clip_score:probe=p,model=tiny,against=tiny-cfg,against_steps=2,min_win_rate=0.5",
                           tmp_path)
    assert verdict["outcomes"][0]["group"]["against_steps"] == 2
    proc = probe_cli("check", str(run), "--rule", "clip_score:against=sd21,min_win_rate=0.5")
    assert proc.returncode == 2 and "no 'clip_score' scores of model 'sd21'" in proc.stderr
    with pytest.raises(UsageError, match="min_win_rate needs `against`"):
        parse_rule("clip_score:min_win_rate=0.5")
    with pytest.raises(UsageError, match="between 0 and 1"):
        parse_rule("clip_score:against=x,min_win_rate=1.5")
    with pytest.raises(UsageError, match="belong to a min_win_rate check"):
        parse_rule("clip_score:against=x,min=0.5")


def test_an_opponent_at_no_shared_request_is_inconclusive(run):
    from probe.gate.rules import evaluate
    from probe.store.tables import load_run_tables

    tables = load_run_tables(run)
    jobs = tables.jobs.copy()
    jobs.loc[jobs["model"] == "tiny-cfg", "seed"] = jobs.loc[jobs["model"] == "tiny-cfg", "seed"] + 100

    class Moved:
        manifest, scores = tables.manifest, tables.scores

    Moved.jobs = jobs
    verdict = evaluate(Moved(), None, [parse_rule("clip_score:model=tiny,against=tiny-cfg,min_win_rate=0.5")])
    assert [o.status for o in verdict.outcomes] == ["inconclusive"] and not verdict.passed
    assert np.isnan(verdict.outcomes[0].estimate)
