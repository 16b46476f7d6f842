"""The one error type the library raises for user mistakes; the CLI turns it into a short message."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ProbeError(Exception):
    """A problem the user can fix (bad input, missing weights). The CLI prints it without a traceback."""

    exit_code = 1


class UsageError(ProbeError):
    """Bad input detected before any work started (broken suite, unknown name). Exit code 2."""

    exit_code = 2


def suggest(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean ...?)' suffix naming the closest choices, or a list of valid ones."""
    options = sorted(choices)
    close = difflib.get_close_matches(name, options, n=2, cutoff=0.5)
    if close:
        return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
    if options:
        return " (choose from " + ", ".join(repr(c) for c in options) + ")"
    return ""
