"""Write a `probe check` verdict as JUnit XML (one test case per rule), Markdown (CI job summary) or JSON."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from probe.check import Outcome, Verdict
from probe.store import atomic_write_bytes


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
    failures = sum(1 for outcomes in grouped.values() if not all(o.passed for o in outcomes))
    suite = ET.Element("testsuite", name="probe check", tests=str(len(grouped)), failures=str(failures), errors="0")
    for rule, outcomes in grouped.items():
        case = ET.SubElement(suite, "testcase", classname="probe.check", name=rule)
        failed = [o for o in outcomes if not o.passed]
        if failed:
            lines = [f"{_scope(o)}: {o.detail}" for o in failed]
            failure = ET.SubElement(case, "failure", message=f"{len(failed)} of {len(outcomes)} groups regressed")
            failure.text = "\n".join(lines)
        else:
            ET.SubElement(case, "system-out").text = "\n".join(f"{_scope(o)}: {o.detail}" for o in outcomes)
    atomic_write_bytes(path, ET.tostring(suite, encoding="utf-8", xml_declaration=True))


def markdown(verdict: Verdict) -> str:
    """A Markdown summary: verdict line and one table row per rule and group."""
    head = "## probe check: " + ("passed" if verdict.passed else "**regression**")
    rows = ["| rule | group | result | estimate | 95% CI | threshold | n |", "|---|---|---|---|---|---|---|"]
    for o in verdict.outcomes:
        ci = "" if o.low is None else f"[{o.low:.4g}, {o.high:.4g}]"
        rows.append(f"| {o.rule} | {_scope(o)} | {'pass' if o.passed else '**FAIL**'} | {o.estimate:.4g} | {ci} | "
                    f"{o.threshold:g} | {o.n} |")
    return "\n".join([head, "", *rows, ""])


def write_markdown(verdict: Verdict, path: Path) -> None:
    atomic_write_bytes(path, markdown(verdict).encode("utf-8"))


def write_json(verdict: Verdict, path: Path) -> None:
    atomic_write_bytes(path, json.dumps(verdict.as_dict(), indent=2, default=str).encode("utf-8"))
