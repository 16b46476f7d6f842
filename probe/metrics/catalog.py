"""Names of the metrics a suite may list, with lazy "module:attr" targets (no torch at import).

A metric appears here only once it is implemented and tested; suites are validated against this.
"""

from __future__ import annotations

#: metric name -> "module:attr" of its scorer, imported only when a run scores with it.
METRICS: dict[str, str] = {}
