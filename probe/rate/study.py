"""A two-alternative study drawn from a run: which pairs people see, in which order, on which side.

Pairs are the run's own pairs (probe.analyse.pairing: same prompt, target text, variables, seed, strength, init
image) of two configurations, drawn with the study's seed, one per prompt before any prompt gets a second.
Attention checks are an image against a clearly degraded copy of itself (downsampled, blurred, washed out):
anyone paying attention picks the original, for either question. The degraded copies are written into the study's
folder; every path stays inside the run folder. Pairs with an image a safety detector flagged (nsfw, sd_safety)
are left out of the draw unless the study includes them, and then the page warns raters first.

Task order and sides are not stored per rater: both follow from the study's seed and the rater's name
(`task_order`, `left_is_a`), so a restarted server shows a returning rater the same page, and the `shown` table
records which image was on the left when a task was first shown.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import secrets
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from probe.analyse.pairing import pair as pair_frames
from probe.errors import UsageError, suggest
from probe.store.votes import Pair, Study, VoteStore

QUESTIONS = {"quality": "Which image is of higher quality?",
             "prompt": "Which image follows the prompt better?"}
DEFAULT_PAIRS = 50
ATTENTION_SHARE = 0.1


@dataclass(frozen=True)
class Config:
    """A model at a step count ('sd-turbo@1'); steps None: the model's only step count."""

    model: str
    steps: int | None

    def __str__(self) -> str:
        return self.model if self.steps is None else f"{self.model}@{self.steps}"


def parse_config(text: str, jobs: pd.DataFrame) -> Config:
    """'MODEL' or 'MODEL@STEPS', checked against the run's images; an ambiguous model names its step counts."""
    model, _, steps_text = text.partition("@")
    made = jobs[jobs["image"].notna()]
    models = sorted(set(made["model"].astype(str)))
    if model not in models:
        raise UsageError(f"--compare: the run has no images of {model!r}" + suggest(model, models))
    steps = sorted({int(s) for s in made.loc[made["model"] == model, "steps"].dropna()})
    if steps_text:
        if not steps_text.isdigit() or int(steps_text) not in steps:
            raise UsageError(f"--compare {text}: {model} has images at steps {steps}, write e.g. {model}@{steps[0]}")
        return Config(model, int(steps_text))
    if len(steps) > 1:
        raise UsageError(f"--compare {text}: {model} has images at steps {steps}; name one, e.g. {model}@{steps[0]}")
    return Config(model, steps[0] if steps else None)


def _images_of(jobs: pd.DataFrame, config: Config) -> pd.DataFrame:
    rows = jobs[(jobs["model"] == config.model) & jobs["image"].notna()]
    return rows if config.steps is None else rows[rows["steps"] == config.steps]


def paired_images(jobs: pd.DataFrame, subject: Config, baseline: Config) -> pd.DataFrame:
    """One row per pair: the subject's key and image (`key`, `image`) and the baseline's (`key_b`, `image_b`)."""
    merged = pair_frames(_images_of(jobs, subject)[["key", "image", "probe", "prompt", "text", "variables", "seed",
                                                    "strength", "init_image"]],
                         _images_of(jobs, baseline)[["key", "image", "probe", "prompt", "text", "variables", "seed",
                                                     "strength", "init_image"]])
    return merged[merged["key"] != merged["key_b"]].reset_index(drop=True)


