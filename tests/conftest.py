"""Shared fixtures: suites written to temporary folders, isolated caches, the repo's suites folder."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITES = REPO / "suites"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def write_suite(tmp_path: Path):
    """Write a suite (dedented YAML) into tmp_path and return its path."""

    def write(text: str, name: str = "suite.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return path

    return write


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own image cache, so no test sees another's images."""
    cache = tmp_path_factory.mktemp("probe-cache")
    monkeypatch.setenv("PROBE_CACHE", str(cache))
    return cache
