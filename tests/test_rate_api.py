"""The rating app through FastAPI's test client: the rater flow, and every kind of bad request refused with a 4xx
and nothing written (tokens, forged pairs, bad choices, path tricks, cross-site POSTs, wrong hosts)."""

from __future__ import annotations

import sqlite3

import pytest
from fastapi.testclient import TestClient

from probe.rate.app import create_app, csrf_value, join_value
from probe.rate.study import task_order
from tests.rating_helpers import new_study

HOSTS = ["127.0.0.1", "localhost", "testserver"]


def _client(run_dir, study) -> TestClient:
    return TestClient(create_app(run_dir, study.id, HOSTS), base_url="http://testserver")


def _votes(run_dir) -> int:
    with sqlite3.connect(run_dir / "ratings.sqlite") as db:
        return db.execute("SELECT count(*) FROM votes").fetchone()[0]


def _post(client, token, study, body, **headers):
    return client.post(f"/r/{token}/vote", json=body,
                       headers={"X-Probe-CSRF": csrf_value(study, token), **headers})


def test_a_rater_answers_every_task_in_their_order_and_resumes_where_they_left_off(rating_run):
    store, study, links = new_study(rating_run, questions=("quality", "prompt"), pairs=6, attention=1)
    (rater, token), _ = links
    client = _client(rating_run, study)
    page = client.get(f"/r/{token}")
    assert page.status_code == 200 and csrf_value(study, token) in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    expected = task_order(study, rater, store.pairs(study.id))
    assert len(expected) == 7 * 2
    seen = []
    state = client.get(f"/r/{token}/next").json()
    for i in range(5):
        task = state["task"]
        seen.append((task["pair"], task["question"]))
        image = client.get(f"/r/{token}/image/{task['left']}")
        assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
        state = _post(client, token, study, {"pair": task["pair"], "question": task["question"],
                                              "choice": "left" if i % 2 else "right"}).json()
        assert state["stored"] is True and state["duplicate"] is False
        assert state["progress"] == {"answered": i + 1, "total": 14}
    assert seen == expected[:5]
    # a new client (a reload, a restarted server) continues with the sixth task
    again = _client(rating_run, study).get(f"/r/{token}/next").json()
    assert (again["task"]["pair"], again["task"]["question"]) == expected[5]
    votes = store.votes(study.id)
    assert len(votes) == 5 and set(votes["rater"]) == {rater}
    first = votes.iloc[0]
    assert first["chosen"] != first["left"] and first["choice"] == "right"  # the first vote chose the right image
    assert first["shown_at"] <= first["answered_at"]


def test_repeating_a_vote_stores_it_once(rating_run):
    store, study, links = new_study(rating_run)
    token = links[0][1]
    client = _client(rating_run, study)
    task = client.get(f"/r/{token}/next").json()["task"]
    body = {"pair": task["pair"], "question": task["question"], "choice": "left"}
    assert _post(client, token, study, body).json()["duplicate"] is False
    again = _post(client, token, study, {**body, "choice": "right"})
    assert again.status_code == 200 and again.json()["duplicate"] is True
    votes = store.votes(study.id)
    assert len(votes) == 1 and votes.iloc[0]["choice"] == "left"


def test_every_task_answered_leads_to_the_thank_you_page(rating_run):
    store, study, links = new_study(rating_run, pairs=2, attention=0)
    rater, token = links[0]
    client = _client(rating_run, study)
    state = client.get(f"/r/{token}/next").json()
    while not state["done"]:
        state = _post(client, token, study, {"pair": state["task"]["pair"], "question": state["task"]["question"],
                                              "choice": "left"}).json()
    assert state["progress"] == {"answered": 2, "total": 2}
    done = client.get(f"/r/{token}/done")
    assert done.status_code == 200 and f"Thank you, {rater}" in done.text


@pytest.mark.parametrize("case", ["unknown token", "other study's token", "forged pair", "negative pair",
                                  "unknown question", "bad choice", "extra field", "not shown yet", "no csrf",
                                  "wrong csrf", "cross-site origin", "form post", "huge body", "string pair"])
