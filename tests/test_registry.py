"""Open registries: metrics and presets added in-process or by another package's entry points, without editing probe.

The end-to-end tests build a separate package on disk (a module with a `MetricInfo`, a `Preset` and an
`ImageMetric`, plus a `*.dist-info` folder declaring them under `probe.metrics` and `probe.presets`) and run
the CLI on it in a subprocess with the package on PYTHONPATH, as a user who pip-installed it would.
"""

from __future__ import annotations

import importlib
import re
import sys
import textwrap
import types
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from probe.errors import ProbeError, UsageError
from probe.report import fmt
from probe.spec.metric_catalog import (
    METRICS,
    MetricInfo,
    MetricOutput,
    MetricRegistry,
    check_names,
    direction_of,
    register_metric,
)
from probe.spec.presets import PRESETS, Preset, register_preset
from tests.conftest import probe_cli

BRIGHTNESS = MetricInfo("brightness", "image", "mean brightness, 0-255 (PIL 'L', ITU-R 601 luma)",
                        direction="higher")


@pytest.fixture
def restore_registries():
    """Whatever a test registers in the process-wide registries is removed afterwards."""
    from probe.score import protocol

    metrics, presets = set(METRICS), set(PRESETS)
    yield
    for name in set(METRICS) - metrics:
        del METRICS[name]
        protocol._IN_PROCESS.pop(name, None)
    for name in set(PRESETS) - presets:
        del PRESETS[name]


# --- one record per metric -------------------------------------------------------------------------------------


def test_built_in_classes_take_name_kind_and_direction_from_their_record():
    for name, info in METRICS.items():
        module, attr = info.target.split(":")
        cls = getattr(importlib.import_module(module), attr)
        assert cls.info is info and (cls.name, cls.kind, cls.direction) == (name, info.kind, info.direction)


def test_ocr_rows_and_directions_are_declared_once():
    from probe.report.text import ocr_rows
    from probe.score.metrics.text import OUTPUTS

    outputs = METRICS["ocr"].outputs
    assert list(outputs) == ocr_rows() == list(OUTPUTS) == ["ocr_exact", "ocr_cer", "ocr_f1", "ocr_detected"]
    assert OUTPUTS == {"ocr_exact": "higher", "ocr_cer": "lower", "ocr_f1": "higher", "ocr_detected": "higher"}
    assert direction_of("ocr_cer") == fmt.direction("ocr_cer") == "lower"
    assert "character error rate" in fmt.description("ocr_cer")
    for name in check_names():  # the report's arrows and the gate read the same registry
        assert fmt.direction(name) == direction_of(name)
    assert (direction_of("reference_gap"), direction_of("faces"), direction_of("no_such_row")) == ("lower", "none", "none")


def test_a_record_declares_its_rows_exactly_once():
    assert dict(BRIGHTNESS.outputs) == {"brightness": MetricOutput("higher", BRIGHTNESS.description)}
    with pytest.raises(ProbeError, match="either `direction`"):
        MetricInfo("bare", "image", "no direction")
    with pytest.raises(ProbeError, match="either `direction`"):
        MetricInfo("both", "image", "x", direction="higher", outputs={"both_a": MetricOutput("lower")})
    with pytest.raises(ProbeError, match="set metric writes one row"):
        MetricInfo("twins", "set", "x", outputs={"twin_a": MetricOutput("lower"), "twin_b": MetricOutput("lower")})
    with pytest.raises(ProbeError, match="snake_case"):
        MetricInfo("Bright-ness", "image", "x", direction="higher")
    with pytest.raises(ProbeError, match="module:Class"):
        MetricInfo("bright", "image", "x", target="no_colon", direction="higher")


# --- in-process registration ------------------------------------------------------------------------------------


def test_registered_class_is_built_scored_and_given_its_arrow(restore_registries, tmp_path):
    from probe.score.protocol import ImageItem, Metric, Score, build_metric, registered

    @registered
    class Brightness(Metric):
        info = BRIGHTNESS

        def config(self, ctx):
            return {}

        def score(self, items, ctx):
            return [Score(self.name, float(np.asarray(i.open().convert("L")).mean()), key=i.key) for i in items]

    assert METRICS["brightness"].target.endswith(":test_registered_class_is_built_scored_and_given_its_arrow"
                                                 ".<locals>.Brightness")
    Image.new("RGB", (8, 8), (128, 128, 128)).save(tmp_path / "grey.png")
    metric = build_metric("brightness")
    scores = metric.score([ImageItem("k", tmp_path / "grey.png", "a grey square")], None)  # type: ignore[union-attr,arg-type]
    assert [(s.metric, s.value) for s in scores] == [("brightness", 128.0)]
    assert fmt.ARROWS[fmt.direction("brightness")] == "\u2191"
    with pytest.raises(UsageError, match="did you mean 'brightness'"):
        build_metric("brightnes")


