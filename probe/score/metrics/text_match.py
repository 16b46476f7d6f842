"""Pure text-matching maths for the ocr metric: normalisation, exact match, CER, word P/R/F1, quoted targets.

No I/O and no OCR here, so every formula is tested on hand-made pairs independently of any engine.
Conventions (each one recorded in the ocr metric's config, so a number can be traced to the rule behind it):

- exact match and CER compare the *normalised* prediction and target (`normalise`, `TextNormalisation`);
- CER is raw edit distance / target length and is NOT capped: a prediction with more wrong characters than
  the target has (e.g. hallucinated extra text) gives CER > 1. An empty prediction gives exactly 1;
- word precision / recall / F1 count words as MARIO-Eval does (TextDiffuser, Chen et al. 2023,
  "TextDiffuser: Diffusion Models as Text Painters", NeurIPS; microsoft/unilm textdiffuser evaluation
  script `get_p_r_acc`): lower-cased, whitespace-split words as multisets, each target word matched at
  most once. MARIO-Eval reports F1 of the mean P and mean R; we keep P and R per image so both the mean
  of per-image F1 and the F1 of means can be computed.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from rapidfuzz.distance import Levenshtein

__all__ = [
    "TextNormalisation",
    "WordScores",
    "cer",
    "exact_match",
    "extract_targets",
    "normalise",
    "scoring_target",
    "word_prf",
]


@dataclass(frozen=True)
class TextNormalisation:
    """How prediction and target are normalised before exact match, CER and word F1.

    The defaults forgive what OCR of a generated image cannot be expected to recover (letter case of
    stylised lettering, punctuation, line breaks), so the scores measure whether the *words* were drawn.
    """

    casefold: bool = True
    """Unicode case folding (stronger than lower(): 'ß' -> 'ss')."""
    nfkc: bool = True
    """Unicode NFKC: full-width and compatibility forms ('ＯＰＥＮ', 'ﬁ') become their plain equivalents."""
    collapse_whitespace: bool = True
    """Runs of whitespace (line breaks between OCR boxes included) become one space; ends are stripped."""
    drop_punctuation: bool = True
    """Delete characters of Unicode category P* (.,!?'"-…); symbols such as $ + = are kept."""

    def describe(self) -> dict[str, Any]:
        """The settings as a plain dict, for the manifest."""
        return asdict(self)


DEFAULT_NORMALISATION = TextNormalisation()


def normalise(text: str, settings: TextNormalisation = DEFAULT_NORMALISATION) -> str:
    """Apply the enabled normalisations in a fixed order: NFKC, case-fold, punctuation, whitespace.

    NFKC runs first so compatibility punctuation (full-width '！') is recognised as punctuation, and
    whitespace is collapsed last so deleting punctuation between spaces leaves no double space.
    """
    if settings.nfkc:
        text = unicodedata.normalize("NFKC", text)
    if settings.casefold:
        text = text.casefold()
    if settings.drop_punctuation:
        text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    if settings.collapse_whitespace:
        text = " ".join(text.split())
    return text


def exact_match(pred: str, target: str) -> bool:
    """Whether the two (already normalised) strings are identical."""
    return pred == target


def cer(pred: str, target: str) -> float:
    """Character error rate: Levenshtein distance(pred, target) / len(target), uncapped.

    Unit-cost insertions, deletions and substitutions (rapidfuzz). An empty prediction scores 1.0; a
    prediction longer than the target can score above 1, which we keep rather than clip so that extra
    hallucinated text is visible in the mean.

    Raises:
        ValueError: for an empty target, where the rate is undefined (callers label such images instead).
    """
    if not target:
        raise ValueError("CER is undefined for an empty target")
    return Levenshtein.distance(pred, target) / len(target)


@dataclass(frozen=True)
class WordScores:
    """Word-level precision, recall and F1 of one prediction against one target."""

    precision: float
    recall: float
    f1: float


def _words(text: str) -> list[str]:
    return [w.lower() for w in text.split()]


def word_prf(pred: str, target: str) -> WordScores:
    """MARIO-Eval word precision / recall, and their F1, for one image.

    Words are lower-cased and whitespace-split; matching is on multisets (a target word said twice must be
    read twice). P = matched / |pred words|, R = matched / |target words|, F1 = 2PR / (P + R). With no
    predicted words P = 0 (MARIO-Eval divides by |pred| + 1e-8, giving 0); F1 is 0 when P + R = 0.

    Raises:
        ValueError: when the target has no words.
    """
    target_words = Counter(_words(target))
    if not target_words:
        raise ValueError("word F1 is undefined for a target without words")
    pred_words = Counter(_words(pred))
    matched = sum((pred_words & target_words).values())
    precision = matched / sum(pred_words.values()) if pred_words else 0.0
    recall = matched / sum(target_words.values())
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return WordScores(precision, recall, f1)


# Leftmost-first alternation, so an apostrophe inside a double-quoted part ("Let's PAINT!") stays in it.
# Single quotes (straight or curly) only open after a non-word character and only close before one, so
# apostrophes inside words (conductor's, don't, Let’s) never start or end a quoted part.
_QUOTED = re.compile(
    r'"(?P<double>[^"]+?)"'
    r"|“(?P<curly_double>[^”]+?)”"
    r"|„(?P<low_double>[^“”]+?)[“”]"
    r"|«\s?(?P<guillemets>[^»]+?)\s?»"
    r"|(?<!\w)'(?P<single>\S(?:.*?\S)?)'(?!\w)"
    r"|(?<!\w)‘(?P<curly_single>\S(?:.*?\S)?)’(?!\w)"
)


def extract_targets(prompt: str) -> list[str]:
    """The quoted parts of a prompt, in order: 'a sign that says "OPEN"' -> ["OPEN"].

    Handles straight and curly double quotes, low-9 and guillemet quotes, and single quotes (straight or
    curly) that are not apostrophes inside words. Empty or whitespace-only quotes are ignored.
    """
    found = []
    for match in _QUOTED.finditer(prompt):
        text = next(g for g in match.groups() if g is not None).strip()
        if text:
            found.append(text)
    return found


def scoring_target(prompt: str, text: str | None) -> str | None:
    """The text an image is scored against: the explicit `text` if given, else the prompt's quoted parts
    joined by a space, else None (the image has no target and is skipped by the text scores)."""
    if text is not None and text.strip():
        return text
    quoted = extract_targets(prompt)
    return " ".join(quoted) if quoted else None
