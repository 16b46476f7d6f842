"""The HTML report: content equals the run's tables, links are relative and exist, prompts are escaped,
run comparisons render deltas, and the page loads in headless Chromium without errors or failed requests."""

from __future__ import annotations

import html
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from markupsafe import escape

from probe.report import build_report
from probe.report.bias import MONK_COLOURS
from probe.report.fmt import fmt, fmt_ci, fmt_coord, fmt_signed
from probe.store.tables import SCORE_COLUMNS, score_id
from tests.chrome import CHROMIUM, Chrome
from tests.conftest import REPO, probe_cli

pytestmark = pytest.mark.slow

XSS = "<script>document.title='pwned'</script><img src=x onerror=alert(1)>"


class _Page(HTMLParser):
    """Links, data-cell / data-compare texts and visible section ids of a report page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.cells: dict[str, str] = {}
        self._open: list[tuple[str, str, list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.links += [v for k, v in attrs if k in ("href", "src") and v]
        if values.get("id"):
            self.ids.add(values["id"] or "")
        for name in ("data-cell", "data-compare"):
            if values.get(name):
                self._open.append((tag, values[name] or "", []))

    def handle_data(self, data: str) -> None:
        for _, _, texts in self._open:
            texts.append(data)

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1][0] == tag:
            _, key, texts = self._open.pop()
            self.cells[key] = " ".join(" ".join(texts).split())


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def _copy_run(smoke_run, target: Path) -> Path:
    root, _, proc = smoke_run
    assert proc.returncode == 0, proc.stderr
    source = (root / "reports" / "smoke" / "latest").resolve()
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("index.html", "assets"))
    return target


@pytest.fixture(scope="module")
def report(smoke_run, tmp_path_factory, repo_cwd) -> tuple[Path, str]:
    """The smoke run (copied) and its rendered report."""
    run = _copy_run(smoke_run, tmp_path_factory.mktemp("report") / "smoke" / "run-a")
    index = build_report(run)
    return run, index.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def repo_cwd():
    """Render from the repo root: the manifest names the suite (and its init images) relative to it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        yield patch


def test_sections_and_warnings(report):
    _, text = report
    page = _parse(text)
    assert {"summary", "quality", "grids", "text", "methods"} <= page.ids
    assert "random weights" in text  # the tiny preset's note
    assert "tiny-cfg" in text and "probe/tiny" in text and "tiny-v1" in text  # presets with hub ids and revisions
    flat = re.sub(r"\s+", " ", text)
    assert re.search(r"planned 46, generated \d+, cached \d+, failed 0", flat)  # job counts
    assert "tiny-clip-v1" in text and "diffusers" in text  # metric configuration, package versions


def test_summary_numbers_equal_aggregates(report):
    run, text = report
    cells = _parse(text).cells
    aggregates = pd.read_parquet(run / "aggregates.parquet")
    groups = [c for c in aggregates.columns if c.startswith("var_")]  # grouped set rows have their own table
    aggregates = aggregates[~aggregates[groups].notna().any(axis=1)] if groups else aggregates
    assert len(aggregates) > 10
    for row in aggregates.itertuples():
        column = row.metric if row.kind == "image" else f"{row.metric}|{row.reference}"
        key = "|".join([row.probe, row.model, fmt_coord(row.steps), fmt_coord(row.strength), column])
        expected = f"{fmt(row.mean)} {fmt_ci(row.low, row.high)}".strip()
        assert cells[key] == expected, key
    deltas = pd.read_parquet(run / "deltas.parquet")
    for row in deltas.itertuples():
        assert html.escape(fmt_signed(row.mean)) in text


def test_links_are_relative_and_exist(report):
    run, text = report
    links = _parse(text).links
    assert any(link.startswith("assets/thumbs/") for link in links)
    assert any(link.startswith("images/") for link in links)
    assert any(link.startswith("assets/init/") for link in links)  # img2img init image copied in
    assert any(link.startswith("assets/plots/") for link in links)
    for link in links:
        if link.startswith("#"):
            continue
        assert not re.match(r"^[a-z]+:|^/", link), link
        assert (run / link).is_file(), link
    assert not re.search(r"https?://", text)
    assert str(run) not in text and str(REPO) not in text


def test_run_comparison_renders_deltas(smoke_run, report, tmp_path):
    run, _ = report
    other = _copy_run(smoke_run, tmp_path / "smoke" / "run-b")
    aggregates = pd.read_parquet(other / "aggregates.parquet")
    aggregates["mean"] = aggregates["mean"] * 0.9
    aggregates.to_parquet(other / "aggregates.parquet", index=False)
    text = build_report(run, baseline=other).read_text(encoding="utf-8")
    cells = _parse(text).cells
    assert 'id="compare"' in text and "smoke/run-b" in text
    mine = pd.read_parquet(run / "aggregates.parquet")
    compared = [k for k in cells if k.count("|") == 6]
    assert len(compared) == len(mine)
    row = mine[(mine["probe"] == "quality") & (mine["metric"] == "clip_score")].iloc[0]
    key = "|".join(["quality", row["model"], fmt_coord(row["steps"]), "", "clip_score", "", ""])
    delta = fmt_signed(row["mean"] - 0.9 * row["mean"])
    assert cells[key].startswith(f"{row['model']} {fmt_coord(row['steps'])} clip_score")
    assert delta in cells[key]
    build_report(run)  # leave the shared report without the comparison


