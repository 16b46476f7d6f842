"""Everything `probe check` reads, checked before any rule is judged: the rules, the run and the baseline.

Cheapest first: the `--rule` texts (a NaN or infinite threshold is refused before a file is opened), then
the run folder (each file readable, the run complete), the suite's `checks:` recorded in its manifest, and
the baseline (a valid file, or a complete run folder). Every problem is a UsageError (exit 2); an incomplete
run or baseline that the caller allows comes back as a warning instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from probe.errors import UsageError
from probe.gate.baseline import Baseline, load_baseline
from probe.gate.complete import require_complete, score_problems, state_problems
from probe.gate.files import read_run
from probe.gate.verdict import Rule, parse_rule, rules_from_checks
from probe.store.tables import RunTables


@dataclass
class CheckInputs:
    """What a check judges: the run, its baseline (if any), the rules, and warnings to show."""

    run: RunTables
    baseline: Baseline | None
    rules: list[Rule]
    warnings: list[str] = field(default_factory=list)


def check_inputs(run_dir: Path, baseline: Path | None = None, rule_texts: list[str] | None = None, *,
                 allow_incomplete: bool = False) -> CheckInputs:
    """Read and check everything `probe check RUN_DIR --baseline B --rule ...` needs.

    Raises:
        UsageError: a bad rule (in --rule or the suite's `checks:`), an unreadable or malformed run folder or
            baseline, or an incomplete run or baseline (unless `allow_incomplete`).
    """
    extra = [parse_rule(text) for text in rule_texts or []]
    run = read_run(run_dir, "run")
    problems = state_problems(run.manifest, run.jobs) + score_problems(run.manifest, run.jobs, run.scores)
    warnings = require_complete(problems, f"run {run_dir}", allow=allow_incomplete)
    where = f"{run_dir / 'manifest.json'}: the suite's checks"
    checks = (run.manifest.get("suite") or {}).get("checks") or []
    if not isinstance(checks, list):
        raise UsageError(f"{where}: expected a list of checks, not a {type(checks).__name__}")
    rules = rules_from_checks(checks, where) + extra
    base = load_baseline(baseline, allow_incomplete=allow_incomplete) if baseline is not None else None
    return CheckInputs(run, base, rules, warnings + list(base.warnings if base else ()))
