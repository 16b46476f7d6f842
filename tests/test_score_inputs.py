"""`probe score` on bad inputs: each is one clear error line and exit 2 before any work (no folder made, no
model loaded), never a traceback; valid inputs still score, and the result gates."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from probe.cli import app

OK = "file,prompt\n0.png,a red square\n1.png,a green square\n2.png,a blue square\n"


def cli(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    """tmp_path with imgs/ (0-2.png), ref/ (three images), empty/ and ok.csv listing imgs/."""
    for name in ("imgs", "ref", "empty"):
        (tmp_path / name).mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 20, 200 - 60 * i)).save(tmp_path / "imgs" / f"{i}.png")
        Image.new("RGB", (32, 32), (10, 70 * i, 30)).save(tmp_path / "ref" / f"r{i}.png")
    (tmp_path / "ok.csv").write_text(OK)
    return tmp_path


def table(text: str | bytes, name: str = "t.csv") -> Callable[[Path], list[str]]:
    """A case whose prompts table holds `text`."""
    def build(root: Path) -> list[str]:
        path = root / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return ["--prompts", str(path)]
    return build


def options(*extra: str) -> Callable[[Path], list[str]]:
    """A case with the valid table and these options (ROOT in them is the test folder)."""
    return lambda root: ["--prompts", str(root / "ok.csv"), *(e.replace("ROOT", str(root)) for e in extra)]


def _corrupt_reference(root: Path) -> list[str]:
    (root / "ref" / "broken.png").write_bytes(b"\x89PNG not really")
    return ["--prompts", str(root / "ok.csv"), "--metrics", "cmmd", "--reference", str(root / "ref")]


CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "CSV not UTF-8": (table("file,prompt\n0.png,caf\xe9\n".encode("latin-1")), "not UTF-8 text (byte 0xe9"),
    "JSONL not UTF-8": (table(b'{"file": "0.png", "prompt": "caf\xe9"}\n', "t.jsonl"), "not UTF-8 text"),
    "unknown metric argument": (options("--metrics", "clip_score:bogus=1"),
                                "clip_score has no argument 'bogus' (it accepts: batch_size)"),
    "misspelt metric argument": (options("--metrics", "kid:subset_sise=50", "--reference", "ROOT/ref"),
                                 "did you mean 'subset_size'?"),
    "metric argument of the wrong type": (options("--metrics", "kid:subset_size=abc", "--reference", "ROOT/ref"),
                                          "kid argument subset_size='abc': Input should be a valid integer"),
    "metric argument not a choice": (options("--metrics", "kid:features=clap", "--reference", "ROOT/ref"),
                                     "'inception' or 'clip'"),
    "metric arguments without =": (options("--metrics", "kid:features"), "arguments look like name:key=value"),
    "unknown metric": (options("--metrics", "clip_scor"), "unknown metric 'clip_scor' (did you mean 'clip_score'"),
    "metric listed twice": (options("--metrics", "clip_score", "--metrics", "clip_score"), "listed twice"),
    "empty --reference": (options("--metrics", "cmmd", "--reference", "ROOT/empty"), "no images in --reference"),
    "--reference a file": (options("--metrics", "cmmd", "--reference", "ROOT/ok.csv"), "not a folder"),
    "--reference missing": (options("--metrics", "cmmd", "--reference", "ROOT/nowhere"), "no such folder"),
    "--reference with a broken image": (_corrupt_reference, "broken.png is not a readable image"),
    "listed images missing": (table(OK + "nope.png,x\n"), "1 listed image(s) not found in"),
    "no file column": (table("image,prompt\n0.png,x\n"), "needs a 'file' column"),
    "no prompt column": (table("file,caption\n0.png,x\n"), "needs a 'prompt' column"),
    "a row without a prompt": (table("file,prompt\n0.png,x\n1.png,\n"), "row 3: needs `file` and `prompt`"),
    "duplicate rows": (table("file,prompt\n0.png,x\n1.png,y\n0.png,x\n"), "rows 2 and 4 list the same image twice"),
    "two images for one seeded item": (table("file,prompt,seed\n0.png,x,1\n1.png,x,1\n"),
                                       "rows 2 and 3 list two images for one model, prompt and seed"),
    "more values than columns": (table("file,prompt\n0.png,a,b\n"), "more values than the 2 columns"),
    "a column named twice": (table("file,prompt,prompt\n0.png,a,b\n"), "'prompt' more than once"),
    "an unterminated quote": (table('file,prompt\n0.png,"open\n'), "not readable as CSV"),
    "a JSONL line that is no object": (table('["0.png", "x"]\n', "t.jsonl"), "not a JSON object"),
    "a seed that is no number": (table("file,prompt,seed\n0.png,x,one\n"), "seed 'one' is not a whole number"),
    "no rows": (table("file,prompt\n"), "no rows"),
    "prompts file missing": (lambda root: ["--prompts", str(root / "none.csv")], "prompts file not found"),
    "prompts file a folder": (lambda root: ["--prompts", str(root / "empty")], "a folder, not a prompts file"),
    "--out a file": (options("--out", "ROOT/ok.csv"), "not a folder"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_is_one_error_line_and_exit_2_before_any_work(folders, case):
    build, needle = CASES[case]
    args = build(folders)
    out = [] if "--out" in args else ["--out", str(folders / "reports")]
    result = cli("score", folders / "imgs", *args, *out, "--clip-model", "tiny")
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.output
    assert not (folders / "reports").exists(), "nothing may be made before the inputs are known to be good"


@pytest.mark.parametrize("images", ["nowhere", "ok.csv"])
def test_an_images_folder_that_is_not_one_is_named(folders, images):
    result = cli("score", folders / images, "--prompts", folders / "ok.csv", "--out", folders / "reports")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{folders / images}: {'no such folder' if images == 'nowhere' else 'not a folder'}" in result.output


def test_valid_tables_still_score_and_the_result_gates(folders):
    """A BOM-prefixed UTF-8 table, one file under two prompts and seeded rows of two models are all fine; the
    scored run is complete, so `probe check` gates it without --allow-incomplete."""
    text = "\ufefffile,prompt,model,seed\n0.png,a red square,m1,0\n0.png,a red thing,m1,1\n1.png,a red square,m2,0\n"
    (folders / "t.csv").write_text(text, encoding="utf-8")
    result = cli("score", folders / "imgs", "--prompts", folders / "t.csv", "--clip-model", "tiny",
                 "--out", folders / "reports", "--cache-dir", folders / "cache")
    assert result.exit_code == 0, result.output
    run = (folders / "reports" / "score-imgs" / "latest").resolve()
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
    gated = cli("check", run, "--rule", "clip_score:min=0,mode=strict")
    assert gated.exit_code == 0, gated.output
    assert "warning" not in gated.output
