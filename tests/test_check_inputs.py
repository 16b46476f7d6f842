"""`probe check` and `probe baseline save` on bad inputs: a clear one-line error and exit 2, never a wrong pass
or a traceback. NaN / infinite thresholds, incomplete runs (refused unless --allow-incomplete, then a warning),
malformed baseline files and broken run folders, through the real CLI."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import probe
from probe.cli import app
from probe.errors import UsageError
from probe.gate.baseline import baseline_from_run
from probe.gate.rules import evaluate
from probe.spec.schema import Check
from tests.test_check import PROMPTS, SEEDS, make_run

FIXTURES = Path(__file__).parent / "fixtures"
N_IMAGES = len(PROMPTS) * len(SEEDS)
SUITE = {"name": "gate", "probes": [{"name": "p", "metrics": [{"name": "clip_score", "args": {}}]}]}


def cli(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def refused(result, *needles: str) -> None:
    """Exit 2 with a one-line message naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught exception
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture
def values() -> np.ndarray:
    return np.random.default_rng(0).normal(30.0, 2.0, size=(len(PROMPTS), len(SEEDS)))


def finished(path: Path, **manifest: object) -> Path:
    """Make `make_run`'s folder look like a finished `probe run`: status, counts, job statuses, the suite."""
    jobs = pd.read_parquet(path / "jobs.parquet").assign(status="generated")
    jobs.to_parquet(path / "jobs.parquet", index=False)
    record = json.loads((path / "manifest.json").read_text())
    record.update({"status": "complete", "suite": SUITE,
                   "counts": {"planned": len(jobs), "generated": len(jobs), "cached": 0, "failed": 0}, **manifest})
    (path / "manifest.json").write_text(json.dumps(record))
    return path


def runs(tmp_path: Path, values: np.ndarray, drop: float = 0.0) -> tuple[Path, Path]:
    """(run, baseline run): complete, the run's clip_score `drop` below the baseline's."""
    return (finished(make_run(tmp_path / "run", {"clip_score": values - drop})),
            finished(make_run(tmp_path / "base", {"clip_score": values})))


# --- thresholds that could never fail ---------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["clip_score:max_drop=nan", "clip_score:min=nan", "clip_score:max=NaN",
                                  "clip_score:max_increase=inf", "clip_score:max_drop=-inf", "clip_score:min=infinity",
                                  "clip_score:max_drop=nan,mode=strict"])
def test_a_non_finite_rule_threshold_is_refused(tmp_path, values, rule):
    run, base = runs(tmp_path, values, drop=5.0)  # a regression every finite max_drop below 5 catches
    result = cli("check", run, "--baseline", base, "--rule", rule)
    refused(result, "--rule", rule.split(":")[1].split("=")[0], "finite")


def test_a_nan_threshold_no_longer_passes_a_regression(tmp_path, values):
    run, base = runs(tmp_path, values, drop=5.0)
    assert cli("check", run, "--baseline", base, "--rule", "clip_score:max_drop=0.5").exit_code == 1
    assert cli("check", run, "--baseline", base, "--rule", "clip_score:max_drop=nan").exit_code == 2


