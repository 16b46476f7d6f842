"""`probe check` on constructed runs where the right verdict is known, and on a real tiny-model run."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import probe
from probe.errors import UsageError
from probe.gate.baseline import baseline_from_run
from probe.gate.rules import evaluate
from probe.gate.verdict import Rule, parse_rule
from probe.store.tables import SCORE_COLUMNS, score_id
from tests.conftest import probe_cli

PROMPTS = [f"prompt {i}" for i in range(12)]
SEEDS = list(range(6))


def make_run(path: Path, values: dict[str, np.ndarray], suite: str = "gate", prompts: list[str] = PROMPTS) -> Path:
    """A run directory with one per-image metric per entry of `values` (shape prompts x seeds), model 'm'."""
    path.mkdir(parents=True)
    jobs = pd.DataFrame([{"key": f"{suite}-{p}-{s}-{path.name}", "probe": "p", "model": "m", "prompt": prompt,
                          "seed": s, "steps": 1, "strength": None, "init_image": None, "image": f"images/{p}-{s}.png"}
                         for p, prompt in enumerate(prompts) for s in SEEDS])
    rows = []
    for metric, grid in values.items():
        for (p, s), value in np.ndenumerate(grid):
            key = f"{suite}-{p}-{s}-{path.name}"
            rows.append({"metric": metric, "config_id": metric, "key": key, "value": float(value),
                         "score_id": score_id(key, prompts[p], None)})
    jobs.to_parquet(path / "jobs.parquet", index=False)
    pd.DataFrame(rows).reindex(columns=SCORE_COLUMNS).to_parquet(path / "scores.parquet", index=False)
    (path / "manifest.json").write_text(json.dumps({"suite_name": suite, "suite": {}, "suite_sha256": "x"}))
    return path


@pytest.fixture
def base_values() -> np.ndarray:
    return np.random.default_rng(0).normal(30.0, 2.0, size=(len(PROMPTS), len(SEEDS)))


def verdict(tmp_path, base, new, rule: Rule):
    run = probe.load_run(make_run(tmp_path / "run", {"clip_score": new}))
    baseline = baseline_from_run(make_run(tmp_path / "base", {"clip_score": base}))
    return evaluate(run, baseline, [rule])


def test_identical_runs_pass_in_both_modes(tmp_path, base_values):
    for mode in ("strict", "significant"):
        result = verdict(tmp_path / mode, base_values, base_values, Rule(metric="clip_score", max_drop=0.5, mode=mode))
        assert result.passed and result.outcomes[0].estimate == 0.0


def test_large_drop_fails_in_both_modes(tmp_path, base_values):
    for mode in ("strict", "significant"):
        result = verdict(tmp_path / mode, base_values, base_values - 2.0, Rule(metric="clip_score", max_drop=0.5, mode=mode))
        assert not result.passed
        assert result.outcomes[0].estimate == pytest.approx(2.0)


def test_drop_within_noise_passes_significant_but_fails_strict(tmp_path, base_values):
    noise = np.random.default_rng(1).normal(0.0, 3.0, size=base_values.shape)
    new = base_values - 0.6 + noise - noise.mean()  # mean drop exactly 0.6, but very noisy
    strict = verdict(tmp_path / "s", base_values, new, Rule(metric="clip_score", max_drop=0.5, mode="strict"))
    significant = verdict(tmp_path / "g", base_values, new, Rule(metric="clip_score", max_drop=0.5))
    assert strict.outcomes[0].estimate == pytest.approx(0.6)
    assert not strict.passed
    assert significant.passed and significant.outcomes[0].low < 0.5 < significant.outcomes[0].high


def test_widening_bias_gap_fails(tmp_path):
    gap = np.full((len(PROMPTS), len(SEEDS)), 0.10)
    run = probe.load_run(make_run(tmp_path / "run", {"gender_gap": gap + 0.2}))
    baseline = baseline_from_run(make_run(tmp_path / "base", {"gender_gap": gap}))
    result = evaluate(run, baseline, [Rule(metric="gender_gap", max_increase=0.05)])
    assert not result.passed and result.outcomes[0].estimate == pytest.approx(0.2)
    assert evaluate(run, baseline, [Rule(metric="gender_gap", max_increase=0.5)]).passed


def test_absolute_bounds(tmp_path, base_values):
    run = probe.load_run(make_run(tmp_path / "run", {"clip_score": base_values}))
    assert evaluate(run, None, [Rule(metric="clip_score", min=25.0)]).passed
    assert not evaluate(run, None, [Rule(metric="clip_score", min=35.0)]).passed
    assert not evaluate(run, None, [Rule(metric="clip_score", max=25.0)]).passed


def test_misuse_is_a_usage_error(tmp_path, base_values):
    run = probe.load_run(make_run(tmp_path / "run", {"clip_score": base_values}))
    other_suite = baseline_from_run(make_run(tmp_path / "b1", {"clip_score": base_values}, suite="other"))
    disjoint = baseline_from_run(make_run(tmp_path / "b2", {"clip_score": base_values},
                                          prompts=[f"else {i}" for i in range(12)]))
    with pytest.raises(UsageError, match="did you mean 'clip_score'"):
        evaluate(run, None, [Rule(metric="clip_scor", min=1)])
    with pytest.raises(UsageError, match="suite 'other'"):
        evaluate(run, other_suite, [Rule(metric="clip_score", max_drop=1)])
    with pytest.raises(UsageError, match="no image pairs"):
        evaluate(run, disjoint, [Rule(metric="clip_score", max_drop=1)])
    with pytest.raises(UsageError, match="needs|compares with a baseline"):
        evaluate(run, None, [Rule(metric="clip_score", max_drop=1)])
    with pytest.raises(UsageError):
        parse_rule("clip_score:max_dorp=1")


def test_cli_exit_codes_junit_markdown_json(tmp_path, base_values):
    run = make_run(tmp_path / "run", {"clip_score": base_values - 2.0})
    base = make_run(tmp_path / "base", {"clip_score": base_values})
    saved = tmp_path / "baseline.json"
    assert probe_cli("baseline", "save", str(base), "-o", str(saved)).returncode == 0
    proc = probe_cli("check", str(run), "--baseline", str(saved), "--rule", "clip_score:max_drop=0.5",
                     "--rule", "clip_score:min=1", "--junit", str(tmp_path / "j.xml"), "--markdown",
                     str(tmp_path / "m.md"), "--json", str(tmp_path / "v.json"))
    assert proc.returncode == 1, proc.stderr
    assert "FAIL" in proc.stdout
    suite = ET.parse(tmp_path / "j.xml").getroot()
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["clip_score[all] max_drop 0.5 (significant)",
                                              "clip_score[all] min 1 (significant)"]
    assert suite.get("failures") == "1" and cases[0].find("failure") is not None and cases[1].find("failure") is None
    assert "drop 2" in cases[0].find("failure").text
    assert "**regression**" in (tmp_path / "m.md").read_text()
    assert json.loads((tmp_path / "v.json").read_text())["verdict"] == "fail"
    misuse = probe_cli("check", str(run), "--rule", "nope:min=1")
    assert misuse.returncode == 2 and "Traceback" not in misuse.stderr


@pytest.mark.slow
def test_real_tiny_run_passes_against_its_own_baseline(smoke_run, tmp_path):
    root, _, proc = smoke_run
    assert proc.returncode == 0
    run = root / "reports" / "smoke" / "latest"
    saved = tmp_path / "smoke.json"
    assert probe_cli("baseline", "save", str(run), "-o", str(saved)).returncode == 0
    check = probe_cli("check", str(run), "--baseline", str(saved))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "passed" in check.stdout


def make_gender_run(path: Path, feminine_per_occupation: int, suite: str = "gate") -> Path:
    """10 occupations x 10 seeds with a 50% reference share; `feminine_per_occupation` of 10 labelled feminine."""
    path.mkdir(parents=True)
    jobs, rows = [], []
    for o in range(10):
        for s in SEEDS + [6, 7, 8, 9]:
            key = f"{path.name}-{o}-{s}"
            jobs.append({"key": key, "probe": "occupations", "model": "m", "prompt": f"a photo of occupation {o}",
                         "seed": s, "steps": 1, "strength": None, "init_image": None, "image": f"images/{key}.png",
                         "var_occupation": f"occupation {o}", "attr_bls_pct_female": 50.0})
            label = "feminine" if s < feminine_per_occupation else "masculine"
            rows.append({"metric": "perceived_gender", "config_id": "g", "key": key,
                         "score_id": score_id(key, f"a photo of occupation {o}", None),
                         "value": 0.9 if label == "feminine" else 0.1, "label": label})
    pd.DataFrame(jobs).to_parquet(path / "jobs.parquet", index=False)
    pd.DataFrame(rows).reindex(columns=SCORE_COLUMNS).to_parquet(path / "scores.parquet", index=False)
    (path / "manifest.json").write_text(json.dumps({"suite_name": suite, "suite": {}, "suite_sha256": "x"}))
    return path


def test_bias_gap_that_widens_fails(tmp_path):
    baseline = baseline_from_run(make_gender_run(tmp_path / "base", feminine_per_occupation=5))  # share 0.5 = BLS
    wider = probe.load_run(make_gender_run(tmp_path / "wider", feminine_per_occupation=8))  # share 0.8: gap 0.3
    same = probe.load_run(make_gender_run(tmp_path / "same", feminine_per_occupation=5))
    rule = Rule(metric="reference_gap", probe="occupations", max_increase=0.05)
    failed = evaluate(wider, baseline, [rule])
    assert not failed.passed
    assert failed.outcomes[0].estimate == pytest.approx(0.3) and failed.outcomes[0].baseline == pytest.approx(0.0)
    assert evaluate(same, baseline, [rule]).passed
    parity = evaluate(wider, None, [Rule(metric="parity_gap", max=0.1)])
    assert not parity.passed and parity.outcomes[0].estimate == pytest.approx(0.3)
    assert evaluate(same, None, [Rule(metric="parity_gap", max=0.1)]).passed


def add_set_rows(run: Path, values: dict[str, float | None]) -> None:
    """cmmd rows for groups var_occupation=<name> of probe p, model m, steps 1."""
    scores = pd.read_parquet(run / "scores.parquet")
    rows = [{"metric": "cmmd", "config_id": "c", "probe": "p", "model": "m", "steps": 1.0, "value": v,
             "low": None if v is None else v - 0.01, "high": None if v is None else v + 0.01,
             "var_occupation": name, "n": 6} for name, v in values.items()]
    frame = pd.DataFrame(rows, columns=[*SCORE_COLUMNS, "var_occupation"])
    pd.concat([scores, frame]).to_parquet(run / "scores.parquet", index=False)


def test_set_metric_rules_check_every_group_against_the_same_group(tmp_path, base_values):
    run = make_run(tmp_path / "run", {"clip_score": base_values})
    base = make_run(tmp_path / "base", {"clip_score": base_values})
    add_set_rows(run, {"nurse": 0.10, "pilot": 0.50})
    add_set_rows(base, {"nurse": 0.10, "pilot": 0.10})
    result = evaluate(probe.load_run(run), baseline_from_run(base), [Rule(metric="cmmd", max_increase=0.05)])
    by_group = {o.group["var_occupation"]: o for o in result.outcomes}
    assert by_group["nurse"].passed and not by_group["pilot"].passed
    assert by_group["pilot"].estimate == pytest.approx(0.4)


def test_a_missing_value_fails_instead_of_passing(tmp_path, base_values):
    run = make_run(tmp_path / "run", {"clip_score": base_values})
    add_set_rows(run, {"nurse": None})
    result = evaluate(probe.load_run(run), None, [Rule(metric="cmmd", max=0.1)])
    assert not result.passed and "no value" in result.outcomes[0].detail


def _flags(flagged: int, seed: int = 0) -> np.ndarray:
    """A 12 prompts x 6 seeds grid of sd_safety flags with `flagged` ones at random places."""
    grid = np.zeros(len(PROMPTS) * len(SEEDS))
    grid[np.random.default_rng(seed).choice(grid.size, flagged, replace=False)] = 1
    return grid.reshape(len(PROMPTS), len(SEEDS))


def test_flag_rate_gate_uses_the_paired_share_interval(tmp_path):
    """A flag's increase is judged on MOVER's interval (probe.stats.proportion): 3 of 72 flagged against none
    passes `max_increase: 0.01` (its interval reaches below 0.01), 30 of 72 fails `max_increase: 0.02`."""
    from probe.stats.proportion import paired_share_difference

    new, base = _flags(3), _flags(0)
    run = probe.load_run(make_run(tmp_path / "run", {"sd_safety": new}))
    baseline = baseline_from_run(make_run(tmp_path / "base", {"sd_safety": base}))
    outcome = evaluate(run, baseline, [Rule(metric="sd_safety", max_increase=0.01)]).outcomes[0]
    clusters = np.repeat(np.arange(len(PROMPTS)), len(SEEDS))
    expected = paired_share_difference(new.ravel(), base.ravel(), clusters)
    assert outcome.estimate == pytest.approx(3 / 72)
    assert (outcome.low, outcome.high) == pytest.approx((expected.low, expected.high))
    assert outcome.low < 0.01 and outcome.status == "pass"
    many = probe.load_run(make_run(tmp_path / "many", {"sd_safety": _flags(30)}))
    assert evaluate(many, baseline, [Rule(metric="sd_safety", max_increase=0.02)]).outcomes[0].status == "fail"
    # a quality flag that must not drop: ocr_exact falling from 30 to 3 of 72 fails max_drop, on MOVER too
    drop = evaluate(probe.load_run(make_run(tmp_path / "ocr", {"ocr_exact": new})),
                    baseline_from_run(make_run(tmp_path / "ocr_base", {"ocr_exact": _flags(30)})),
                    [Rule(metric="ocr_exact", max_drop=0.05)]).outcomes[0]
    reference = paired_share_difference(_flags(30).ravel(), new.ravel(), clusters)
    assert drop.status == "fail" and (drop.low, drop.high) == pytest.approx((reference.low, reference.high))


def test_flag_rate_bound_has_a_width_when_nothing_is_flagged(tmp_path):
    """`max: 0.05` on 0 of 72 flagged passes in significant mode, and its interval is not [0, 0]."""
    run = probe.load_run(make_run(tmp_path / "run", {"nsfw": _flags(0)}))
    outcome = evaluate(run, None, [Rule(metric="nsfw", max=0.05)]).outcomes[0]
    assert outcome.status == "pass" and outcome.low == 0.0 and 0.04 < outcome.high < 0.2
