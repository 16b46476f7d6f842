"""Shared fixtures: suites written to temporary folders, isolated caches, the repo's suites folder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITES = REPO / "suites"


@pytest.fixture
def write_suite(tmp_path: Path):
    """Write a suite (dedented YAML) into tmp_path and return its path."""

    def write(text: str, name: str = "suite.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return path

    return write


@pytest.fixture(autouse=True)
def shared_datasets(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data folder per test: datasets resolve to the copies shipped in the package, as on a fresh
    machine, and never to one the developer pulled. A test that needs a pulled copy writes it here."""
    root = tmp_path_factory.mktemp("probe-data")
    monkeypatch.setenv("PROBE_DATA", str(root))
    return root


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own image cache, so no test sees another's images."""
    cache = tmp_path_factory.mktemp("probe-cache")
    monkeypatch.setenv("PROBE_CACHE", str(cache))
    return cache


def probe_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "probe.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    """`probe run suites/smoke.yaml` once per test session: (root, cache, completed process)."""
    root = tmp_path_factory.mktemp("smoke")
    cache = root / "cache"
    proc = probe_cli("run", "suites/smoke.yaml", "--out", str(root / "reports"), env={"PROBE_CACHE": str(cache)})
    return root, cache, proc


def score_rows(run_dir: Path):
    """A run's score rows as a sorted frame (series, score id, value, label): what must come out the same after
    a kill, a resume or any damage repaired."""
    from probe.store.tables import read_scores

    frame = read_scores(run_dir)[["series", "score_id", "value", "label"]]
    return frame.sort_values(["series", "score_id", "value"]).reset_index(drop=True)


@pytest.fixture(scope="session")
def rating_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run with two configurations for the rating tests (generated once; tests copy it)."""
    from tests.rating_helpers import make_run

    return make_run(tmp_path_factory.mktemp("rating"))


@pytest.fixture
def rating_run(rating_source: Path, tmp_path: Path) -> Path:
    """This test's own copy of the rating run."""
    from tests.rating_helpers import copy_run

    return copy_run(rating_source, tmp_path / "run")
