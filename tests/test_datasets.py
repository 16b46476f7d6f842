"""Named prompt datasets: the copy shipped in the package (sha256-pinned), a pulled copy that wins over it,
`probe data` listing both, and the packaging that puts the shipped files in the wheel."""

from __future__ import annotations

import fnmatch
import hashlib
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from probe.cli import commands as cli
from probe.errors import ProbeError
from probe.spec import datasets
from probe.spec.loader import SuiteError, load_suite

from .conftest import REPO, SUITES

SUITE = """
name: ds
models: [tiny]
probes:
  - name: p
    prompts: {dataset: partiprompts, column: Prompt, attrs: [Challenge], where: {Challenge: [Basic]}}
"""


def _pull_copy(data_dir: Path, rows: list[tuple[str, str]]) -> Path:
    """Write what `probe data pull partiprompts` would have saved, with the given (Prompt, Challenge) rows."""
    path = data_dir / "partiprompts" / "PartiPrompts.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["Prompt\tCategory\tChallenge\tNote", *(f"{p}\tAbstract\t{c}\tpulled" for p, c in rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _tampered_shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A shipped folder whose PartiPrompts.tsv lost a line after install."""
    shipped = tmp_path / "shipped"
    shutil.copytree(datasets.SHIPPED_DIR, shipped)
    path = shipped / "partiprompts" / "PartiPrompts.tsv"
    path.write_text(path.read_text(encoding="utf-8").split("\n", 2)[0] + "\n", encoding="utf-8")
    monkeypatch.setattr(datasets, "SHIPPED_DIR", shipped)
    return path


def test_every_dataset_ships_with_its_pinned_sha256_and_licence():
    for name, dataset in datasets.DATASETS.items():
        path = datasets.shipped_path(name)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == dataset.sha256
        header = path.read_text(encoding="utf-8").split("\n", 1)[0].split("\t")
        assert set(dataset.columns) <= set(header)
        assert (path.parent / "LICENSE").is_file()
        notice = (REPO / "NOTICE").read_text(encoding="utf-8")
        assert f"probe/spec/data/{name}/{dataset.filename}" in notice and dataset.sha256 in notice


def test_a_fresh_machine_reads_the_shipped_copy(shared_datasets: Path):
    assert not any(shared_datasets.iterdir())  # the autouse fixture: an empty PROBE_DATA
    assert datasets.dataset_path("partiprompts") == datasets.shipped_path("partiprompts")
    loaded = load_suite(SUITES / "text.yaml")
    assert len(loaded.prompts["parti-writing"]) == 91  # Writing & Symbols prompts in PartiPrompts.tsv


def test_a_pulled_copy_wins_over_the_shipped_one(shared_datasets: Path, write_suite):
    pulled = _pull_copy(shared_datasets, [("a pulled prompt", "Basic"), ("another one", "Complex")])
    assert datasets.dataset_path("partiprompts") == pulled
    loaded = load_suite(write_suite(SUITE))
    assert [item.prompt for item in loaded.prompts["p"]] == ["a pulled prompt"]


def test_a_tampered_shipped_copy_is_refused_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            write_suite):
    path = _tampered_shipped(tmp_path, monkeypatch)
    with pytest.raises(ProbeError, match="sha256") as info:
        datasets.dataset_path("partiprompts")
    assert str(path) in str(info.value)
    with pytest.raises(SuiteError) as suite_error:
        load_suite(write_suite(SUITE))
    [(line, field, message)] = suite_error.value.problems
    assert line == 5 and str(path) in message and "probe data pull partiprompts" in message


def test_a_pulled_copy_is_not_held_to_the_shipped_pin(tmp_path, monkeypatch, shared_datasets: Path):
    _tampered_shipped(tmp_path, monkeypatch)
    pulled = _pull_copy(shared_datasets, [("fresh from upstream", "Basic")])
    assert datasets.dataset_path("partiprompts") == pulled


def test_a_missing_shipped_copy_says_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_suite):
    monkeypatch.setattr(datasets, "SHIPPED_DIR", tmp_path / "nothing")
    with pytest.raises(SuiteError) as info:
        load_suite(write_suite(SUITE))
    [(_, field, message)] = info.value.problems
    assert "missing from this install" in message and "probe data pull partiprompts" in message


def _data_row() -> list[str]:
    """The cells of the partiprompts row of `probe data`."""
    result = CliRunner().invoke(cli.app, ["data"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "partiprompts" in line)
    return [cell.strip() for cell in row.split("│")[1:-1]]


def test_probe_data_lists_the_shipped_and_the_pulled_copy(shared_datasets: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(cli.out, "width", 400)  # one line per row, so paths are not folded
    shipped = str(datasets.shipped_path("partiprompts"))
    assert _data_row()[3:] == [shipped, "no", "shipped"]
    pulled = _pull_copy(shared_datasets, [("x", "Basic")])
    assert _data_row()[3:] == [shipped, str(pulled), "pulled"]


def test_package_data_globs_cover_every_shipped_file():
    """What pyproject's package-data names is what lands in the wheel and sdist (checked with `pip wheel`)."""
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    globs = config["tool"]["setuptools"]["package-data"]["probe"]
    package = REPO / "probe"
    files = [p.relative_to(package).as_posix() for p in datasets.SHIPPED_DIR.rglob("*") if p.is_file()]
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), files
