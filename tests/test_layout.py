"""The house by stages, enforced: import contracts, no import cycles, reports that need no model code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from tests.conftest import REPO

STAGES = ["spec", "planning", "embedded", "generate", "store", "run", "score", "stats", "analyse", "gate", "report", "cli"]


def test_import_contracts_hold():
    """pyproject's [tool.importlinter] layers and forbidden contracts (the same check `make test` runs)."""
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "0 broken" in proc.stdout


def _cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph.find_modules_directly_imported_by(module) & modules:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph("probe", exclude_type_checking_imports=True)
    modules = {m for m in graph.modules if m.startswith("probe.")}
    assert _cycles(graph, modules) == []


def test_every_stage_is_a_package_with_a_docstring_that_says_its_job():
    import importlib

    for stage in STAGES:
        module = importlib.import_module(f"probe.{stage}")
        assert (REPO / "probe" / stage / "__init__.py").is_file()
        assert module.__doc__ and len(module.__doc__.split()) >= 8, stage


@pytest.mark.slow
def test_a_report_re_renders_without_model_or_metric_code(smoke_run, tmp_path):
    """`probe report` reads files alone: no torch, no scoring or generation module is imported."""
    root, _, proc = smoke_run
    assert proc.returncode == 0, proc.stderr
    run = (root / "reports" / "smoke" / "latest").resolve()
    import json

    recorded = json.loads((run / "manifest.json").read_text())["metrics"]
    assert recorded["clip_score"]["outputs"]["clip_score"]["direction"] == "higher"
    assert recorded["ocr"]["outputs"]["ocr_cer"]["direction"] == "lower"
    code = ("import sys; from probe.report import build_report; build_report(sys.argv[1]); "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('probe.score', 'probe.generate', "
            "'probe.run', 'diffusers', 'transformers'))); print(bad); sys.exit(1 if bad else 0)")
    check = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, cwd=REPO,
                           timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for importer, imported in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=importer, imported=imported)
    assert _cycles(graph, {"p.a", "p.b", "p.c", "p.d"}) == [["p.a", "p.b", "p.c"]]


def test_a_run_folder_written_before_the_new_layout_still_loads(tmp_path):
    """tests/fixtures/run-v1 was written by probe at b744f5d (schema 1: a metric's label in `metric`)."""
    import json
    import shutil

    import probe
    from probe.gate.baseline import baseline_from_run
    from probe.gate.rules import evaluate
    from probe.gate.verdict import Rule
    from probe.report import build_report
    from probe.run.records import RunManifest

    run_dir = tmp_path / "run"
    shutil.copytree(REPO / "tests" / "fixtures" / "run-v1", run_dir)
    manifest = RunManifest.model_validate_json((run_dir / "manifest.json").read_text())
    assert manifest.schema_version == 1 and "schema_version" not in json.loads((run_dir / "manifest.json").read_text())
    run = probe.load_run(run_dir)
    assert set(run.scores["series"]) == {"clip_score", "cmmd", "fid[features=clip]", "perceived_gender"}
    assert set(run.scores.loc[run.scores["series"] == "fid[features=clip]", "metric"]) == {"fid"}
    summary = run.summary()
    assert {"series", "metric"} <= set(summary.columns) and "fid[features=clip]" in set(summary["series"])
    assert "clip_score" in run.frame().columns and not run.deltas().empty
    html = build_report(run_dir).read_text(encoding="utf-8")
    assert "fid[features=clip]" in html and "perceived" in html
    verdict = evaluate(run, baseline_from_run(run_dir), [Rule(metric="fid", max_increase=0.0, mode="strict")])
    assert verdict.outcomes and all(o.status == "pass" for o in verdict.outcomes)


def test_public_imports_keep_working_after_the_stages_are_imported():
    """`probe.plan` is a function: no stage package may share its name and shadow it once imported."""
    code = ("import probe, probe.planning.job, probe.spec.loader, probe.api; "
            "assert callable(probe.plan) and callable(probe.load_suite); "
            "assert callable(probe.load_run) and callable(probe.compare) and probe.Run.__name__ == 'Run'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_run_folder_from_a_newer_probe_is_refused_clearly(tmp_path):
    import json
    import shutil

    import probe
    from probe.errors import UsageError
    from probe.store.tables import SCHEMA_VERSION

    run_dir = tmp_path / "run"
    shutil.copytree(REPO / "tests" / "fixtures" / "run-v1", run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    (run_dir / "manifest.json").write_text(json.dumps({**manifest, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(UsageError, match="upgrade probe"):
        probe.load_run(run_dir)


def test_a_report_knows_the_direction_of_a_metric_whose_package_is_not_installed(tmp_path):
    """A plugin's rows carry their direction in the manifest, so the report renders from the files alone."""
    import json
    import shutil

    import pandas as pd

    from probe.report import build_report
    from probe.store.tables import SCORE_COLUMNS

    run_dir = tmp_path / "run"
    shutil.copytree(REPO / "tests" / "fixtures" / "run-v1", run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["metrics"]["glow"] = {"name": "glow", "config_id": "g1",
                                   "outputs": {"glow": {"direction": "lower", "description": "glow, in lumens"}}}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    jobs = pd.read_parquet(run_dir / "jobs.parquet")
    scores = pd.read_parquet(run_dir / "scores.parquet")
    glow = scores[scores["metric"] == "clip_score"].assign(metric="glow", config_id="g1", value=1.0)
    pd.concat([scores, glow.reindex(columns=scores.columns)]).to_parquet(run_dir / "scores.parquet", index=False)
    for stale in ("aggregates.parquet", "deltas.parquet"):  # recomputed from the scores by the report
        (run_dir / stale).unlink()
    assert len(glow) and set(jobs["probe"]) >= {"quality"}
    html = build_report(run_dir).read_text(encoding="utf-8")
    assert 'glow, in lumens (lower is better)">glow <span class="arrow">\u2193</span>' in html
    assert SCORE_COLUMNS  # the run's own table layout is what the report read