@pytest.mark.parametrize("bound", ["max_increase", "max_drop", "min", "max"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_suite_check_is_refused(tmp_path, values, bound, value):
    """A run's recorded `checks:` (YAML `.nan` in a suite older validation let through) go through the same Rule."""
    run, base = runs(tmp_path, values, drop=5.0)
    suite = {**SUITE, "checks": [{"metric": "clip_score", bound: value}]}
    (run / "manifest.json").write_text(json.dumps({**json.loads((run / "manifest.json").read_text()),
                                                   "suite": suite}))
    refused(cli("check", run, "--baseline", base), "checks[0]", bound, "finite")


def test_the_gate_refuses_a_check_built_without_validation(tmp_path, values):
    """A Check made with model_construct (no validation) reaches evaluate(): it must not pass every group."""
    run, base = runs(tmp_path, values, drop=5.0)
    unchecked = Check.model_construct(metric="clip_score", probe=None, model=None, steps=None, min=None, max=None,
                                      max_drop=math.nan, max_increase=None, mode="significant")
    with pytest.raises(UsageError, match="finite"):
        evaluate(probe.load_run(run), baseline_from_run(base), [unchecked])


# --- incomplete runs --------------------------------------------------------------------------------------

def _running(run: Path) -> None:
    """Interrupted while scoring: status running, only 20 of the images scored (drill: n=20 of 50, exit 0)."""
    _edit_manifest(run, status="running", counts={"planned": N_IMAGES, "generated": 0, "cached": 0, "failed": 0})
    _keep_scores(run, 20)


def _failed_jobs(run: Path) -> None:
    jobs = pd.read_parquet(run / "jobs.parquet")
    jobs.loc[jobs.index[:3], ["status", "image"]] = ["failed", None]
    jobs.to_parquet(run / "jobs.parquet", index=False)
    _edit_manifest(run, status="failed", counts={"planned": N_IMAGES, "generated": N_IMAGES - 3, "cached": 0,
                                                 "failed": 3})


def _fewer_jobs(run: Path) -> None:
    _edit_manifest(run, counts={"planned": 100, "generated": 100, "cached": 0, "failed": 0})


def _jobs_without_images(run: Path) -> None:
    jobs = pd.read_parquet(run / "jobs.parquet")
    jobs.loc[jobs.index[:4], ["status", "image"]] = ["missing", None]
    jobs.to_parquet(run / "jobs.parquet", index=False)


def _scores_missing(run: Path) -> None:
    _keep_scores(run, N_IMAGES // 2)


def _score_failures(run: Path) -> None:
    _edit_manifest(run, status="failed", score_failures=[{"key": "k", "error": "score clip_score: boom"}])


def _edit_manifest(run: Path, **fields: object) -> None:
    (run / "manifest.json").write_text(json.dumps({**json.loads((run / "manifest.json").read_text()), **fields}))


def _keep_scores(run: Path, n: int) -> None:
    pd.read_parquet(run / "scores.parquet").head(n).to_parquet(run / "scores.parquet", index=False)


INCOMPLETE: dict[str, tuple[Callable[[Path], None], str]] = {
    "status running, scores half written": (_running, "status is 'running'"),
    "failed jobs": (_failed_jobs, f"3 of {N_IMAGES} jobs failed"),
    "fewer jobs than planned": (_fewer_jobs, f"jobs.parquet lists {N_IMAGES} of the 100 planned jobs"),
    "jobs without images": (_jobs_without_images, f"4 of {N_IMAGES} jobs have no image (status missing)"),
    "scores missing for a listed metric": (_scores_missing, f"clip_score in probe p has no score for "
                                                            f"{N_IMAGES // 2} of {N_IMAGES} images"),
    "score failures": (_score_failures, "1 score(s) could not be computed"),
}


@pytest.mark.parametrize("case", INCOMPLETE)
def test_an_incomplete_run_is_refused_unless_allowed(tmp_path, values, case):
    make_incomplete, what = INCOMPLETE[case]
    run, base = runs(tmp_path, values)
    make_incomplete(run)
    refused(cli("check", run, "--baseline", base, "--rule", "clip_score:max_drop=0.5"),
            f"run {run}", "incomplete", what, "--allow-incomplete")
    allowed = cli("check", run, "--baseline", base, "--rule", "clip_score:max_drop=0.5", "--allow-incomplete",
                  "--json", tmp_path / "v.json")
    assert allowed.exit_code in (0, 1), allowed.output
    assert "warning:" in allowed.stderr and what in allowed.stderr and "incomplete" in allowed.stderr
    assert any(what in w for w in json.loads((tmp_path / "v.json").read_text())["warnings"])


def test_the_drilled_half_finished_run_no_longer_passes_silently(tmp_path, values):
    run, base = runs(tmp_path, values)
    _running(run)
    refused(cli("check", run, "--baseline", base, "--rule", "clip_score:max_drop=0.5"), "incomplete")
    allowed = cli("check", run, "--baseline", base, "--rule", "clip_score:max_drop=0.5", "--allow-incomplete")
    assert allowed.exit_code == 0 and "n=20" in allowed.stdout  # gated on what there is, and said so
    assert "incomplete" in allowed.stderr


@pytest.mark.parametrize("case", INCOMPLETE)
def test_an_incomplete_baseline_run_is_refused_unless_allowed(tmp_path, values, case):
    make_incomplete, what = INCOMPLETE[case]
    run, base = runs(tmp_path, values)
    make_incomplete(base)
    refused(cli("check", run, "--baseline", base, "--rule", "clip_score:max_drop=0.5"),
            f"--baseline {base}", "incomplete", what)
    refused(cli("baseline", "save", base, "-o", tmp_path / "b.json"), f"run {base}", "incomplete", what)
    assert not (tmp_path / "b.json").exists()
    allowed = cli("check", run, "--baseline", base, "--rule", "clip_score:max_drop=0.5", "--allow-incomplete")
    assert allowed.exit_code in (0, 1) and what in allowed.stderr


def test_a_baseline_file_saved_from_an_incomplete_run_is_refused_in_turn(tmp_path, values):
    run, base = runs(tmp_path, values)
    _failed_jobs(base)
    saved = cli("baseline", "save", base, "-o", tmp_path / "b.json", "--allow-incomplete")
    assert saved.exit_code == 0 and "warning:" in saved.stderr and "3 of" in saved.stderr
    refused(cli("check", run, "--baseline", tmp_path / "b.json", "--rule", "clip_score:max_drop=0.5"),
            "the run it was saved from is incomplete", "3 of 72 planned jobs failed")
    allowed = cli("check", run, "--baseline", tmp_path / "b.json", "--rule", "clip_score:max_drop=0.5",
                  "--allow-incomplete")
    assert allowed.exit_code == 0 and "3 of 72 planned jobs failed" in allowed.stderr


# --- malformed baselines and run folders ------------------------------------------------------------------

def _saved(tmp_path: Path, base: Path) -> bytes:
    assert cli("baseline", "save", base, "-o", tmp_path / "good.json").exit_code == 0
    return (tmp_path / "good.json").read_bytes()


BAD_FILES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "a JSON array": (lambda good: b"[]", "not a probe baseline (a JSON list"),
    "a JSON string": (lambda good: b'"hello"', "not a probe baseline (a JSON str"),
    "another format": (lambda good: b'{"format": "x"}', "format 'x'"),
    "no per_image": (lambda good: json.dumps({"format": "probe-baseline/1", "suite_name": "gate"}).encode(),
                     "per_image: Field required"),
    "per_image a string": (lambda good: _with(good, per_image="oops"), "per_image: Input should be a valid list"),
    "a per_image row not an object": (lambda good: _with(good, per_image=[1]), "per_image.0"),
    "a value that is text": (lambda good: _with_row(good, value="abc"), "per_image.0.value"),
    "a row without metric": (lambda good: _with_row(good, metric=None), "per_image.0.metric"),
    "sets a string": (lambda good: _with(good, sets="x"), "sets: Input should be a valid list"),
    "a bad status": (lambda good: _with(good, provenance={"status": "weird"}), "provenance.status"),
    "not UTF-8": (lambda good: b"\xff\xfe" + good, "not UTF-8 text (byte 0xff at offset 0)"),
    "truncated": (lambda good: good[: len(good) // 2], "not valid JSON, truncated or corrupt?"),
    "empty": (lambda good: b"", "empty file"),
}


def _with(good: bytes, **fields: object) -> bytes:
    return json.dumps({**json.loads(good), **fields}).encode()


def _with_row(good: bytes, **fields: object) -> bytes:
    payload = json.loads(good)
    payload["per_image"][0].update(fields)
    return json.dumps(payload).encode()


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_malformed_baseline_file_is_a_clear_error(tmp_path, values, case):
    corrupt, what = BAD_FILES[case]
    run, base = runs(tmp_path, values)
    bad = tmp_path / "bad.json"
    bad.write_bytes(corrupt(_saved(tmp_path, base)))
    refused(cli("check", run, "--baseline", bad, "--rule", "clip_score:max_drop=0.5"), f"--baseline {bad}", what)


def _garbage(file: str) -> Callable[[Path], None]:
    return lambda run: (run / file).write_bytes(b"PAR1 this is not parquet")


def _truncated(file: str) -> Callable[[Path], None]:
    return lambda run: (run / file).write_bytes((run / file).read_bytes()[:200])


def _drop_column(run: Path) -> None:
    pd.read_parquet(run / "jobs.parquet").drop(columns="prompt").to_parquet(run / "jobs.parquet", index=False)


BAD_FOLDERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "no jobs.parquet": (lambda run: (run / "jobs.parquet").unlink(), "jobs.parquet: missing"),
    "a corrupt jobs.parquet": (_garbage("jobs.parquet"), "jobs.parquet: cannot be read"),
    "a truncated jobs.parquet": (_truncated("jobs.parquet"), "jobs.parquet: cannot be read"),
    "jobs.parquet without prompts": (_drop_column, "jobs.parquet: lacks the column(s) prompt"),
    "a corrupt scores.parquet": (_garbage("scores.parquet"), "scores.parquet"),  # read_scores words it
    "manifest.json not JSON": (lambda run: (run / "manifest.json").write_text("{"), "manifest.json: not valid JSON"),
    "manifest.json not UTF-8": (lambda run: (run / "manifest.json").write_bytes(b"\x80{}"), "manifest.json: not UTF-8"),
    "manifest.json an array": (lambda run: (run / "manifest.json").write_text("[]"), "not a run manifest (a JSON list"),
    "manifest.json without suite_name": (lambda run: (run / "manifest.json").write_text("{}"), "suite_name"),
    "no manifest.json": (lambda run: (run / "manifest.json").unlink(), "is not a run directory (no manifest.json)"),
}


@pytest.mark.parametrize("side", ["run", "baseline"])
@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_a_broken_run_folder_is_a_clear_error(tmp_path, values, case, side):
    breaking, what = BAD_FOLDERS[case]
    run, base = runs(tmp_path, values)
    folder = run if side == "run" else base
    breaking(folder)
    refused(cli("check", run, "--baseline", base, "--rule", "clip_score:max_drop=0.5"), str(folder), what)


def test_missing_paths_and_unwritable_outputs_are_clear_errors(tmp_path, values):
    run, base = runs(tmp_path, values)
    refused(cli("check", tmp_path / "nowhere", "--rule", "clip_score:min=1"), "not a run directory")
    refused(cli("check", run, "--baseline", tmp_path / "none.json", "--rule", "clip_score:max_drop=1"),
            "no such file or run directory")
    (tmp_path / "taken").mkdir()
    refused(cli("check", run, "--rule", "clip_score:min=1", "--json", tmp_path / "taken"), "cannot write")
    refused(cli("baseline", "save", base, "-o", tmp_path / "taken"), "cannot write")


# --- valid inputs still work ------------------------------------------------------------------------------

def test_complete_runs_and_their_baseline_files_still_gate(tmp_path, values):
    run, base = runs(tmp_path, values)
    saved = cli("baseline", "save", base, "-o", tmp_path / "b.json")
    assert saved.exit_code == 0 and "warning" not in saved.output
    assert json.loads((tmp_path / "b.json").read_text())["provenance"]["status"] == "complete"
    for baseline in (tmp_path / "b.json", base):
        passed = cli("check", run, "--baseline", baseline, "--rule", "clip_score:max_drop=0.5",
                     "--rule", "clip_score:min=1e-3,steps=1,mode=strict")
        assert passed.exit_code == 0, passed.output
        assert "warning" not in passed.output
    run2, base2 = runs(tmp_path / "drop", values, drop=5.0)
    assert cli("check", run2, "--baseline", base2, "--rule", "clip_score:max_drop=0.5").exit_code == 1


def test_folders_written_by_earlier_versions_still_gate():
    """Complete runs of schema 2 and a baseline file of that time pass the new checks."""
    run = FIXTURES / "run-v2"
    for baseline in (run, FIXTURES / "baseline-v2.json"):
        result = cli("check", run, "--baseline", baseline, "--rule", "clip_score:max_drop=1,mode=strict")
        assert result.exit_code == 0, result.output


def test_hand_built_runs_without_status_or_counts_still_gate(tmp_path, values):
    """A folder with no status, counts or job statuses (older or hand-made) has nothing that says it is
    incomplete: it is gated as before."""
    run = make_run(tmp_path / "run", {"clip_score": values})
    base = make_run(tmp_path / "base", {"clip_score": values})
    assert cli("check", run, "--baseline", base, "--rule", "clip_score:max_drop=0.5").exit_code == 0

