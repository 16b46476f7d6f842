"""Build a run's HTML report: index.html plus assets/ inside the run directory, from its files alone.

The page is self-contained and portable: relative links only, no network requests (no CDN, fonts or
scripts), so the folder can be zipped and opened from file:// anywhere. Prompts and every other string
are autoescaped by Jinja2, so a prompt such as <script>...</script> shows as text.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from probe.report.bias import bias_section
from probe.report.compare import compare_runs
from probe.report.data import RunData, load_run
from probe.report.fmt import remember_outputs
from probe.report.grids import Thumbnails, init_images, probe_grid
from probe.report.human import human_section
from probe.report.methods import methods, warnings
from probe.report.plots import quality_plots
from probe.report.preference import preference_section
from probe.report.safety import safety_section, safety_thumbnails
from probe.report.tables import paired, summary
from probe.report.text import text_section
from probe.store.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
STATIC = ("report.css",)
INDEX = "index.html"


def _environment() -> Environment:
    return Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def _probe_sections(data: RunData, thumbs: Thumbnails, plots: dict[str, list[dict[str, str]]]) -> list[dict[str, Any]]:
    inits = init_images(data, thumbs)
    sections = []
    for probe in data.probes:
        table = summary(data, probe)
        kind = data.probe_kind(probe)
        sections.append({"name": probe, "kind": kind, "summary": table, "deltas": paired(data, probe),
                         "plots": plots.get(probe, []), "grid": probe_grid(data, probe, thumbs, inits),
                         "text": text_section(data, probe, table, thumbs) if kind == "text" else None})
    return sections


def report_context(data: RunData, baseline: RunData | None = None) -> dict[str, Any]:
    """Everything the template shows (writes thumbnails, plots and copied init images into assets/)."""
    for run in (data, baseline):
        if run is not None:
            remember_outputs(run.manifest)
    assets = data.path / "assets"
    shutil.rmtree(assets / "plots", ignore_errors=True)  # plots of an earlier render may name old metrics
    thumbs = safety_thumbnails(data)
    plots = quality_plots(data, assets / "plots")
    probes = _probe_sections(data, thumbs, plots)
    safety = safety_section(data, thumbs)
    written = thumbs.write()
    log.info("report: %d thumbnails written", written)
    manifest = data.manifest
    return {
        "title": f"probe report: {manifest.get('suite_name') or data.path.parent.name}",
        "run": data.name, "manifest": manifest, "subject": data.subject, "models": data.models,
        "baselines": [m for m in data.models if m != data.subject], "probes": probes,
        "bias": bias_section(data), "preference": preference_section(data, assets / "plots"),
        "human": human_section(data), "safety": safety,
        "compare": compare_runs(data, baseline) if baseline else None,
        "warnings": warnings(data), "methods": methods(data),
        "rendered_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "has_text": any(p["text"] for p in probes),
    }


def render_html(context: dict[str, Any]) -> str:
    """The report page for a context from `report_context`."""
    return _environment().get_template("report.html.j2").render(**context)


def build_report(run_dir: Path, baseline: Path | None = None) -> Path:
    """Write `index.html` and `assets/` into `run_dir`; with `baseline`, add a comparison with that run.

    Args:
        run_dir: a run directory (manifest.json, jobs.parquet, scores.parquet, images/; aggregates.parquet
            and deltas.parquet are recomputed when absent).
        baseline: another run directory to compare with (rows matched by probe, model, steps, strength, metric).

    Returns:
        The path of the written index.html.
    """
    run_dir = Path(run_dir)
    data = load_run(run_dir)
    other = load_run(Path(baseline)) if baseline is not None else None
    assets = run_dir / "assets"
    assets.mkdir(exist_ok=True)
    for name in STATIC:
        shutil.copyfile(TEMPLATES / name, assets / name)
    html = render_html(report_context(data, other))
    target = run_dir / INDEX
    atomic_write_bytes(target, html.encode("utf-8"), durable=False)  # re-rendered from the files at will
    return target
