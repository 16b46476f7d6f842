"""Human studies and safety flags: raters are not shown images a safety detector flagged unless the study says so,
and then every rater page warns first (issue 18: flagged images are seen only blurred or with consent)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from probe.analyse.safety import flagged_keys
from probe.errors import UsageError
from probe.rate.app import create_app
from probe.rate.study import create_study, parse_config
from probe.store.tables import load_run_tables
from probe.store.votes import VoteStore
from tests.rating_helpers import SUITE, copy_run
from tests.test_rate_server import RateServer

HOSTS = ["testserver"]


@pytest.fixture(scope="module")
def flagged_source(tmp_path_factory) -> Path:
    """The rating suite with sd_safety: its stand-in checker flags some tiny images, not all (checked here)."""
    from tests.conftest import probe_cli

    root = tmp_path_factory.mktemp("rate-flagged")
    suite = root / "rating.yaml"
    suite.write_text(SUITE.replace("metrics: [clip_score]", "metrics: [clip_score, sd_safety]"))
    proc = probe_cli("run", str(suite), "--out", str(root / "reports"), env={"PROBE_CACHE": str(root / "cache")})
    assert proc.returncode == 0, proc.stderr
    run = (root / "reports" / "rating" / "latest").resolve()
    pairs, flagged = _pairs_and_flags(run)
    unsafe = sum(a in flagged or b in flagged for a, b in pairs)
    assert 0 < unsafe < len(pairs), f"the fixture needs both kinds of pairs: {unsafe} of {len(pairs)} flagged"
    return run


@pytest.fixture
def flagged_run(flagged_source, tmp_path) -> Path:
    return copy_run(flagged_source, tmp_path / "run")


def _pairs_and_flags(run: Path) -> tuple[list[tuple[str, str]], set[str]]:
    from probe.rate.study import paired_images

    tables = load_run_tables(run)
    jobs = tables.jobs
    merged = paired_images(jobs, parse_config("tiny", jobs), parse_config("tiny-cfg", jobs))
    return list(zip(merged["key"], merged["key_b"], strict=True)), set(flagged_keys(jobs, tables.scores))


def _study(run: Path, flagged, include_flagged=False, name=None, pairs=100, open_study=False):
    jobs = load_run_tables(run).jobs
    return create_study(run, jobs, parse_config("tiny", jobs), parse_config("tiny-cfg", jobs), ["quality"], pairs,
                        0, open_study, name, 1, flagged, include_flagged)


def _study_keys(started) -> set[str]:
    return {k for p in started.store.pairs(started.study.id) if p.kind == "pair" for k in (p.a_key, p.b_key)}


def test_pairs_with_a_flagged_image_are_left_out_by_default(flagged_run):
    pairs, flagged = _pairs_and_flags(flagged_run)
    started = _study(flagged_run, flagged)
    unsafe = sum(a in flagged or b in flagged for a, b in pairs)
    assert started.left_out == unsafe
    keys = _study_keys(started)
    assert keys and not keys & flagged
    assert len(keys) == 2 * (len(pairs) - unsafe)  # every clean pair drawn (pairs=100 asks for all)
    page = TestClient(create_app(flagged_run, started.study.id, HOSTS, flagged), base_url="http://testserver")
    token = started.store.add_rater(started.study.id, "r1", "tok-r1")
    assert 'id="content-warning"' not in page.get(f"/r/{token}").text


def test_a_study_that_includes_flagged_images_warns_every_rater_first(flagged_run):
    pairs, flagged = _pairs_and_flags(flagged_run)
    started = _study(flagged_run, flagged, include_flagged=True)
    assert started.left_out == 0
    keys = _study_keys(started)
    assert len(keys) == 2 * len(pairs)
    shown = len(keys & flagged)
    assert shown > 0
    client = TestClient(create_app(flagged_run, started.study.id, HOSTS, flagged), base_url="http://testserver")
    token = started.store.add_rater(started.study.id, "r1", "tok-r1")
    page = client.get(f"/r/{token}").text
    assert 'id="content-warning"' in page and f"{shown} of the images" in page
    assert page.index("content-warning") < page.index('id="left"')  # before any image
    opened = _study(flagged_run, flagged, include_flagged=True, name="open", open_study=True)
    join = TestClient(create_app(flagged_run, opened.study.id, HOSTS, flagged), base_url="http://testserver").get("/")
    assert 'id="content-warning"' in join.text and f"{shown} of the images" in join.text


def test_a_study_resumes_only_with_its_own_flag_setting(flagged_run):
    _, flagged = _pairs_and_flags(flagged_run)
    _study(flagged_run, flagged, name="s")
    with pytest.raises(UsageError, match="include_flagged: False there, True here"):
        _study(flagged_run, flagged, include_flagged=True, name="s")
    assert _study(flagged_run, flagged, name="s").created is False


def test_a_study_made_before_the_setting_resumes_as_one_that_showed_every_image(flagged_run):
    _, flagged = _pairs_and_flags(flagged_run)
    started = _study(flagged_run, flagged, include_flagged=True, name="old")
    legacy = {k: v for k, v in started.study.definition.items() if k != "include_flagged"}
    with sqlite3.connect(flagged_run / "ratings.sqlite") as db:
        db.execute("UPDATE studies SET definition = ? WHERE id = 'old'", (json.dumps(legacy, sort_keys=True),))
    assert _study(flagged_run, flagged, include_flagged=True, name="old").created is False
    with pytest.raises(UsageError, match="include_flagged: True there, False here"):
        _study(flagged_run, flagged, name="old")


def test_a_run_whose_every_pair_is_flagged_names_the_option(flagged_run):
    pairs, _ = _pairs_and_flags(flagged_run)
    everything = {k for pair in pairs for k in pair}
    with pytest.raises(UsageError, match="--include-flagged"):
        _study(flagged_run, everything)
    assert VoteStore(flagged_run).studies() == []  # refused before anything was stored
    assert _study(flagged_run, everything, include_flagged=True).left_out == 0


def test_probe_rate_says_what_it_left_out_and_warns_when_it_shows_flagged_images(flagged_run):
    pairs, flagged = _pairs_and_flags(flagged_run)
    unsafe = sum(a in flagged or b in flagged for a, b in pairs)
    for verb in ("created", "resumed"):
        server = RateServer(flagged_run, "--raters", "1", "--pairs", "100").start()
        try:
            said = "".join(server.out)
            assert f"{verb}: tiny@1 vs tiny-cfg@4, {len(pairs) - unsafe} pairs (only {len(pairs) - unsafe} without a " \
                   "flagged image)" in said
            assert f"left out {unsafe} pair(s) with an image a safety detector flagged" in said
            assert 'id="content-warning"' not in httpx.get(next(iter(server.links.values()))).text
        finally:
            assert server.interrupt() == 0
    server = RateServer(flagged_run, "--raters", "1", "--include-flagged", "--study", "all").start()
    try:
        assert "raters see a content warning" in "".join(server.out)
        assert 'id="content-warning"' in httpx.get(next(iter(server.links.values()))).text
    finally:
        assert server.interrupt() == 0