def test_bad_votes_get_a_4xx_and_write_nothing(rating_run, case):
    store, study, links = new_study(rating_run, pairs=4)
    _, _, other_links = new_study(rating_run, pairs=4, seed=1, study_id="other")
    token = links[0][1]
    client = _client(rating_run, study)
    task = client.get(f"/r/{token}/next").json()["task"]
    good = {"pair": task["pair"], "question": task["question"], "choice": "left"}
    unshown = next(p.pair for p in store.pairs(study.id) if p.pair != task["pair"])
    csrf = {"X-Probe-CSRF": csrf_value(study, token)}
    url = f"/r/{token}/vote"
    if case == "unknown token":
        response = client.post("/r/not-a-token/vote", json=good, headers=csrf)
    elif case == "other study's token":
        other = other_links[0][1]
        response = client.post(f"/r/{other}/vote", json=good, headers={"X-Probe-CSRF": csrf_value(study, other)})
    elif case == "forged pair":
        response = client.post(url, json={**good, "pair": 999}, headers=csrf)
    elif case == "negative pair":
        response = client.post(url, json={**good, "pair": -1}, headers=csrf)
    elif case == "unknown question":
        response = client.post(url, json={**good, "question": "beauty"}, headers=csrf)
    elif case == "bad choice":
        response = client.post(url, json={**good, "choice": "both"}, headers=csrf)
    elif case == "extra field":
        response = client.post(url, json={**good, "rater": "someone-else"}, headers=csrf)
    elif case == "not shown yet":
        response = client.post(url, json={**good, "pair": unshown}, headers=csrf)
    elif case == "no csrf":
        response = client.post(url, json=good)
    elif case == "wrong csrf":
        response = client.post(url, json=good, headers={"X-Probe-CSRF": csrf_value(study, links[1][1])})
    elif case == "cross-site origin":
        response = client.post(url, json=good, headers={**csrf, "Origin": "http://evil.example"})
    elif case == "form post":
        response = client.post(url, data=good, headers=csrf)
    elif case == "huge body":
        response = client.post(url, content=b"{" + b" " * 10_000 + b"}",
                               headers={**csrf, "Content-Type": "application/json"})
    else:
        response = client.post(url, json={**good, "pair": "0; DROP TABLE votes"}, headers=csrf)
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
    assert _votes(rating_run) == 0
    assert _post(client, token, study, good).status_code == 200  # the good vote still goes through afterwards


@pytest.mark.parametrize("key", ["../manifest.json", "..%2Fmanifest.json", "%2e%2e%2fjobs.parquet",
                                 "images/../../../etc/passwd", "0" * 64, "manifest.json"])
def test_images_are_served_by_key_only(rating_run, key):
    _, study, links = new_study(rating_run, pairs=2)
    response = _client(rating_run, study).get(f"/r/{links[0][1]}/image/{key}")
    assert response.status_code == 404
    assert b"probe_version" not in response.content and b"root:" not in response.content


def test_an_image_of_the_study_whose_stored_path_leaves_the_run_folder_is_refused(rating_run, tmp_path):
    store, study, links = new_study(rating_run, pairs=2)
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"\x89PNG secret")
    pair = store.pairs(study.id)[0]
    with store.transaction() as db:
        db.execute("UPDATE pairs SET a_path = ? WHERE study = ? AND pair = ?", (f"../{outside.name}", study.id,
                                                                                 pair.pair))
    response = _client(rating_run, study).get(f"/r/{links[0][1]}/image/{pair.a_key}")
    assert response.status_code == 404 and b"secret" not in response.content


def test_a_wrong_host_header_is_refused(rating_run):
    _, study, links = new_study(rating_run, pairs=2)
    client = TestClient(create_app(rating_run, study.id, ["127.0.0.1"]), base_url="http://attacker.example")
    assert client.get(f"/r/{links[0][1]}").status_code == 400


def test_prompts_are_escaped_on_the_page_and_sent_as_text(rating_run):
    store, study, links = new_study(rating_run, pairs=2)
    with store.transaction() as db:
        db.execute("UPDATE pairs SET prompt = ? WHERE study = ?", ("<script>alert(1)</script>", study.id))
    client = _client(rating_run, study)
    assert client.get(f"/r/{links[0][1]}/next").json()["task"]["prompt"] == "<script>alert(1)</script>"
    assert "<script>alert" not in client.get(f"/r/{links[0][1]}").text
    script = client.get("/static/rate.js").text
    assert "textContent = task.prompt" in script and "innerHTML" not in script


def test_open_study_raters_join_by_name_and_the_same_name_resumes(rating_run):
    store, study, _ = new_study(rating_run, pairs=2, open_study=True)
    client = _client(rating_run, study)
    assert "Your name" in client.get("/").text
    headers = {"X-Probe-CSRF": join_value(study)}
    first = client.post("/join", json={"name": "Ada"}, headers=headers)
    assert first.status_code == 200
    again = client.post("/join", json={"name": "Ada"}, headers=headers)
    assert again.json()["url"] == first.json()["url"]
    assert client.post("/join", json={"name": "Bob"}).status_code == 403  # no join value: refused
    assert client.post("/join", json={"name": "<b>"}, headers=headers).status_code == 422
    assert [r for r, _ in store.raters(study.id)] == ["Ada"]
    assert client.get(first.json()["url"]).status_code == 200


def test_a_study_by_link_has_no_join(rating_run):
    _, study, _ = new_study(rating_run, pairs=2)
    client = _client(rating_run, study)
    assert "personal link" in client.get("/").text
    assert client.post("/join", json={"name": "Eve"}, headers={"X-Probe-CSRF": join_value(study)}).status_code == 404
