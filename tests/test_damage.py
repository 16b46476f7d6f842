"""The torn-and-corrupt drill as a corpus: each case damages a finished run folder or the cache the way a
crash, a full disk or a bad copy would; the next `probe run` must end with the numbers of an undamaged run
(nothing lost, nothing stale reused), and a reader (`probe report`) must refuse what it cannot read in one line.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from probe.run.driver import run_suite
from probe.run.options import RunOptions
from tests.conftest import probe_cli, score_rows

SUITE = """
name: damage
models: [tiny]
seeds: 2
probes:
  - name: quality
    prompts: [a red apple on a table, a lighthouse at dusk]
    steps: [1]
    metrics: [clip_score, {name: cmmd, reference: {folder: ref}}]
  - name: signs
    kind: text
    prompts:
      - {text: OPEN, prompt: 'a shop sign that says "OPEN"'}
    steps: [1]
    metrics: [ocr]
"""


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run with its cache, copied by every case: <root>/suite.yaml, cache/, out/damage/<run>."""
    from PIL import Image

    root = tmp_path_factory.mktemp("clean")
    (root / "suite.yaml").write_text(SUITE, encoding="utf-8")
    (root / "ref").mkdir()
    for i, colour in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
        Image.new("RGB", (64, 64), colour).save(root / "ref" / f"{i}.png")
    summary = run_suite(root / "suite.yaml", RunOptions(reports_root=root / "out", cache_dir=root / "cache"))
    assert summary.report is not None and not summary.failures
    return root


def _run_dir(root: Path) -> Path:
    return max((p for p in (root / "out" / "damage").iterdir() if p.is_dir() and not p.is_symlink()),
               key=lambda p: p.name)


def _keys(root: Path) -> list[str]:
    return list(pd.read_parquet(_run_dir(root) / "jobs.parquet")["key"])


def _png(root: Path, index: int = 0) -> Path:
    key = _keys(root)[index]
    return root / "cache" / "images" / key[:2] / f"{key}.png"


def _unfinished(root: Path) -> Path:
    """The run folder, made resumable (as if killed before its report), so the next run works in it."""
    run = _run_dir(root)
    (run / "index.html").unlink()
    return run


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as handle:
        handle.write(data)


def _feature_blob(root: Path, dtype: str, data: bytes) -> None:
    """Overwrite one stored vector of the feature database (the first by key order)."""
    with sqlite3.connect(root / "cache" / "features.sqlite") as db:
        extractor, item = db.execute("SELECT extractor, item FROM features ORDER BY item LIMIT 1").fetchone()
        db.execute("UPDATE features SET dtype = ?, data = ? WHERE extractor = ? AND item = ?", (dtype, data, extractor,
                                                                                               item))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


REPAIRED: dict[str, Callable[[Path], None]] = {
    "progress log: torn last line": lambda r: _append(_unfinished(r) / "progress.jsonl", b'{"key": "ab'),
    "progress log: invalid UTF-8": lambda r: _append(_unfinished(r) / "progress.jsonl", b"\xff\xfe\xc3\n"),
    "progress log: emptied": lambda r: (_unfinished(r) / "progress.jsonl").write_bytes(b""),
    "progress log: deleted": lambda r: (_unfinished(r) / "progress.jsonl").unlink(),
    "cached image: truncated": lambda r: _png(r).write_bytes(_png(r).read_bytes()[:300]),
    "cached image: a flipped byte": lambda r: _flip(_png(r)),
    "cached image: another key's image": lambda r: _png(r, 0).write_bytes(_png(r, 1).read_bytes()),
    "cached image: empty": lambda r: _png(r).write_bytes(b""),
    "run-folder image: deleted": lambda r: next((_unfinished(r) / "images").rglob("*.png")).unlink(),
    "run-folder image: a truncated copy": lambda r: _truncate_copy(next((_unfinished(r) / "images").rglob("*.png"))),
    "score cache: not a database": lambda r: _garbage_db(r / "cache" / "scores.sqlite"),
    "score cache: records that do not parse": lambda r: _bad_records(r / "cache" / "scores.sqlite"),
    "score cache: an image with part of its rows": lambda r: _partial_record(r / "cache" / "scores.sqlite"),
    "feature cache: torn vector": lambda r: _feature_blob(r, "<f4", b"\x93NUMPY"),
    "feature cache: vector of another width": lambda r: _feature_blob(r, "<f8", np.ones(5).tobytes()),
    "feature cache: not a database": lambda r: _garbage_db(r / "cache" / "features.sqlite"),
    "scores.parquet: truncated": lambda r: _truncate(_unfinished(r) / "scores.parquet"),
    "jobs.parquet: truncated": lambda r: _truncate(_unfinished(r) / "jobs.parquet"),
    "manifest.json: truncated": lambda r: _truncate(_run_dir(r) / "manifest.json"),
    "stray temporary files": lambda r: _strays(r),
    "latest link: dangling": lambda r: _dangle(r / "out" / "damage" / "latest"),
}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