def test_a_clash_with_a_built_in_names_both(restore_registries):
    with pytest.raises(ProbeError, match=r"'clip_score' \(registered in-process, mine:X\) clashes with metric "
                                         r"'clip_score' \(built-in\)"):
        register_metric(MetricInfo("clip_score", "image", "mine", "mine:X", "higher"))
    row = MetricInfo("my_ocr", "image", "x", "mine:Y", outputs={"ocr_cer": MetricOutput("lower")})
    with pytest.raises(ProbeError, match="clashes with metric 'ocr'.*'ocr_cer'"):
        register_metric(row)
    with pytest.raises(ProbeError, match="bias gap"):
        register_metric(MetricInfo("parity_gap", "image", "x", "mine:Z", "lower"))
    info = MetricInfo("twice", "image", "x", "mine:T", "higher")
    assert register_metric(info) is info and register_metric(info) is info  # a module imported twice: no error
    with pytest.raises(ProbeError, match="clashes with model preset 'tiny' \\(built-in\\)"):
        register_preset(Preset(name="tiny", description="again", model_id="probe/tiny", revision="tiny-v1",
                               family="tiny", steps=(1,), guidance=0.0, size=(64, 64)))


def test_a_build_that_is_not_its_kind_is_refused(restore_registries):
    from probe.score.protocol import build_metric

    module = types.ModuleType("probe_test_wrong_kind")
    module.NotASet = type("NotASet", (), {"name": "wrong_kind", "kind": "set", "config": lambda self, ctx: {}})
    sys.modules["probe_test_wrong_kind"] = module
    try:
        register_metric(MetricInfo("wrong_kind", "set", "x", "probe_test_wrong_kind:NotASet", "lower"))
        with pytest.raises(ProbeError, match="lacks the SetMetric protocol"):
            build_metric("wrong_kind")
    finally:
        del sys.modules["probe_test_wrong_kind"]


# --- entry points (in-process, with a fake distribution list) ----------------------------------------------------


def _registry_with(monkeypatch, *points: tuple[str, str], objects: dict[str, object]) -> MetricRegistry:
    """A fresh metric registry over the built-ins whose entry points are `points` (name, "module:attr")."""
    module = types.ModuleType("probe_test_plugin")
    for attr, value in objects.items():
        setattr(module, attr, value)
    monkeypatch.setitem(sys.modules, "probe_test_plugin", module)
    entries = [EntryPoint(name, value, "probe.metrics") for name, value in points]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: entries if group == "probe.metrics" else [])
    return MetricRegistry("metric", "probe.metrics", MetricInfo, [METRICS[n] for n in METRICS])


def test_entry_points_are_read_once_and_lazily(monkeypatch):
    registry = _registry_with(monkeypatch, ("brightness", "probe_test_plugin:INFO"), objects={"INFO": BRIGHTNESS})
    calls = []
    real = sys.modules["importlib.metadata"].entry_points
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: calls.append(group) or real(group=group))
    assert calls == []  # building the registry reads nothing
    assert registry["brightness"] is BRIGHTNESS and "brightness" in registry and registry.writer_of("brightness")
    assert calls == ["probe.metrics"]
    assert registry.origin("brightness") == "entry point brightness = probe_test_plugin:INFO (group probe.metrics)"


@pytest.mark.parametrize(("points", "objects", "message"), [
    ([("clip_score", "probe_test_plugin:INFO")],
     {"INFO": MetricInfo("clip_score", "image", "x", "p:X", "higher")},
     r"metric 'clip_score' \(entry point clip_score = probe_test_plugin:INFO .*\) clashes with metric 'clip_score' "
     r"\(built-in\)"),
    ([("brightness", "probe_test_plugin:A"), ("brightness", "probe_test_plugin:B")],
     {"A": BRIGHTNESS, "B": MetricInfo("brightness", "image", "other", "p:Y", "lower")},
     r"\(entry point brightness = probe_test_plugin:B .*\) clashes with metric 'brightness' \(entry point "
     r"brightness = probe_test_plugin:A"),
    ([("brightness", "probe_test_missing:INFO")], {},
     r"entry point brightness = probe_test_missing:INFO \(group probe.metrics\) cannot be loaded: "
     r"ModuleNotFoundError"),
    ([("brightness", "probe_test_plugin:INFO")], {"INFO": "not a record"},
     "names a str; it must name a MetricInfo"),
    ([("bright", "probe_test_plugin:INFO")], {"INFO": BRIGHTNESS},
     "names the metric 'brightness'; the entry point must be called 'brightness' too"),
])
def test_a_broken_or_clashing_entry_point_is_an_error_naming_it(monkeypatch, points, objects, message):
    registry = _registry_with(monkeypatch, *points, objects=objects)
    for _ in range(2):  # loaded once: the second lookup raises the same error, not a half-loaded registry
        with pytest.raises(ProbeError, match=message):
            registry.get("clip_score")


