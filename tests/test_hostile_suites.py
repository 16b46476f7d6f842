"""Hostile and broken suites: each is refused by `probe suites validate` (and `probe run`) with exit code 2,
one line naming the file, the line and the field, no traceback, quickly, and before anything is made.

The cases are a corpus, tests/hostile/*.yaml, one file each, with a header the tests read:

    # Tests: what the file tries              # Field: the field path the error must name
    # Expect: text the message must contain   # Setup: KIND NAME [ARG]  (files made beside the copy, repeatable)
    # Run: yes   (also `probe run --model tiny`)   # Bomb: yes   (in a subprocess with a timeout, so a hang fails)

Setup kinds: text, png, truncated_png, huge_png (a header declaring 100000x100000), link NAME TARGET, and
write NAME TEXT (TEXT with \\n escapes).
"""

from __future__ import annotations

import glob
import inspect
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from probe.cli.commands import app
from probe.spec import limits
from probe.spec.loader import SuiteError, load_suite
from tests.conftest import SUITES, probe_cli

CORPUS = Path(__file__).parent / "hostile"
BOUND_S = 20.0  # every refusal is quick; a bomb that expands would take minutes or run out of memory


@dataclass(frozen=True)
class Case:
    path: Path
    tests: str
    field: str
    expect: str
    setup: tuple[str, ...] = ()
    run: bool = False
    bomb: bool = False


def read_case(path: Path) -> Case:
    header: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"# (\w+): (.*)", line)
        if match is None:
            break
        header.setdefault(match[1].lower(), []).append(match[2])
    return Case(path=path, tests=header["tests"][0], field=header["field"][0], expect=header["expect"][0],
                setup=tuple(header.get("setup", [])), run="run" in header, bomb="bomb" in header)


CASES = [read_case(p) for p in sorted(CORPUS.glob("*.yaml"))]


def _png(size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 120, 40)).save(buffer, "PNG")
    return buffer.getvalue()