def _truncate_copy(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()  # break the hard link: the store's file stays whole
    path.write_bytes(data[: len(data) // 2])


def _garbage_db(path: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.write_bytes(b"not a database at all " * 64)


def _bad_records(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE scores SET rows = 'null' WHERE rowid IN (SELECT rowid FROM scores LIMIT 2)")
        db.execute("UPDATE scores SET rows = '{\"a\": 1}' WHERE rowid IN (SELECT rowid FROM scores LIMIT 1 OFFSET 2)")


def _partial_record(path: Path) -> None:
    import json

    with sqlite3.connect(path) as db:
        config_id, score_id, rows = db.execute("SELECT config_id, score_id, rows FROM scores WHERE rows LIKE "
                                               "'%ocr_cer%' LIMIT 1").fetchone()
        kept = [r for r in json.loads(rows) if r["metric"] == "ocr_exact"]
        db.execute("UPDATE scores SET rows = ? WHERE config_id = ? AND score_id = ?", (json.dumps(kept), config_id,
                                                                                      score_id))


def _strays(root: Path) -> None:
    run = _unfinished(root)
    (run / ".scores.parquet.abc.tmp").write_bytes(b"half")
    png = _png(root)
    (png.parent / f".{png.name}.xyz.tmp").write_bytes(b"half a png")


def _dangle(link: Path) -> None:
    link.unlink()
    os.symlink("20000101-000000", link)


@pytest.mark.parametrize("case", list(REPAIRED))
def test_a_damaged_run_or_cache_is_repaired_by_the_next_run(case: str, clean: Path, tmp_path: Path):
    root = tmp_path / "root"
    shutil.copytree(clean, root, symlinks=True)
    expected = score_rows(_run_dir(root))
    REPAIRED[case](root)
    summary = run_suite(root / "suite.yaml", RunOptions(reports_root=root / "out", cache_dir=root / "cache"))
    assert summary.report is not None and not summary.failures, case
    assert summary.counts.failed == 0 and summary.counts.planned == 6
    # a regenerated image was made alone, not in its batch of four: its last bits may differ on a CPU
    pd.testing.assert_frame_equal(score_rows(summary.run_dir), expected, rtol=1e-3)
    assert (root / "out" / "damage" / "latest").resolve() == summary.run_dir.resolve()


READERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "manifest.json truncated": (lambda run: _truncate(run / "manifest.json"), "manifest.json"),
    "manifest.json a list": (lambda run: (run / "manifest.json").write_text("[]"), "manifest.json"),
    "jobs.parquet missing": (lambda run: (run / "jobs.parquet").unlink(), "jobs.parquet"),
    "jobs.parquet truncated": (lambda run: _truncate(run / "jobs.parquet"), "jobs.parquet"),
    "scores.parquet truncated": (lambda run: _truncate(run / "scores.parquet"), "scores.parquet"),
}


@pytest.mark.parametrize("case", list(READERS))
def test_a_reader_refuses_a_damaged_run_folder_in_one_line(case: str, clean: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(_run_dir(clean), run, symlinks=True)
    damage, file = READERS[case]
    damage(run)
    proc = probe_cli("report", str(run))
    assert proc.returncode == 2, (case, proc.stdout, proc.stderr)
    assert file in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["aggregates.parquet", "deltas.parquet"])
def test_derived_tables_that_do_not_read_are_recomputed_by_the_report(name: str, clean: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(_run_dir(clean), run, symlinks=True)
    before = (run / "index.html").read_text(encoding="utf-8")
    _truncate(run / name)
    proc = probe_cli("report", str(run))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert name in proc.stderr  # a warning names what was recomputed
    after = (run / "index.html").read_text(encoding="utf-8")
    assert _numbers(after) == _numbers(before)


def _numbers(html: str) -> list[str]:
    import re

    return re.findall(r'<span class="num">([^<]*)</span>', html)