# --- validation -------------------------------------------------------------------------------------------------


def test_a_check_on_a_multi_row_metric_names_its_rows(write_suite):
    from probe.spec.loader import SuiteError, load_suite

    suite = "name: ok\nmodels: [tiny]\nprobes:\n  - {name: p, prompts: [x], metrics: [ocr]}\nchecks:\n"
    load_suite(write_suite(suite + "  - {metric: ocr_cer, max: 0.5}\n"))
    with pytest.raises(SuiteError, match="ocr writes the rows ocr_exact, ocr_cer, ocr_f1, ocr_detected"):
        load_suite(write_suite(suite + "  - {metric: ocr, max: 0.5}\n"))


def test_presets_are_checked_when_they_are_made():
    with pytest.raises(ProbeError, match="unknown family 'sd3'"):
        Preset(name="mine", description="x", model_id="org/m", revision=None, family="sd3",  # type: ignore[arg-type]
               steps=(1,), guidance=0.0, size=(64, 64))
    with pytest.raises(ProbeError, match="kebab-case"):
        Preset(name="My_Model", description="x", model_id="org/m", revision=None, family="sd", steps=(1,),
               guidance=0.0, size=(64, 64))


# --- a separate package, installed by entry points, driving the CLI ----------------------------------------------

PLUGIN_INIT = '''
"""A user's probe plugin: records only, so reading them imports neither torch nor probe.score."""
from probe.spec.metric_catalog import MetricInfo
from probe.spec.presets import Preset

BRIGHTNESS = MetricInfo("brightness", "image", "mean brightness, 0-255 (PIL 'L', ITU-R 601 luma)",
                        "probe_brightness.metric:Brightness", "higher")
TINY_BRIGHT = Preset(name="tiny-bright", description="the embedded tiny model, registered by a plugin",
                     model_id="probe/tiny", revision="tiny-v1", family="tiny", steps=(1,), guidance=0.0,
                     size=(64, 64), fp16_variant=False)
'''

PLUGIN_METRIC = '''
"""The implementation, imported only when a run scores with brightness."""
import numpy as np

from probe.score.protocol import Metric, Score
from probe_brightness import BRIGHTNESS


class Brightness(Metric):
    info = BRIGHTNESS

    def config(self, ctx):
        return {"luma": "PIL convert('L'), ITU-R 601"}

    def score(self, items, ctx):
        return [Score(metric=self.name, value=float(np.asarray(item.open().convert("L")).mean()), key=item.key)
                for item in items]
'''


def install_plugin(site: Path, name: str, entry_points: str, files: dict[str, str]) -> Path:
    """A package folder plus the `*.dist-info` that `pip install` would write, under `site` (for PYTHONPATH)."""
    for relative, text in files.items():
        (site / relative).parent.mkdir(parents=True, exist_ok=True)
        (site / relative).write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points).lstrip(), encoding="utf-8")
    return site


@pytest.fixture
def plugin(tmp_path) -> dict[str, str]:
    """The brightness plugin on disk; returns the environment a subprocess needs to see it."""
    site = install_plugin(tmp_path / "site", "probe-brightness", """
        [probe.metrics]
        brightness = probe_brightness:BRIGHTNESS

        [probe.presets]
        tiny-bright = probe_brightness:TINY_BRIGHT
    """, {"probe_brightness/__init__.py": PLUGIN_INIT, "probe_brightness/metric.py": PLUGIN_METRIC})
    return {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}


