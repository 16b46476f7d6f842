"""Write a `probe check` verdict as JUnit XML (one test case per rule), Markdown (CI job summary) or JSON.

An inconclusive group fails its test case unless the verdict allows inconclusive groups; JSON is strict (a
missing number is null, never a bare NaN that JSON parsers reject).
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from probe.gate.verdict import Outcome, Verdict
from probe.store.atomic import atomic_write_bytes


def _scope(outcome: Outcome) -> str:
    return " ".join(f"{k}={v}" for k, v in outcome.group.items() if v is not None)


def _by_rule(verdict: Verdict) -> dict[str, list[Outcome]]:
    grouped: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in verdict.outcomes:
        grouped[outcome.rule].append(outcome)
    return grouped


def write_junit(verdict: Verdict, path: Path) -> None:
    """JUnit XML: a test case per rule; a failing rule lists each failing group with its numbers."""
    grouped = _by_rule(verdict)
    failures = sum(1 for outcomes in grouped.values() if not all(verdict.ok(o) for o in outcomes))
    suite = ET.Element("testsuite", name="probe check", tests=str(len(grouped)), failures=str(failures), errors="0")
    for rule, outcomes in grouped.items():
        case = ET.SubElement(suite, "testcase", classname="probe.check", name=rule)
        failed = [o for o in outcomes if not verdict.ok(o)]
        if failed:
            lines = [f"{_scope(o)}: {o.detail}" for o in failed]
            regressed = sum(o.status == "fail" for o in failed)
            message = f"{regressed} of {len(outcomes)} groups regressed, {len(failed) - regressed} inconclusive"
            failure = ET.SubElement(case, "failure", message=message)
            failure.text = "\n".join(lines)
        else:
            ET.SubElement(case, "system-out").text = "\n".join(f"{_scope(o)}: {o.detail}" for o in outcomes)
    if verdict.warnings:
        ET.SubElement(suite, "system-err").text = "\n".join(f"warning: {w}" for w in verdict.warnings)
    atomic_write_bytes(path, ET.tostring(suite, encoding="utf-8", xml_declaration=True))


def markdown(verdict: Verdict) -> str:
    """A Markdown summary: verdict line and one table row per rule and group."""
    head = "## probe check: " + ("passed" if verdict.passed else "**regression**")
    if verdict.inconclusive:
        head += f" ({verdict.inconclusive} inconclusive{', allowed' if verdict.allow_inconclusive else ''})"
    warnings = [f"> **warning:** {w}" for w in verdict.warnings]
    rows = ["| rule | group | result | estimate | 95% CI | threshold | n |", "|---|---|---|---|---|---|---|"]
    shown = {"pass": "pass", "fail": "**FAIL**", "inconclusive": "inconclusive"}
    for o in verdict.outcomes:
        ci = "" if o.low is None else f"[{o.low:.4g}, {o.high:.4g}]"
        estimate = "" if math.isnan(o.estimate) else f"{o.estimate:.4g}"
        rows.append(f"| {o.rule} | {_scope(o)} | {shown[o.status]} | {estimate} | {ci} | {o.threshold:g} | {o.n} |")
    return "\n".join([head, "", *([*warnings, ""] if warnings else []), *rows, ""])


def write_markdown(verdict: Verdict, path: Path) -> None:
    atomic_write_bytes(path, markdown(verdict).encode("utf-8"))


def _finite(value: object) -> object:
    """NaN and infinities as None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_json(verdict: Verdict, path: Path) -> None:
    payload = json.dumps(_finite(verdict.as_dict()), indent=2, default=str, allow_nan=False)
    atomic_write_bytes(path, payload.encode("utf-8"))
