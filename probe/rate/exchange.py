"""Votes out (CSV or parquet) and in (votes collected elsewhere, e.g. on a crowdsourcing platform).

Import format, one row per vote (CSV or parquet; the export writes the same columns, so an export imports back):
  study     the study id (may be left out when the run has one study, or given with --study)
  pair      the study's pair number (`probe rate export --pairs` lists them with both image keys)
  rater     any name; votes of one rater on one pair and question count once
  question  quality | prompt (one the study asks)
  chosen    the key of the image the rater picked (one of the pair's two); or instead
  choice + left   `left`/`right` and the key of the image that was shown on the left
  answered_at, shown_at   optional ISO 8601 times
Every row is checked before anything is written; one bad row refuses the whole file, naming its line and field.
Rows already present (same study, pair, rater, question) are skipped and counted.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from probe.errors import UsageError
from probe.store.votes import VoteStore, now


def export_votes(store: VoteStore, out: Path, study_id: str | None = None) -> int:
    """Write the votes (one row each) as CSV or parquet, by `out`'s suffix; returns the row count."""
    frame = store.votes(study_id)
    _write(frame, out)
    return len(frame)


def export_pairs(store: VoteStore, out: Path, study_id: str | None = None) -> int:
    """Write the studies' pairs (pair number, kind, prompt, both keys and paths) for collecting votes elsewhere."""
    rows = [{"study": s.id, "pair": p.pair, "kind": p.kind, "prompt": p.prompt, "a_key": p.a_key, "b_key": p.b_key,
             "a_path": p.a_path, "b_path": p.b_path}
            for s in store.studies() if study_id in (None, s.id) for p in store.pairs(s.id)]
    _write(pd.DataFrame(rows), out)
    return len(rows)


def _write(frame: pd.DataFrame, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        frame.to_parquet(out, index=False)
    elif out.suffix == ".csv":
        frame.to_csv(out, index=False)
    else:
        raise UsageError(f"--out {out}: write .csv or .parquet")


def _read(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - any parser failure: say which file and why
        raise UsageError(f"{path}: cannot read it as {'parquet' if path.suffix == '.parquet' else 'CSV'} ({exc})") from exc


def import_votes(store: VoteStore, path: Path, study_id: str | None = None) -> tuple[int, int]:
    """Check every row, then add them in one transaction; returns (added, already present)."""
    frame = _read(path).fillna("")
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in ("pair", "rater", "question") if c not in frame.columns]
    if "chosen" not in frame.columns and not {"choice", "left"} <= set(frame.columns):
        missing.append("chosen (or choice and left)")
    if missing:
        raise UsageError(f"{path}: missing column(s) {', '.join(missing)} (see `probe rate import --help`)")
    studies = {s.id: s for s in store.studies()}
    pairs = {sid: {p.pair: p for p in store.pairs(sid)} for sid in studies}
    rows = []
    for number, row in enumerate(frame.to_dict("records"), start=2):  # line 1 is the header
        where = f"{path}: line {number}"
        sid = str(row.get("study") or study_id or (next(iter(studies)) if len(studies) == 1 else ""))
        if sid not in studies:
            raise UsageError(f"{where}: study {sid!r} is not in this run (studies: {', '.join(studies) or 'none'})")
        pair_text = str(row["pair"]).strip()
        pair = pairs[sid].get(int(float(pair_text))) if _is_number(pair_text) else None
        if pair is None:
            raise UsageError(f"{where}: pair {pair_text!r} is not a pair of study {sid}")
        question, rater = str(row["question"]).strip(), str(row["rater"]).strip()
        if question not in studies[sid].questions:
            raise UsageError(f"{where}: question {question!r} is not asked in study {sid} "
                             f"({', '.join(studies[sid].questions)})")
        if not rater:
            raise UsageError(f"{where}: rater is empty")
        keys = (pair.a_key, pair.b_key)
        chosen, choice, left = _choice(row, keys, where)
        rows.append((sid, pair.pair, rater, question, choice, chosen, left, str(row.get("shown_at") or "") or None,
                     str(row.get("answered_at") or "") or now(), "import"))
    added = store.insert_many(rows)
    return added, len(rows) - added


def _is_number(text: str) -> bool:
    try:
        return float(text).is_integer()
    except ValueError:
        return False


def _choice(row: dict[str, object], keys: tuple[str, str], where: str) -> tuple[str, str, str]:
    """(chosen key, left/right, left key) from either form of a row."""
    left = str(row.get("left") or "").strip()
    if left and left not in keys:
        raise UsageError(f"{where}: left {left!r} is not one of the pair's images")
    chosen = str(row.get("chosen") or "").strip()
    choice = str(row.get("choice") or "").strip().lower()
    if chosen:
        if chosen not in keys:
            raise UsageError(f"{where}: chosen {chosen!r} is not one of the pair's images ({keys[0][:12]}..., "
                             f"{keys[1][:12]}...)")
        left = left or keys[0]
        implied = "left" if chosen == left else "right"
        if choice and choice != implied:
            raise UsageError(f"{where}: choice {choice!r} contradicts chosen and left")
        return chosen, implied, left
    if choice not in ("left", "right") or not left:
        raise UsageError(f"{where}: give chosen, or choice (left or right) with left")
    other = keys[1] if left == keys[0] else keys[0]
    return (left if choice == "left" else other), choice, left
