"""The rating page in a real browser (Debian's Chromium over CDP) against the real server: five tasks answered with
the keyboard store five votes with the pressed sides, the images decode, nothing errs, and the last answer leads
to the thank-you page. With PROBE_SAVE_SCREENSHOT=1 it also saves the README's screenshot of the page."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from tests.chrome import CHROMIUM, Chrome
from tests.test_rate_server import RateServer

SCREENSHOT = Path(__file__).resolve().parents[1] / "probe" / "rate" / "static" / "rating-page.png"
# key -> (CDP key event fields, the side it picks)
KEYS: dict[str, tuple[dict[str, Any], str]] = {
    "ArrowLeft": ({"key": "ArrowLeft", "code": "ArrowLeft", "windowsVirtualKeyCode": 37}, "left"),
    "ArrowRight": ({"key": "ArrowRight", "code": "ArrowRight", "windowsVirtualKeyCode": 39}, "right"),
    "1": ({"key": "1", "code": "Digit1", "windowsVirtualKeyCode": 49, "text": "1"}, "left"),
    "2": ({"key": "2", "code": "Digit2", "windowsVirtualKeyCode": 50, "text": "2"}, "right"),
}


def press(chrome: Chrome, name: str) -> None:
    """A real key press: keyDown (with its character, if any) then keyUp, through the browser's input pipeline."""
    fields = KEYS[name][0]
    chrome.call("Input.dispatchKeyEvent", {"type": "keyDown" if "text" in fields else "rawKeyDown", **fields},
                session=True)
    chrome.call("Input.dispatchKeyEvent", {"type": "keyUp", **{k: v for k, v in fields.items() if k != "text"}},
                session=True)


def wait_until(chrome: Chrome, expression: str, timeout: float = 20) -> Any:
    """Poll a JS expression until it is truthy (a navigation in between only delays it); its value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = chrome.evaluate(expression, timeout=timeout)
        except RuntimeError:  # the execution context went away with a navigation
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"still false after {timeout} s: {expression}")
        time.sleep(0.05)


SHOWN = """(async () => {
  const imgs = [document.getElementById('left'), document.getElementById('right')];
  if (document.getElementById('task').hidden || typeof task === 'undefined' || !task) return null;
  if (imgs.some(i => !i.complete || !i.src.endsWith('/image/' + (i.id === 'left' ? task.left : task.right))))
    return null;
  await Promise.all(imgs.map(i => i.decode()));
  return {pair: task.pair, question: task.question, left: task.left, right: task.right,
          count: document.getElementById('count').textContent,
          widths: imgs.map(i => i.naturalWidth), busy: document.getElementById('pick-left').disabled};
})()"""


def test_a_rater_answers_with_the_keyboard_and_reaches_the_thank_you_page(rating_run, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("the browser test needs Debian's chromium")
    server = RateServer(rating_run, "--pairs", "6", "--attention", "0", "--raters", "1").start()
    try:
        (rater, link), = server.links.items()
        with Chrome(tmp_path / "profile", width=1100, height=700) as chrome:
            chrome.open(link)
            pressed, tasks = [], []
            for i, key in enumerate(["ArrowLeft", "ArrowRight", "1", "2", "ArrowLeft"]):
                shown = wait_until(chrome, SHOWN)
                assert shown["count"] == f"{i} of 6 answered" and not shown["busy"]
                assert all(width > 0 for width in shown["widths"]), shown  # both images decoded
                if i == 0 and os.environ.get("PROBE_SAVE_SCREENSHOT") == "1":
                    chrome.screenshot(SCREENSHOT)
                tasks.append(shown)
                press(chrome, key)
                pressed.append(KEYS[key][1])
                wait_until(chrome, f"document.getElementById('count').textContent === '{i + 1} of 6 answered'")
            assert chrome.problems() == []
            with sqlite3.connect(rating_run / "ratings.sqlite") as db:
                rows = db.execute("SELECT rater, pair, question, choice, left_key FROM votes ORDER BY id").fetchall()
            assert len(rows) == 5
            assert rows == [(rater, t["pair"], t["question"], side, t["left"]) for t, side in zip(tasks, pressed,
                                                                                                  strict=True)]
            last = wait_until(chrome, SHOWN)
            assert last["count"] == "5 of 6 answered" and all(width > 0 for width in last["widths"])
            press(chrome, "2")
            wait_until(chrome, "location.pathname.endsWith('/done') && document.readyState === 'complete'")
            assert f"Thank you, {rater}!" in chrome.evaluate("document.body.innerText")
            assert chrome.problems() == []
        with sqlite3.connect(rating_run / "ratings.sqlite") as db:
            assert db.execute("SELECT count(*) FROM votes").fetchone()[0] == 6
    finally:
        code = server.interrupt()
    assert code == 0, f"Ctrl-C did not stop the server cleanly:\n{server.output()}"
