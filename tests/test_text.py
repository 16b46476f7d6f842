"""The ocr metric: text-matching maths on hand-made pairs, target extraction, and OCR read-back of rendered text.

The maths tests need no OCR engine. The read-back tests render words with DejaVu Sans (it ships with
matplotlib) and read them with rapidocr's bundled models, all images in one scoring pass per module
(about 2 s per 512 px image on 2 CPU cores), so the suite stays lean.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from probe.score.metrics.text import OUTPUTS, Ocr, OcrReading, text_scores
from probe.score.metrics.text_match import (
    TextNormalisation,
    cer,
    exact_match,
    extract_targets,
    normalise,
    scoring_target,
    word_prf,
)
from probe.score.protocol import ImageItem, ImageMetric, Score, ScoringContext
from probe.store.features import FeatureCache

WORDS = ["OPEN", "Hello World", "SALE 50", "Coffee"]
BACKGROUNDS = ["plain", "coloured", "rotated", "noisy"]
SIZE = 512


def render(text: str, background: str = "plain", variant: int = 0) -> Image.Image:
    """`text` centred on a 512 px square: plain (black on white), coloured (yellow on dark blue), rotated
    (+10 or -10 degrees by `variant` parity, on white) or noisy (Gaussian noise, sigma 40, on light grey)."""
    from matplotlib import font_manager

    font_file = font_manager.findfont("DejaVu Sans", fallback_to_default=False)
    size = 72
    font = ImageFont.truetype(font_file, size)
    while font.getlength(text) > 0.8 * SIZE:
        size -= 4
        font = ImageFont.truetype(font_file, size)
    ground, ink = {"coloured": ((20, 40, 110), (250, 210, 40)), "noisy": ((200, 200, 200), (20, 20, 20))}.get(
        background, ((255, 255, 255), (0, 0, 0)))
    image = Image.new("RGB", (SIZE, SIZE), ground)
    ImageDraw.Draw(image).text((SIZE / 2, SIZE / 2), text, font=font, fill=ink, anchor="mm")
    if background == "rotated":
        angle = 10 if variant % 2 == 0 else -10
        image = image.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=ground)
    if background == "noisy":
        noise = np.random.default_rng(variant).normal(0.0, 40.0, (SIZE, SIZE, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=float) + noise, 0, 255).astype(np.uint8))
    return image


# --- maths on hand-made pairs (no OCR) ---------------------------------------------------------------


def test_normalise_each_flag() -> None:
    raw = "  ＯＰＥＮ,\n  Now!  Straße "
    assert normalise(raw) == "open now strasse"
    assert normalise(raw, TextNormalisation(casefold=False)) == "OPEN Now Straße"
    assert normalise(raw, TextNormalisation(nfkc=False)) == "ｏｐｅｎ now strasse"
    assert normalise(raw, TextNormalisation(drop_punctuation=False)) == "open, now! strasse"
    assert normalise(raw, TextNormalisation(collapse_whitespace=False)) == "  open\n  now  strasse "
    assert normalise("Let's go - KA-BOOM $10,000") == "lets go kaboom $10000"  # symbols ($) are kept


def test_exact_match() -> None:
    assert exact_match("open", "open")
    assert not exact_match("opem", "open")
    assert exact_match(normalise("Open!"), normalise("OPEN"))


@pytest.mark.parametrize(("pred", "target", "expected"), [
    ("open", "open", 0.0),
    ("opem", "open", 0.25),          # one substitution
    ("opn", "open", 0.25),           # one deletion
    ("", "open", 1.0),               # nothing read: every character missing
    ("hello world", "hello", 6 / 5), # six insertions: raw CER exceeds 1 and is not capped
    ("kitten", "sitting", 3 / 7),    # the textbook Levenshtein pair
])
def test_cer(pred: str, target: str, expected: float) -> None:
    assert cer(pred, target) == pytest.approx(expected)


def test_cer_of_empty_target_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty target"):
        cer("open", "")


@pytest.mark.parametrize(("pred", "target", "p", "r"), [
    ("be kind", "be kind", 1.0, 1.0),
    ("Be KIND", "be kind", 1.0, 1.0),          # lower-cased as MARIO-Eval does
    ("kind be", "be kind", 1.0, 1.0),          # order does not matter
    ("be", "be kind", 1.0, 0.5),
    ("be kind now", "be kind", 2 / 3, 1.0),
    ("start start", "start", 0.5, 1.0),        # multisets: a target word is matched once
    ("start", "start start", 1.0, 0.5),
    ("", "open", 0.0, 0.0),
    ("closed", "open", 0.0, 0.0),
])
def test_word_prf(pred: str, target: str, p: float, r: float) -> None:
    scores = word_prf(pred, target)
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    assert (scores.precision, scores.recall, scores.f1) == pytest.approx((p, r, f1))


def test_word_prf_of_empty_target_is_an_error() -> None:
    with pytest.raises(ValueError):
        word_prf("open", "   ")


@pytest.mark.parametrize(("prompt", "targets"), [
    ('a sign that says "OPEN"', ["OPEN"]),
    ('a mug with "LOVE" on one side and "PEACE" on the other', ["LOVE", "PEACE"]),
    ("the word 'START' written above the word 'SMILING'", ["START", "SMILING"]),
    ("a store front that has the word ‘openai’ written on it.", ["openai"]),
    ("a neon sign “Open 24 Hours”", ["Open 24 Hours"]),
    ("a book with the words 'Don't Panic!' written on it", ["Don't Panic!"]),  # apostrophe inside
    ('a robot holding a sign with "Let\'s PAINT!" written on it', ["Let's PAINT!"]),
    ("a sign saying ‘don’t stop’", ["don’t stop"]),
    ("Portrait of a tiger wearing a train conductor's hat, child's crayon drawing", []),  # apostrophes only
    ("world's best brother t-shirt", []),
    ("a wooden post with a yellow '3' painted on top", ["3"]),
    ('a blank sign ""', []),
    ("a sign that says Deep Learning", []),  # unquoted text cannot be told from the rest of the prompt
])
def test_extract_targets(prompt: str, targets: list[str]) -> None:
    assert extract_targets(prompt) == targets


def test_scoring_target_prefers_explicit_text() -> None:
    assert scoring_target('a sign that says "OPEN"', "CLOSED") == "CLOSED"
    assert scoring_target('a mug with "LOVE" and "PEACE"', None) == "LOVE PEACE"
    assert scoring_target("a red apple", None) is None


def _by_metric(rows: list[Score]) -> dict[str, Score]:
    return {row.metric: row for row in rows}


def test_text_scores_of_a_hand_made_reading() -> None:
    reading = OcrReading(("Hello", "Wrld!"), (((0, 0), (1, 0), (1, 1), (0, 1)),) * 2, (0.99, 0.8))
    rows = _by_metric(text_scores("k", reading, "Hello World", TextNormalisation(), "fake"))
    assert set(rows) == set(OUTPUTS)
    assert rows["ocr_exact"].value == 0.0 and rows["ocr_exact"].text == "Hello Wrld!"
    assert rows["ocr_cer"].value == pytest.approx(1 / 11)
    assert rows["ocr_f1"].value == pytest.approx(0.5)
    assert rows["ocr_detected"].value == 1.0
    assert rows["ocr_exact"].extra["target"] == "Hello World"
    assert rows["ocr_exact"].extra["confidences"] == [0.99, 0.8]


def test_text_scores_without_text_or_target() -> None:
    empty = OcrReading((), (), ())
    rows = _by_metric(text_scores("k", empty, "OPEN", TextNormalisation(), "fake"))
    assert (rows["ocr_exact"].value, rows["ocr_cer"].value, rows["ocr_f1"].value) == (0.0, 1.0, 0.0)
    assert rows["ocr_detected"].value == 0.0 and rows["ocr_detected"].label == "no_text"
    untargeted = _by_metric(text_scores("k", empty, None, TextNormalisation(), "fake"))
    assert all(untargeted[m].value is None and untargeted[m].label == "no_target"
               for m in ("ocr_exact", "ocr_cer", "ocr_f1"))
    assert untargeted["ocr_detected"].value == 0.0


def test_text_scores_normalise_before_matching() -> None:
    reading = OcrReading(("open!",), (((0, 0), (1, 0), (1, 1), (0, 1)),), (0.9,))
    rows = _by_metric(text_scores("k", reading, "OPEN", TextNormalisation(), "fake"))
    assert (rows["ocr_exact"].value, rows["ocr_cer"].value, rows["ocr_f1"].value) == (1.0, 0.0, 1.0)
    strict = _by_metric(text_scores("k", reading, "OPEN", TextNormalisation(casefold=False), "fake"))
    assert strict["ocr_exact"].value == 0.0 and strict["ocr_cer"].value == 1.0
    punctuation_only = _by_metric(text_scores("k", reading, "?!", TextNormalisation(), "fake"))
    assert punctuation_only["ocr_cer"].value is None and punctuation_only["ocr_cer"].label == "empty_target"


def test_unknown_engine_suggests() -> None:
    with pytest.raises(Exception, match="rapidocr"):
        Ocr(engine="rapid")


# --- OCR read-back of rendered text (one scoring pass) ---------------------------------------------


FIXTURES = [
    *((f"plain-{i}", w, "plain", i) for i, w in enumerate(WORDS)),
    ("coloured-0", "Coffee", "coloured", 0),
    ("rotated-0", "OPEN", "rotated", 0),
    ("rotated-1", "SALE 50", "rotated", 1),
    ("noisy-0", "Hello World", "noisy", 0),
]


@pytest.fixture(scope="module")
def readback(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict[str, Score]], dict]:
    """Every fixture image, plus a blank one, scored by one Ocr in one context: (rows by key, config)."""
    folder = tmp_path_factory.mktemp("ocr")
    items = []
    for key, word, background, variant in FIXTURES:
        render(word, background, variant).save(folder / f"{key}.png")
        items.append(ImageItem(key=key, path=folder / f"{key}.png", prompt=f'a sign that says "{word}"'))
    Image.new("RGB", (SIZE, SIZE), (255, 255, 255)).save(folder / "blank.png")
    items.append(ImageItem(key="blank", path=folder / "blank.png", prompt="a blank wall", text="OPEN"))
    ctx = ScoringContext(features=FeatureCache(folder / "cache"))
    metric = Ocr()
    assert isinstance(metric, ImageMetric)
    config = metric.config(ctx)
    rows = metric.score(items, ctx)
    grouped: dict[str, dict[str, Score]] = {}
    for row in rows:
        grouped.setdefault(str(row.key), {})[row.metric] = row
    return grouped, config


@pytest.mark.parametrize("index", range(len(WORDS)))
def test_plain_renders_are_read_back(readback: tuple[dict[str, dict[str, Score]], dict], index: int) -> None:
    rows = readback[0][f"plain-{index}"]
    assert rows["ocr_detected"].value == 1.0
    assert rows["ocr_cer"].value is not None and rows["ocr_cer"].value <= 0.1, rows["ocr_exact"].text
    assert rows["ocr_exact"].extra["target"] == WORDS[index]  # extracted from the prompt's quotes


@pytest.mark.parametrize("key", ["coloured-0", "rotated-0", "rotated-1", "noisy-0"])
def test_harder_renders_are_mostly_read(readback: tuple[dict[str, dict[str, Score]], dict], key: str) -> None:
    rows = readback[0][key]
    assert rows["ocr_detected"].value == 1.0
    assert rows["ocr_cer"].value is not None and rows["ocr_cer"].value <= 0.25, rows["ocr_exact"].text


def test_blank_image_has_no_text(readback: tuple[dict[str, dict[str, Score]], dict]) -> None:
    rows = readback[0]["blank"]
    assert rows["ocr_detected"].value == 0.0
    assert rows["ocr_cer"].value == 1.0 and rows["ocr_exact"].value == 0.0 and rows["ocr_f1"].value == 0.0
    assert rows["ocr_exact"].text == ""


def test_config_records_engine_models_and_settings(readback: tuple[dict[str, dict[str, Score]], dict]) -> None:
    config = readback[1]
    assert config["engine"] == "rapidocr" and config["version"]
    assert set(config["models"]) == {"det", "cls", "rec"}
    assert all(m["file"].endswith(".onnx") and len(m["sha256"]) == 64 for m in config["models"].values())
    assert config["thresholds"]["text_score"] == 0.5
    assert config["normalisation"] == TextNormalisation().describe()


def test_import_probe_does_not_import_rapidocr() -> None:
    import subprocess
    import sys

    code = "import sys, probe, probe.score.metrics.text; print('rapidocr' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "False"


def test_the_ocr_engine_loads_its_models_on_the_first_image_not_in_pre_flight(tmp_path: Path):
    """The metric's config (built in pre-flight, before generation) describes the engine without loading it."""
    ctx = ScoringContext(features=FeatureCache(tmp_path / "cache"))
    metric = Ocr()
    config = metric.config(ctx)
    engine = next(v for v in ctx._shared.values())
    assert config["engine"] == "rapidocr" and engine._session is None
    image = Image.new("RGB", (64, 64), "white")
    path = tmp_path / "blank.png"
    image.save(path)
    metric.score([ImageItem(key="k", path=path, prompt="a sign", text="OPEN")], ctx)
    assert engine._session is not None