def _add_bias_and_ocr_scores(run: Path) -> None:
    """Score rows as the perceived_gender, skin_tone and ocr metrics write them (made up, deterministic)."""
    jobs = pd.read_parquet(run / "jobs.parquet")
    rng = np.random.default_rng(0)
    rows = []
    for job in jobs[jobs["probe"] == "occupations"].itertuples():
        label = rng.choice(["feminine", "masculine", "unclear", "feminine"])
        sid = score_id(job.key, job.prompt, None if pd.isna(job.text) else job.text)
        rows.append({"metric": "perceived_gender", "config_id": "g1", "key": job.key, "value": rng.random(),
                     "label": label, "score_id": sid})
        rows.append({"metric": "skin_tone", "config_id": "s1", "key": job.key, "value": rng.normal(20, 15),
                     "score_id": sid,
                     "label": rng.choice([f"monk_{i}" for i in range(1, 11)] + ["unknown"])})
    for job in jobs[jobs["probe"] == "signs"].itertuples():
        read = XSS if job.seed == 0 else "OPEN"
        for metric, value in (("ocr_exact", float(read == "OPEN")), ("ocr_cer", 0.0 if read == "OPEN" else 1.0),
                              ("ocr_f1", float(read == "OPEN")), ("ocr_detected", 1.0)):
            rows.append({"metric": metric, "config_id": "o1", "key": job.key, "value": value, "text": read,
                         "score_id": score_id(job.key, job.prompt, None if pd.isna(job.text) else job.text)})
    scores = pd.concat([pd.read_parquet(run / "scores.parquet"), pd.DataFrame(rows, columns=SCORE_COLUMNS)])
    scores.to_parquet(run / "scores.parquet", index=False)
    (run / "aggregates.parquet").unlink()  # the report recomputes what is missing
    (run / "deltas.parquet").unlink()


@pytest.fixture(scope="module")
def bias_report(smoke_run, tmp_path_factory, repo_cwd) -> tuple[Path, str]:
    run = _copy_run(smoke_run, tmp_path_factory.mktemp("bias") / "smoke" / "run-bias")
    _add_bias_and_ocr_scores(run)
    return run, build_report(run).read_text(encoding="utf-8")


def test_bias_and_text_sections(bias_report):
    run, text = bias_report
    assert 'id="bias"' in text and "perceived presentation" in text and "not the identity" in text
    for colour in MONK_COLOURS:
        assert colour in text
    assert "coverage" in text and "89.5%" in text  # the nurse's BLS reference share
    assert "&lt;script&gt;document.title=" in text and XSS not in text  # OCR read-back is escaped too
    cells = _parse(text).cells
    assert cells["signs|tiny|1||ocr_exact"].startswith(fmt(0.5))
    assert not (run / "aggregates.parquet").exists()  # recomputed in memory, the run is not written to


@pytest.fixture(scope="module")
def xss_report(tmp_path_factory) -> tuple[Path, str]:
    """A tiny-model run whose prompt is a script: made through the CLI, then rendered."""
    folder = tmp_path_factory.mktemp("xss")
    suite = folder / "xss.yaml"
    suite.write_text(json.dumps({"name": "xss", "models": ["tiny"], "seeds": 1, "probes": [
        {"name": "inject", "kind": "quality", "prompts": [XSS, "a plain prompt"], "steps": [1]}]}), encoding="utf-8")
    proc = probe_cli("run", str(suite), "--out", str(folder / "reports"), env={"PROBE_CACHE": str(folder / "cache")})
    assert proc.returncode == 0, proc.stderr
    run = (folder / "reports" / "xss" / "latest").resolve()
    return run, build_report(run).read_text(encoding="utf-8")


def test_script_prompt_is_escaped(xss_report):
    _, text = xss_report
    assert XSS not in text and "<script" not in text.lower()
    assert str(escape(XSS)) in text  # shown as text, in the grid and as image alt text


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="headless test needs Debian's chromium (/usr/bin/chromium)")
def test_report_in_headless_chromium(report, bias_report, xss_report, tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text('<img src="nope.png"><script>console.error("boom")</script>', encoding="utf-8")
    load_all = ("Promise.all([...document.images].map(i => { i.loading = 'eager'; return i.complete ? 1 : "
                "new Promise(r => { i.onload = i.onerror = r; }); }))"
                ".then(() => [...document.images].filter(i => !i.naturalWidth).map(i => i.src))")
    with Chrome(tmp_path / "profile") as chrome:
        chrome.open(broken.as_uri())  # the harness sees what it must catch
        assert len(chrome.problems()) >= 2, chrome.problems()
        for run, _ in (report, bias_report, xss_report):
            chrome.open((run / "index.html").as_uri())
            assert chrome.evaluate(load_all, timeout=120) == []  # every image, lazy or collapsed, decodes
            assert chrome.problems() == []
            assert all(url.startswith(run.as_uri()) for url in chrome.requests()), chrome.requests()
            title = chrome.evaluate("document.title")
            assert title.startswith("probe report:") and "pwned" not in title
        assert chrome.evaluate("[...document.querySelectorAll('th.prompt')].map(e => e.textContent)")[0] == XSS
        chrome.screenshot(tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_probe_run_prints_the_report_and_probe_report_rerenders(smoke_run, tmp_path):
    root, _, proc = smoke_run
    assert proc.returncode == 0
    run = (root / "reports" / "smoke" / "latest").resolve()
    assert f"report: {run / 'index.html'}" in proc.stdout.replace("\n", "")
    copy = _copy_run(smoke_run, tmp_path / "smoke" / "copy")
    (copy / "index.html").unlink(missing_ok=True)
    again = probe_cli("report", str(copy), "--baseline", str(run))
    assert again.returncode == 0, again.stderr
    assert (copy / "index.html").is_file() and str(copy / "index.html") in again.stdout.replace("\n", "")
    missing = probe_cli("report", str(tmp_path))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