def test_a_plugin_preset_and_metric_validate_in_a_suite_without_importing_them(plugin, write_suite):
    suite = write_suite("""
        name: bright
        models: [tiny-bright]
        probes:
          - {name: p, prompts: [a lamp], metrics: [brightness, clip_score]}
        checks:
          - {metric: brightness, probe: p, min: 10}
    """)
    proc = probe_cli("suites", "validate", str(suite), env=plugin)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    models = probe_cli("models", env=plugin)
    assert models.returncode == 0, models.stderr
    assert "tiny-bright (baseline) cached: yes" in models.stdout and "sd-turbo" in models.stdout
    code = (f"import sys; from probe.spec.loader import load_suite; load_suite({str(suite)!r}); "
            "print(sorted(m for m in ('torch', 'probe.score', 'probe_brightness.metric') if m in sys.modules))")
    light = probe_cli_python(code, plugin)
    assert light.returncode == 0 and light.stdout.strip() == "[]", light.stderr + light.stdout
    typo = write_suite("name: t\nmodels: [tiny-brigth]\nprobes:\n  - {name: p, prompts: [x], metrics: [brightnes]}\n",
                       "typo.yaml")
    proc = probe_cli("suites", "validate", str(typo), env=plugin)
    assert proc.returncode == 2
    assert "did you mean 'tiny-bright'" in proc.stdout + proc.stderr and "did you mean 'brightness'" in proc.stdout + proc.stderr


def probe_cli_python(code: str, env: dict[str, str]):
    """`python -c code` in the repository with `env` added, as probe_cli runs the CLI."""
    import os
    import subprocess

    from tests.conftest import REPO

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env}, timeout=300)


def test_probe_score_with_a_plugin_metric_writes_its_rows_and_reports_its_arrow(plugin, tmp_path):
    colours = {"black.png": (0, 0, 0), "white.png": (255, 255, 255), "grey.png": (128, 128, 128)}
    (tmp_path / "imgs").mkdir()
    for name, colour in colours.items():
        Image.new("RGB", (32, 32), colour).save(tmp_path / "imgs" / name)
    table = tmp_path / "prompts.csv"
    table.write_text("file,prompt\n" + "".join(f"{name},a {name[:-4]} square\n" for name in colours))
    args = ["score", str(tmp_path / "imgs"), "--prompts", str(table), "--clip-model", "tiny",
            "--out", str(tmp_path / "reports")]
    proc = probe_cli(*args, "--metrics", "brightness", env=plugin)
    assert proc.returncode == 0, proc.stderr
    run = (tmp_path / "reports" / "score-imgs" / "latest").resolve()
    jobs = pd.read_parquet(run / "jobs.parquet")
    scores = pd.read_parquet(run / "scores.parquet").merge(jobs[["key", "source_file"]], on="key")
    assert sorted(scores["metric"]) == ["brightness"] * 3
    assert dict(zip(scores["source_file"], scores["value"], strict=True)) == {"black.png": 0.0, "white.png": 255.0,
                                                                               "grey.png": 128.0}
    html = (run / "index.html").read_text(encoding="utf-8")
    assert re.search(r'brightness <span class="arrow">\u2191</span>', html), "the report shows the plugin's direction"
    assert "mean brightness, 0-255" in html  # its description, as the column's tooltip


def test_a_broken_plugin_is_named_when_the_registry_is_read(tmp_path, write_suite):
    site = install_plugin(tmp_path / "site", "probe-broken", """
        [probe.metrics]
        sharpness = probe_broken_missing:INFO
    """, {})
    suite = write_suite("name: ok\nmodels: [tiny]\nprobes:\n  - {name: p, prompts: [x], metrics: [clip_score]}\n")
    proc = probe_cli("suites", "validate", str(suite), env={"PYTHONPATH": str(site)})
    assert proc.returncode == 2
    assert ("entry point sharpness = probe_broken_missing:INFO (group probe.metrics, package probe-broken 0.1) "
            "cannot be loaded: ModuleNotFoundError") in " ".join((proc.stdout + proc.stderr).split())


def test_a_metric_record_can_be_copied_with_changes():
    import dataclasses

    from probe.spec.metric_catalog import METRICS

    changed = dataclasses.replace(METRICS["fid"], description="Frechet distance, restated")
    assert changed.outputs["fid"].description == "Frechet distance, restated"
    assert changed.outputs["fid"].direction == "lower"


def test_an_in_process_record_can_be_registered_again_with_changes(monkeypatch):
    import dataclasses

    from probe.spec import metric_catalog

    registry = metric_catalog.MetricRegistry("metric", "probe.test-none", metric_catalog.MetricInfo, ())
    first = metric_catalog.MetricInfo("nb_metric", "image", "first draft", direction="higher")
    registry.register(first, "registered in-process, cell 1")
    second = dataclasses.replace(first, description="second draft")
    registry.register(second, "registered in-process, cell 1")
    assert registry["nb_metric"].description == "second draft"
