"""Bounds on what a suite may ask for, so a hostile or mistaken file fails fast instead of hanging or eating memory.

Every bound here is checked before the thing it bounds is built: YAML alias expansion and nesting while the
node tree is composed (probe.spec.yaml_source), the job count from the sizes of the grid before any prompt
is expanded (probe.spec.loader), glob walks entry by entry. Only the job limit is a user's knob
(`--max-jobs`): the others are far beyond any sensible suite, and a suite that meets one is a mistake.

The job limit travels as an argument (`load_suite(path, max_jobs=...)`) or, for callers that cannot pass it
(`probe run` hands a path to the driver), as a context value set with `allow_jobs`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from fnmatch import fnmatchcase
from pathlib import Path

from probe.errors import UsageError

DEFAULT_MAX_JOBS = 100_000
"""Jobs one suite may plan unless `--max-jobs` raises it: about a day of SD-Turbo on one GPU, a few MB of plan."""
MAX_SUITE_BYTES = 5 * 2**20
"""A suite file is a few KB; prompt lists that big belong in a `file:` or a `dataset:`."""
MAX_TABLE_BYTES = 256 * 2**20
"""Largest TSV/CSV a suite may read prompts or variable values from."""
MAX_YAML_NODES = 100_000
"""Nodes of a suite document after alias expansion ("billion laughs" expands 9 levels of 9 aliases to 9**9)."""
MAX_YAML_DEPTH = 100
"""Nesting of sequences and mappings; a suite needs about 6, and PyYAML's composer recurses per level."""
MAX_NAME_CHARS = 100
"""Suite, probe and model names become folder and file names, which most file systems cap at 255 bytes."""
MAX_PROMPT_CHARS = 10_000
"""Any prompt, template, variable value or target text; CLIP reads 77 tokens, so this is only a guard."""
MAX_SEED = 2**63 - 1
"""Seeds are stored as int64 (pyarrow) and seed torch.Generator, which takes a signed 64-bit value."""
MAX_STEPS = 1000
"""Denoising steps per image; the DDPM schedules these models were trained on have 1000."""
MAX_SIDE = 4096
"""Width and height in pixels; the presets use 64 to 1024."""
MAX_GLOB_ENTRIES = 100_000
"""Directory entries all the init-image globs of one suite may look at."""
MAX_INIT_IMAGE_PIXELS = 8192 * 8192
"""An init image is decoded at validation; bigger ones are refused before decoding (PIL's bomb guard is 2x this)."""

_max_jobs: ContextVar[int] = ContextVar("probe_max_jobs", default=DEFAULT_MAX_JOBS)


def max_jobs() -> int:
    """The job limit in force: `DEFAULT_MAX_JOBS` unless an enclosing `allow_jobs` raised (or lowered) it."""
    return _max_jobs.get()


@contextmanager
def allow_jobs(limit: int | None) -> Iterator[None]:
    """Let suites loaded inside the block plan up to `limit` jobs (None keeps the limit in force)."""
    if limit is not None and limit < 1:
        raise UsageError(f"--max-jobs must be at least 1, not {limit}")
    token = _max_jobs.set(limit if limit is not None else _max_jobs.get())
    try:
        yield
    finally:
        _max_jobs.reset(token)


def is_file(path: Path) -> bool:
    """`path.is_file()`, but False for a name the OS refuses (too long, a NUL) instead of an exception."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def exists(path: Path) -> bool:
    """`path.exists()`, but False for a name the OS refuses instead of an exception."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def shown(n: int) -> str:
    """A count as people read it: '100,000' up to a million, '8.1e9' beyond (an exact 10-digit number hides its size)."""
    return f"{n:,}" if n < 1_000_000 else f"{n:.2g}".replace("e+0", "e").replace("e+", "e")


class EntryBudget:
    """How many more directory entries glob walks may look at; shared by every pattern of one suite."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = MAX_GLOB_ENTRIES if limit is None else limit
        self.left = self.limit

    def spend(self, pattern: str) -> None:
        self.left -= 1
        if self.left < 0:
            raise UsageError(f"{pattern!r} looks at more than {shown(self.limit)} directory entries; "
                             "narrow the pattern (e.g. a folder instead of **)")


def _magic(part: str) -> bool:
    return any(c in part for c in "*?[")


def bounded_glob(pattern: str, budget: EntryBudget) -> list[Path]:
    """Files matching `pattern` (glob.glob(recursive=True) semantics: `*` skips hidden names, `**` is any
    number of folders), sorted as strings (as the loader sorted glob.glob's answer), looking at no more
    directory entries than `budget` allows.

    `**` does not follow symbolic links to folders (as pathlib's glob), so a link loop cannot walk forever.

    Raises:
        UsageError: the walk would pass the budget, or the pattern puts `**` under the file-system root.
    """
    parts = Path(pattern).parts
    first = next((i for i, part in enumerate(parts) if _magic(part)), len(parts))
    root = Path(*parts[:first]) if first else Path(".")
    if first == len(parts):
        return [root] if is_file(root) else []
    real = Path(os.path.realpath(root))
    if "**" in parts[first:] and real == real.parent:  # the root is its own parent
        raise UsageError(f"{pattern!r} walks the whole file system (** under {real}); "
                         "start the pattern in the folder that holds the images")
    frontier = [root]
    for part in parts[first:]:
        frontier = _step(frontier, part, pattern, budget)
    return sorted(dict.fromkeys(p for p in frontier if is_file(p)), key=str)  # glob's order: plans keep their hash


def _step(frontier: list[Path], part: str, pattern: str, budget: EntryBudget) -> list[Path]:
    """The paths one pattern segment reaches from each path in `frontier`."""
    found: list[Path] = []
    for folder in frontier:
        if part == "**":
            found += _descendants(folder, pattern, budget)
        elif not _magic(part):
            if os.path.lexists(folder / part):
                found.append(folder / part)
        else:
            for entry in _entries(folder, pattern, budget):
                if fnmatchcase(entry.name, part) and (part.startswith(".") or not entry.name.startswith(".")):
                    found.append(folder / entry.name)
    return list(dict.fromkeys(found))


def _descendants(folder: Path, pattern: str, budget: EntryBudget) -> list[Path]:
    """`folder` and everything below it that is not hidden, breadth first, without following folder links."""
    found, todo = [folder], [folder]
    while todo:
        current = todo.pop()
        for entry in _entries(current, pattern, budget):
            if entry.name.startswith("."):
                continue
            found.append(current / entry.name)
            if entry.is_dir(follow_symlinks=False):
                todo.append(current / entry.name)
    return found


def _entries(folder: Path, pattern: str, budget: EntryBudget) -> Iterator[os.DirEntry[str]]:
    """The entries of `folder` (none when it is not a readable folder), each charged to `budget`."""
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                budget.spend(pattern)
                yield entry
    except OSError:  # not a folder, gone, unreadable, a link loop: it holds nothing to match
        return
