"""ocr: how well an image renders the text it was asked to show, read back with an offline OCR engine.

The engine is RapidOCR on onnxruntime with the PP-OCR detection, orientation and recognition models that
ship inside the rapidocr wheel. Scene-text OCR suits generated images (signs, shirts, graffiti) better than
document OCR. rapidocr downloads any non-default model lazily, so we resolve the default models' file names
ourselves, check they are in the wheel (and their SHA-256), and pass their paths explicitly: the engine can
never reach the network. rapidocr is imported only when an engine is built, never at `import probe`.

One `Ocr` scorer reads each image once and emits four rows (a scores row holds one value), declared once as
the outputs of ocr's catalog record: `ocr_exact`, `ocr_cer`, `ocr_f1` and `ocr_detected` (see `OUTPUTS`). The
target is the prompt's explicit `text`, else its quoted parts (`text_match.scoring_target`); an image without a
target still gets `ocr_detected`, and its other rows carry value None with label "no_target".
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from probe.errors import ProbeError, UsageError, suggest
from probe.score.metrics.text_match import (
    TextNormalisation,
    cer,
    exact_match,
    normalise,
    scoring_target,
    word_prf,
)
from probe.score.protocol import ImageItem, Metric, Score, ScoringContext
from probe.spec.metric_catalog import METRICS, Direction

logger = logging.getLogger(__name__)

__all__ = ["ENGINES", "OUTPUTS", "Ocr", "OcrReading", "RapidOcrEngine", "bundled_rapidocr_models", "text_scores"]

#: The rows one `Ocr` scorer emits per image, with their directions: read from ocr's catalog record (where they
#: are declared once); recorded in the config, so its id is the same as when this table was written out here.
OUTPUTS: dict[str, Direction] = {row: output.direction for row, output in METRICS["ocr"].outputs.items()}
ENGINES = ("rapidocr",)
NO_TARGET = "no_target"


@dataclass(frozen=True)
class OcrReading:
    """What an engine read in one image: lines in reading order, their boxes and confidences."""

    lines: tuple[str, ...]
    boxes: tuple[tuple[tuple[float, float], ...], ...]
    """One quadrilateral per line: four (x, y) corners in image pixels."""
    confidences: tuple[float, ...]

    @property
    def text(self) -> str:
        """The lines joined by single spaces (the engine's reading order: top to bottom, left to right)."""
        return " ".join(self.lines)

    @property
    def detected(self) -> bool:
        """Whether any text was detected and recognised above the engine's thresholds."""
        return bool(self.lines)


def bundled_rapidocr_models() -> dict[str, dict[str, str]]:
    """rapidocr's default det/cls/rec models as shipped in its wheel: {task: {file, path, sha256}}.

    Resolved through rapidocr's own config and model routing (so a rapidocr upgrade that changes its
    defaults is followed), then checked on disk against the SHA-256 rapidocr publishes for each file.

    Raises:
        ProbeError: when a default model is not in the wheel or its checksum differs; we never download.
    """
    from rapidocr.inference_engine.base import FileInfo, InferSession
    from rapidocr.main import DEFAULT_CFG_PATH, root_dir
    from rapidocr.utils.parse_parameters import ParseParams

    cfg = ParseParams.load(DEFAULT_CFG_PATH)
    found: dict[str, dict[str, str]] = {}
    for task in ("Det", "Cls", "Rec"):
        c = cfg[task]
        info = InferSession.get_model_url(FileInfo(engine_type=c.engine_type, ocr_version=c.ocr_version,
                                                   task_type=c.task_type, lang_type=c.lang_type,
                                                   model_type=c.model_type))
        path = Path(root_dir) / "models" / Path(str(info["model_dir"])).name
        if not path.is_file():
            raise ProbeError(f"rapidocr's default {task} model {path.name} is not in its wheel ({path.parent}); "
                             "probe does not let rapidocr download models: reinstall rapidocr")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != str(info["SHA256"]):
            raise ProbeError(f"{path} has SHA-256 {digest}, rapidocr expects {info['SHA256']}: reinstall rapidocr")
        found[task.lower()] = {"file": path.name, "path": str(path), "sha256": digest,
                               "ocr_version": str(c.ocr_version.value), "model_type": str(c.model_type.value)}
    return found


class RapidOcrEngine:
    """RapidOCR with its bundled models only; thresholds are rapidocr's defaults unless overridden.

    Args:
        text_score: recognised lines with a lower confidence are dropped.
        box_thresh: detection boxes with a lower mean score are dropped.
        det_limit_side_len: the detector resizes the image so its shorter side is this long.
    """

    name: ClassVar[str] = "rapidocr"

    def __init__(self, text_score: float = 0.5, box_thresh: float = 0.5, det_limit_side_len: int = 736,
                 threads: int | None = None) -> None:
        self.models = bundled_rapidocr_models()
        self.thresholds = {"text_score": text_score, "box_thresh": box_thresh,
                           "det_limit_side_len": det_limit_side_len, "det_limit_type": "min"}
        params: dict[str, Any] = {
            # "error": rapidocr otherwise logs a coloured warning for every image without text.
            "Global.log_level": "error",
            "Global.text_score": text_score,
            "Det.box_thresh": box_thresh,
            "Det.limit_side_len": det_limit_side_len,
            "Det.limit_type": "min",
            **{f"{task.capitalize()}.model_path": model["path"] for task, model in self.models.items()},
            # Threads change speed, not results: not in the thresholds the config id is made of.
            **({"EngineConfig.onnxruntime.intra_op_num_threads": threads,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1} if threads else {}),
        }
        # The onnxruntime sessions are made on the first image, not here: the metric's config (and so this
        # object) is built in pre-flight, and no scoring model should hold memory while the run generates.
        self._params = params
        self._session: Any = None

    @property
    def _engine(self) -> Any:
        if self._session is None:
            from rapidocr import RapidOCR

            self._session = RapidOCR(params=self._params)
        return self._session

    def describe(self) -> dict[str, Any]:
        """Engine, versions, model files and thresholds, for the manifest (and the config id)."""
        return {
            "engine": self.name,
            "version": importlib.metadata.version("rapidocr"),
            "runtime": f"onnxruntime {importlib.metadata.version('onnxruntime')}",
            "models": {task: {k: v for k, v in m.items() if k != "path"} for task, m in self.models.items()},
            "thresholds": dict(self.thresholds),
        }

    def read(self, item: ImageItem) -> OcrReading:
        """Read one image. It is passed as a PIL RGB image: rapidocr takes raw numpy arrays to be BGR."""
        # A full det+cls+rec run returns RapidOCROutput (txts/boxes/scores), or an empty one without text.
        result: Any = self._engine(item.open())
        lines = tuple(getattr(result, "txts", None) or ())
        if not lines:
            return OcrReading((), (), ())
        boxes = tuple(tuple((round(float(x), 1), round(float(y), 1)) for x, y in box) for box in result.boxes)
        confidences = tuple(round(float(s), 4) for s in result.scores)
        return OcrReading(lines, boxes, confidences)


def _rows_with_target(reading: OcrReading, target: str,
                      settings: TextNormalisation) -> tuple[dict[str, Any], ...]:
    """Values and row extras for the three target-based scores; an empty normalised target is labelled."""
    pred, goal = normalise(reading.text, settings), normalise(target, settings)
    if not goal:
        return tuple({"value": None, "label": "empty_target"} for _ in range(3))
    words, same = word_prf(pred, goal), exact_match(pred, goal)
    return (
        {"value": float(same), "label": "match" if same else "mismatch"},
        {"value": cer(pred, goal), "extra": {"prediction_normalised": pred, "target_normalised": goal}},
        {"value": words.f1, "extra": {"precision": words.precision, "recall": words.recall}},
    )


def text_scores(key: str, reading: OcrReading, target: str | None, settings: TextNormalisation,
                engine: str) -> list[Score]:
    """The four rows of one image (no OCR here: pure, so it is tested on hand-made readings).

    Empty prediction -> exact 0, CER 1, F1 0, detected 0. No target -> exact/CER/F1 are None with label
    "no_target" (never silently dropped), detected still scored.
    """
    detail = {"target": target, "lines": list(reading.lines), "boxes": [list(map(list, b)) for b in reading.boxes],
              "confidences": list(reading.confidences), "engine": engine}
    if target is None:
        parts: tuple[dict[str, Any], ...] = tuple({"value": None, "label": NO_TARGET} for _ in range(3))
    else:
        parts = _rows_with_target(reading, target, settings)
    names = ("ocr_exact", "ocr_cer", "ocr_f1")
    rows = [Score(metric=name, key=key, value=part["value"], label=part.get("label"), extra=part.get("extra", {}))
            for name, part in zip(names, parts, strict=True)]
    # The reading itself rides on the exact-match row only, so the table does not hold it three times.
    rows[0] = replace(rows[0], text=reading.text, extra={**rows[0].extra, **detail})
    rows.append(Score(metric="ocr_detected", key=key, value=float(reading.detected),
                      label="text" if reading.detected else "no_text"))
    return rows


class Ocr(Metric):
    """ocr: exact match, CER, word F1 and text-detected for each image, from one OCR reading.

    Args:
        engine: OCR engine; only "rapidocr" (models bundled in its wheel) for now.
        casefold, nfkc, collapse_whitespace, drop_punctuation: the `TextNormalisation` applied to
            prediction and target before exact match, CER and word F1.
        text_score, box_thresh, det_limit_side_len: engine thresholds (rapidocr defaults).
    """

    info = METRICS["ocr"]

    def __init__(self, engine: str = "rapidocr", casefold: bool = True, nfkc: bool = True,
                 collapse_whitespace: bool = True, drop_punctuation: bool = True, text_score: float = 0.5,
                 box_thresh: float = 0.5, det_limit_side_len: int = 736) -> None:
        if engine not in ENGINES:
            raise UsageError(f"unknown OCR engine {engine!r}{suggest(engine, ENGINES)}")
        self.engine = engine
        self.normalisation = TextNormalisation(casefold, nfkc, collapse_whitespace, drop_punctuation)
        self.engine_args: dict[str, Any] = {"text_score": text_score, "box_thresh": box_thresh,
                            "det_limit_side_len": det_limit_side_len}

    def _engine(self, ctx: ScoringContext) -> RapidOcrEngine:
        """The context's shared engine for these thresholds, built (and its models checked) on first use."""
        key = "ocr:" + self.engine + ":" + ",".join(f"{k}={v}" for k, v in sorted(self.engine_args.items()))
        built: RapidOcrEngine = ctx.shared(key, lambda: RapidOcrEngine(**self.engine_args, threads=ctx.cpu_threads))
        return built

    def config(self, ctx: ScoringContext) -> dict[str, Any]:
        return {
            **self._engine(ctx).describe(),
            "normalisation": self.normalisation.describe(),
            "target": "explicit text, else the prompt's quoted parts joined by a space, else none (skipped)",
            "outputs": dict(OUTPUTS),
            "cer": "Levenshtein distance / target length on normalised text (rapidfuzz), uncapped",
            "word_f1": "MARIO-Eval multiset word P/R (TextDiffuser, Chen et al. 2023), per-image F1",
            "prediction": "recognised lines joined by a space, in the engine's reading order",
        }

    def score(self, items: Sequence[ImageItem], ctx: ScoringContext) -> list[Score]:
        engine = self._engine(ctx) if items else None
        rows: list[Score] = []
        for item in items:
            assert engine is not None
            reading = engine.read(item)
            target = scoring_target(item.prompt, item.text)
            rows.extend(text_scores(item.key, reading, target, self.normalisation, engine.name))
        return rows
