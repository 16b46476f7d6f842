"""The HTML report of a run directory: `build_report(run_dir, baseline=None)` (reads files only)."""

from probe.report.build import build_report

__all__ = ["build_report"]
