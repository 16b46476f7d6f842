"""probe: evaluation and bias probing for SD-Turbo and its baselines.

Importing the package is cheap (no torch, no pandas); the API below loads on first use.

    from probe import load_run
    run = load_run("reports/smoke/latest")
    run.summary()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from probe.errors import ProbeError, UsageError

if TYPE_CHECKING:
    from probe.api import Run, compare, load_run
    from probe.planning.planner import plan_jobs as plan
    from probe.spec.loader import load_suite

_LAZY = {
    "Run": ("probe.api", "Run"),
    "load_run": ("probe.api", "load_run"),
    "compare": ("probe.api", "compare"),
    "load_suite": ("probe.spec.loader", "load_suite"),
    "plan": ("probe.planning.planner", "plan_jobs"),
}

__all__ = ["ProbeError", "UsageError", "Run", "load_run", "compare", "load_suite", "plan"]


def __getattr__(name: str) -> Any:
    """Import API members on first use so `import probe` stays light."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'probe' has no attribute {name!r}")
