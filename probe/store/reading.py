"""Reading a file that another process, a kill or a person may have damaged: every problem is one UsageError
naming the file and what is wrong (missing, not UTF-8, not JSON, a parquet that does not read), never a
traceback. The run tables' reader (`tables.load_run_tables`), `probe report` and `probe check` all use these.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from probe.errors import UsageError


def _named(what: str, path: Path) -> str:
    return f"{what} {path}" if what else str(path)


def read_json(path: Path, what: str = "") -> Any:
    """The JSON value in `path`; a UsageError '<what> <path>: ...' when it is unreadable, not UTF-8 or not JSON."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{_named(what, path)}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                         f"{exc.start}); expected JSON") from None
    except OSError as exc:
        raise UsageError(f"{_named(what, path)}: cannot be read ({exc.strerror or exc})") from None
    if not text.strip():
        raise UsageError(f"{_named(what, path)}: empty file; expected JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{_named(what, path)}: not valid JSON, truncated or corrupt? ({exc.msg} at line "
                         f"{exc.lineno} column {exc.colno})") from None


def read_table(file: Path, what: str = "", read: Callable[[Path], pd.DataFrame] = pd.read_parquet,
               why_missing: str = "") -> pd.DataFrame:
    """`read(file)`; a UsageError '<what> <file>: ...' when it is missing, corrupt or not the table expected."""
    if not file.is_file():
        raise UsageError(f"{_named(what, file)}: missing{why_missing}")
    try:
        return read(file)
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        detail = (str(exc).splitlines() or [""])[0][:200]
        raise UsageError(f"{_named(what, file)}: cannot be read, corrupt or not a probe table? "
                         f"({type(exc).__name__}: {detail})") from None