def draw(merged: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """`n` pairs, spread over prompts first: a shuffled order, then each prompt's first pair before its second."""
    rng = np.random.default_rng(seed)
    shuffled = merged.iloc[rng.permutation(len(merged))].reset_index(drop=True)
    rank = shuffled.groupby("prompt", sort=False).cumcount()
    return shuffled.iloc[np.argsort(rank.to_numpy(), kind="stable")[:n]].reset_index(drop=True)


def degraded_png(source: Path) -> bytes:
    """The attention check's copy: an eighth of the size, scaled back, blurred and washed out."""
    from PIL import Image, ImageEnhance, ImageFilter

    with Image.open(source) as image:
        rgb = image.convert("RGB")
    small = rgb.resize((max(1, rgb.width // 8), max(1, rgb.height // 8)), Image.Resampling.BILINEAR)
    blurred = small.resize(rgb.size, Image.Resampling.NEAREST).filter(ImageFilter.GaussianBlur(max(1, rgb.width // 32)))
    washed = ImageEnhance.Contrast(ImageEnhance.Color(blurred).enhance(0.3)).enhance(0.5)
    buffer = io.BytesIO()
    washed.save(buffer, format="PNG")
    return buffer.getvalue()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "study"


class Started(NamedTuple):
    """What `create_study` found or made."""

    store: VoteStore
    study: Study
    created: bool
    """True when the study was created now, False when an existing one with these settings is resumed."""
    left_out: int
    """Pairs of the two configurations left out of the draw because a safety detector flagged one of the images."""


LEGACY = {"include_flagged": True}
"""Settings of studies made before the setting existed: they showed every image."""


def create_study(run_dir: Path, jobs: pd.DataFrame, subject: Config, baseline: Config, questions: list[str],
                 n_pairs: int, seed: int, open_study: bool, study_id: str | None = None,
                 attention: int | None = None, flagged: Collection[str] = (),
                 include_flagged: bool = False) -> Started:
    """The study (created, or the existing one with these settings).

    Pairs with an image in `flagged` (image keys a safety detector flagged) are left out of the draw unless
    `include_flagged`: raters are not shown possibly unsafe images they did not agree to see.

    Raises:
        UsageError: unknown question, no pairs, or a study of that name with other settings.
    """
    for question in questions:
        if question not in QUESTIONS:
            raise UsageError(f"--question {question!r} is not a question" + suggest(question, QUESTIONS))
    if subject == baseline:
        raise UsageError(f"--compare: subject and baseline are both {subject}; compare two configurations")
    questions = list(dict.fromkeys(questions))
    definition = {"subject": str(subject), "baseline": str(baseline), "questions": questions, "pairs": n_pairs,
                  "attention": attention, "seed": seed, "open": open_study, "include_flagged": include_flagged}
    merged = paired_images(jobs, subject, baseline)
    flagged = set(flagged)
    unsafe = merged["key"].isin(flagged) | merged["key_b"].isin(flagged)
    left_out = 0 if include_flagged else int(unsafe.sum())
    store = VoteStore(run_dir, create=True)
    name = study_id or slug(f"{subject}-vs-{baseline}")
    existing = {s.id: s for s in store.studies()}
    if name in existing:
        stored = {**LEGACY, **existing[name].definition}
        differ = "; ".join(f"{k}: {stored.get(k)} there, {definition[k]} here" for k in sorted(definition)
                           if stored.get(k) != definition[k])
        if differ:
            raise UsageError(f"study {name!r} already exists in {run_dir} with other settings ({differ}); resume it "
                             "with its own options, or start another with --study NAME")
        return Started(store, existing[name], False, left_out)
    if merged.empty:
        raise UsageError(f"--compare {subject} {baseline}: the run has no pairs of these two (same prompt and seed)")
    if not include_flagged and unsafe.all():
        raise UsageError(f"--compare {subject} {baseline}: every pair ({len(merged)}) has an image a safety detector "
                         "flagged; --include-flagged shows them to raters, behind a content warning")
    chosen = draw(merged if include_flagged else merged[~unsafe], n_pairs, seed)
    n_attention = max(1, round(len(chosen) * ATTENTION_SHARE)) if attention is None else attention
    pairs, items = _pairs(run_dir, name, chosen, n_attention, seed)
    study = Study(name, str(subject), str(baseline), tuple(questions), seed, open_study, secrets.token_hex(16),
                  definition)
    store.add_study(study, pairs, items)
    return Started(store, study, True, left_out)


def _pairs(run_dir: Path, study_id: str, chosen: pd.DataFrame, n_attention: int,
           seed: int) -> tuple[list[Pair], list[dict[str, Any]]]:
    pairs = [Pair(i, "pair", str(row.prompt), str(row.key), str(row.key_b), str(row.image), str(row.image_b))
             for i, row in enumerate(chosen.itertuples())]
    items = [{c: getattr(row, c) for c in ("probe", "text", "variables", "seed", "strength", "init_image")}
             for row in chosen.itertuples()]
    rng = random.Random(f"{seed}:attention")
    folder = Path("studies") / study_id / "attention"
    (run_dir / folder).mkdir(parents=True, exist_ok=True)
    for _ in range(min(n_attention, len(pairs))):
        source = rng.choice(pairs)
        key, path = (source.a_key, source.a_path) if rng.random() < 0.5 else (source.b_key, source.b_path)
        png = degraded_png(run_dir / path)
        degraded_key = hashlib.sha256(png).hexdigest()
        (run_dir / folder / f"{degraded_key}.png").write_bytes(png)
        pairs.append(Pair(len(pairs), "attention", source.prompt, key, degraded_key, path,
                          str(folder / f"{degraded_key}.png")))
        items.append({"attention_of": key})
    return pairs, items


def flagged_shown(pairs: Iterable[Pair], flagged: Collection[str]) -> int:
    """How many distinct images of these pairs a safety detector flagged (what the rater pages warn of)."""
    return len({key for p in pairs for key in (p.a_key, p.b_key)} & set(flagged))


def task_order(study: Study, rater: str, pairs: list[Pair]) -> list[tuple[int, str]]:
    """Every (pair, question) of the study in this rater's order (the seed and the rater name fix it)."""
    tasks = [(p.pair, q) for p in pairs for q in study.questions]
    random.Random(f"{study.seed}:{rater}").shuffle(tasks)
    return tasks


def left_is_a(study: Study, rater: str, pair: int) -> bool:
    """Whether pair's first image (the subject's, or the original) is shown on the left to this rater."""
    digest = hashlib.sha256(f"{study.seed}:{rater}:{pair}".encode()).digest()
    return digest[0] < 128