def _huge_png_header(side: int = 100_000) -> bytes:
    """A valid PNG signature and IHDR declaring side x side pixels, then IEND: 57 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def stage(case: Case, folder: Path) -> Path:
    """Copy the case into `folder` and make the files its header asks for; returns the suite's path."""
    suite = folder / case.path.name
    shutil.copy(case.path, suite)
    for entry in case.setup:
        kind, name, *rest = entry.split(" ", 2)
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if kind == "text":
            target.write_text("this is not an image\n")
        elif kind == "png":
            target.write_bytes(_png())
        elif kind == "truncated_png":
            data = _png((64, 64))
            target.write_bytes(data[: len(data) // 2])
        elif kind == "huge_png":
            target.write_bytes(_huge_png_header())
        elif kind == "link":
            target.symlink_to(rest[0])
        elif kind == "write":
            target.write_text(rest[0].encode().decode("unicode_escape"))
        else:
            raise AssertionError(f"{case.path.name}: unknown setup kind {kind!r}")
    return suite


def assert_refused(case: Case, suite: Path, code: int, output: str, seconds: float, bound: float = BOUND_S) -> None:
    assert code == 2, output
    assert "Traceback" not in output, output
    assert seconds < bound, f"{case.path.name} took {seconds:.1f} s"
    where = re.escape(str(suite)) + r":(\d+): "
    where += "" if case.field == "(top level)" else re.escape(case.field) + ": "
    lines = [m for line in output.splitlines() if (m := re.match(where + r"(.*)", line))]
    assert lines, f"no line names {suite}:<line>: {case.field}:\n{output}"
    assert any(case.expect in m[2] for m in lines), f"{case.expect!r} not in the message:\n{output}"
    assert all(int(m[1]) >= 1 for m in lines)


def test_the_corpus_is_well_formed():
    assert len(CASES) >= 40
    for case in CASES:
        assert case.tests and case.field and case.expect, case.path.name


@pytest.mark.parametrize("case", CASES, ids=[c.path.stem for c in CASES])
def test_validate_refuses(case: Case, tmp_path: Path):
    suite = stage(case, tmp_path)
    started = time.monotonic()
    if case.bomb:  # a subprocess with a timeout: a bomb that goes off fails the test instead of hanging CI
        proc = probe_cli("suites", "validate", str(suite), timeout=BOUND_S)
        code, output = proc.returncode, proc.stdout + proc.stderr
    else:
        result = CliRunner().invoke(app, ["suites", "validate", str(suite)])
        code, output = result.exit_code, result.output
    assert_refused(case, suite, code, output, time.monotonic() - started)


RUN_CASES = [c for c in CASES if c.run]


@pytest.mark.parametrize("case", RUN_CASES, ids=[c.path.stem for c in RUN_CASES])
def test_run_refuses_before_making_anything(case: Case, tmp_path: Path):
    suite = stage(case, tmp_path)
    reports = tmp_path / "reports"
    started = time.monotonic()
    proc = probe_cli("run", str(suite), "--model", "tiny", "--out", str(reports), timeout=60)
    output = proc.stdout + proc.stderr
    assert_refused(case, suite, proc.returncode, output, time.monotonic() - started, bound=60)  # run imports torch
    assert not reports.exists(), "a refused run made its reports folder"


def test_run_and_validate_take_max_jobs(tmp_path: Path):
    smoke = str(SUITES / "smoke.yaml")
    low = CliRunner().invoke(app, ["suites", "validate", smoke, "--max-jobs", "10"])
    assert low.exit_code == 2 and "the limit is 10: raise it with --max-jobs" in low.output, low.output
    assert CliRunner().invoke(app, ["suites", "validate", smoke, "--max-jobs", "46"]).exit_code == 0
    # `probe run` hands a path to the driver: the limit must reach the driver's own load_suite
    reports = tmp_path / "reports"
    proc = probe_cli("run", smoke, "--model", "tiny", "--out", str(reports), "--max-jobs", "10", timeout=60)
    assert proc.returncode == 2 and "the limit is 10" in proc.stderr, proc.stdout + proc.stderr
    assert not reports.exists()


@pytest.mark.parametrize("name", sorted(p.name for p in SUITES.glob("*.yaml")))
def test_the_count_made_before_expanding_is_the_plans_size(name: str):
    """The limit is checked on a count computed from the grid's sizes; it must be the planner's count."""
    from probe.planning.planner import count_jobs, plan_jobs
    from probe.spec.checks import job_count

    loaded = load_suite(SUITES / name)
    planned = count_jobs(plan_jobs(loaded))
    for probe in loaded.suite.probes:
        counted, _ = job_count(loaded.suite, probe, [len(loaded.prompts[probe.name])], len(loaded.init_images[probe.name]))
        assert counted == sum(n for (p, _), n in planned.items() if p == probe.name), probe.name
    total = sum(planned.values())
    assert load_suite(SUITES / name, max_jobs=total).suite.name == loaded.suite.name
    with pytest.raises(SuiteError, match=f"the limit is {total - 1:,}: raise it with --max-jobs"):
        load_suite(SUITES / name, max_jobs=total - 1)


def test_raising_max_jobs_lets_a_big_suite_through():
    suite = CORPUS / "suite_total_over_limit.yaml"
    with pytest.raises(SuiteError, match="the suite plans 120,000 jobs"):
        load_suite(suite)
    loaded = load_suite(suite, max_jobs=120_000)
    assert [len(p.seeds or []) for p in loaded.suite.probes] == [60_000, 60_000]
    with limits.allow_jobs(120_000):  # for callers that hand a path on and cannot pass max_jobs
        assert load_suite(suite).suite.name == "hostile"
    with pytest.raises(SuiteError):
        load_suite(suite)  # the context ends with the block


@pytest.mark.parametrize("make", ["file", "file_parent"])
def test_run_refuses_an_out_that_is_a_file(make: str, tmp_path: Path):
    blocker = tmp_path / "taken"
    blocker.write_text("a file where the reports folder would go")
    out = blocker if make == "file" else blocker / "reports"
    result = CliRunner().invoke(app, ["run", str(SUITES / "smoke.yaml"), "--model", "tiny", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert f"--out {out}" in result.output and "is a file" in result.output and "Traceback" not in result.output
    assert blocker.read_text().startswith("a file")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_run_refuses_an_unwritable_out(tmp_path: Path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = CliRunner().invoke(app, ["run", str(SUITES / "smoke.yaml"), "--model", "tiny",
                                          "--out", str(locked / "reports")])
    finally:
        locked.chmod(0o700)
    assert result.exit_code == 2 and "is not writable" in result.output, result.output
    assert not (locked / "reports").exists()


def test_an_unwritable_out_is_named_even_when_running_as_root(tmp_path: Path, monkeypatch):
    """os.access is what decides; as root it always says yes, so the refusal is simulated."""
    from probe.run import options

    monkeypatch.setattr(options.os, "access", lambda path, mode: Path(path) != tmp_path)
    assert options.folder_problem(tmp_path / "reports" / "deeper", "--out") == (
        f"--out {tmp_path / 'reports' / 'deeper'}: {tmp_path} is not writable")
    assert options.folder_problem(tmp_path.parent, "--out") is None


def test_run_refuses_a_missing_clip_model_folder(tmp_path: Path):
    result = CliRunner().invoke(app, ["run", str(SUITES / "smoke.yaml"), "--model", "tiny", "--out",
                                      str(tmp_path / "reports"), "--clip-model", str(tmp_path / "no-clip")])
    assert result.exit_code == 2 and "--clip-model: clip_model" in result.output, result.output
    assert not (tmp_path / "reports").exists()


def test_glob_walks_are_bounded(tmp_path: Path, write_suite, monkeypatch):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(60):
        (folder / f"{i}.txt").write_text("")
    monkeypatch.setattr(limits, "MAX_GLOB_ENTRIES", 50)
    path = write_suite("""
        name: ok
        models: [tiny]
        probes:
          - {name: p, kind: img2img, prompts: [x], init_images: ["many/**/*.png"], steps: [4], strength: [0.5]}
    """)
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert [(line, message) for line, _, message in info.value.problems] == [
        (4, "'" + str(tmp_path / "many/**/*.png") + "' looks at more than 50 directory entries; narrow the "
            "pattern (e.g. a folder instead of **)")]


def test_bounded_glob_matches_glob(tmp_path: Path):
    """The bounded walk keeps glob.glob(recursive=True)'s answers: hidden names, ** as zero folders, literals."""
    for name in ("a.png", "b.jpg", ".hidden.png", "sub/c.png", "sub/deeper/d.png", ".dot/e.png", "sub/.f.png",
                 "a-b/g.png", "a/h.png"):  # a-b/ sorts before a/ as a string, after it as path parts
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    for pattern in ("*.png", "**/*.png", "sub/**/*.png", "sub/*/d.png", "*/deeper/*.png", ".*.png", "s?b/c.png",
                    "[ab].*", "a.png", "sub/../a.png", "a*/*.png"):
        expected = [Path(p) for p in sorted(glob.glob(str(tmp_path / pattern), recursive=True)) if Path(p).is_file()]
        assert limits.bounded_glob(str(tmp_path / pattern), limits.EntryBudget()) == expected, pattern


def test_a_suite_file_past_the_size_bound_is_refused_unread(tmp_path: Path):
    big = tmp_path / "big.yaml"
    big.write_text("name: ok\n" + "#" * limits.MAX_SUITE_BYTES + "\n")
    with pytest.raises(SuiteError) as info:
        load_suite(big)
    assert "a suite may be at most" in str(info.value)


def test_init_images_are_decoded_and_good_ones_pass(write_suite, tmp_path: Path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "ok.png").write_bytes(_png())
    path = write_suite("""
        name: ok
        models: [tiny]
        probes:
          - {name: p, kind: img2img, prompts: [x], init_images: [images/*.png], steps: [4], strength: [0.5]}
    """)
    assert [i.path for i in load_suite(path).init_images["p"]] == ["images/ok.png"]


def test_metric_params_match_the_implementations():
    """The catalog's `params` are what the loader checks args against: they must be the constructors' own."""
    from probe.score.metrics.faces import FaceSettings
    from probe.score.protocol import _import_target
    from probe.spec.metric_catalog import FACE_PARAMS, METRICS

    faces = {f.name for f in FaceSettings.__dataclass_fields__.values()}
    assert set(FACE_PARAMS) == faces
    for name in ("clip_score", "cmmd", "faces", "skin_tone", "perceived_gender", "ocr", "fid", "kid"):
        info = METRICS[name]
        params = inspect.signature(_import_target(info)).parameters.values()
        accepted = {p.name for p in params if p.kind is not p.VAR_KEYWORD} or faces  # faces takes **settings
        assert set(info.params or {}) == accepted, name


def test_shipped_suites_still_validate():
    files = sorted(str(p) for p in SUITES.glob("*.yaml"))
    result = CliRunner().invoke(app, ["suites", "validate", *files])
    assert result.exit_code == 0, result.output
    assert sum(f"{f}: ok, " in result.output for f in files) == len(files)


def test_validate_of_a_bomb_does_not_import_torch(tmp_path: Path):
    suite = stage(next(c for c in CASES if c.path.stem == "billion_laughs"), tmp_path)
    code = ("import sys; from typer.testing import CliRunner; from probe.cli.commands import app;"
            f"r = CliRunner().invoke(app, ['suites', 'validate', {str(suite)!r}]); print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=BOUND_S)
    assert proc.stdout.strip().splitlines()[-1] == "False"
