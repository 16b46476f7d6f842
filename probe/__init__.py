"""probe: evaluation and bias probing for SD-Turbo and its baselines.

Importing the package is cheap (no torch); heavy modules load when a model or metric is needed.
"""

from __future__ import annotations

from probe.errors import ProbeError, UsageError

__all__ = ["ProbeError", "UsageError"]
