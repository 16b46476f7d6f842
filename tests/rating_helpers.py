"""Shared by the rating tests: a small tiny run with two configurations, copied per test, and a study on it."""

from __future__ import annotations

import shutil
from pathlib import Path

SUITE = """
name: rating
models:
  - tiny
  - {preset: tiny, name: tiny-cfg, steps: [4], guidance: 3.0}
seeds: 2
probes:
  - name: quality
    kind: quality
    prompts: [a red apple, a blue car, a green tree, a yellow house, a white cat, a black dog, an old boat,
              a tall tower]
    steps: [1]
    metrics: [clip_score]
"""


def make_run(root: Path) -> Path:
    """Generate the suite on the tiny model (16 pairs of tiny@1 and tiny-cfg@4 over 8 prompts); its run folder."""
    from tests.conftest import probe_cli

    root.mkdir(parents=True, exist_ok=True)
    suite = root / "rating.yaml"
    suite.write_text(SUITE)
    proc = probe_cli("run", str(suite), "--out", str(root / "reports"), env={"PROBE_CACHE": str(root / "cache")})
    assert proc.returncode == 0, proc.stderr
    return (root / "reports" / "rating" / "latest").resolve()


def copy_run(run_dir: Path, target: Path) -> Path:
    """A private copy of the run folder (its images resolved, so the copy stands alone)."""
    shutil.copytree(run_dir, target, symlinks=False)
    return target


def new_study(run_dir: Path, questions=("quality",), pairs: int = 10, attention: int | None = 2, open_study=False,
              raters: int = 2, seed: int = 0, study_id: str | None = None):
    """(store, study, [(rater, token)]) for tiny@1 against tiny-cfg@4."""
    from probe.rate.serve import ensure_raters
    from probe.rate.study import create_study, parse_config
    from probe.store.tables import load_run_tables

    jobs = load_run_tables(run_dir).jobs
    store, study, *_ = create_study(run_dir, jobs, parse_config("tiny", jobs), parse_config("tiny-cfg", jobs),
                                   list(questions), pairs, seed, open_study, study_id, attention)
    links = [] if open_study else ensure_raters(store, study, raters, [])
    return store, study, links
