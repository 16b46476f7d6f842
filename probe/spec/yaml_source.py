"""Safe YAML loading that remembers the line of every field, so errors can point at it.

PyYAML's safe loader builds plain data and throws away positions; we compose the node tree first
(same safe loader, so tags like ``!!python/object`` are still refused) and record the line of every
mapping key and sequence item by field path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

FieldPath = tuple[str | int, ...]


class YamlProblem(Exception):
    """A YAML document that cannot be read: syntax error, forbidden tag or duplicate key."""

    def __init__(self, message: str, line: int | None, path: FieldPath = ()) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.path = path


def load_yaml(path: Path) -> tuple[Any, dict[FieldPath, int]]:
    """Read a YAML file with the safe loader; return the data and a map field path -> 1-based line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise YamlProblem(f"not UTF-8 text ({exc.reason} at byte {exc.start})", None) from None
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:  # the reader rejects control characters up front, with a position
        raise _reader_problem(exc, text) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines: dict[FieldPath, int] = {}
        _record_lines(node, (), lines)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or str(exc)
        if "could not determine a constructor" in problem:
            tag = problem.split("tag ")[-1].replace("tag:yaml.org,2002:", "!!")
            problem = f"YAML tag {tag} is not allowed (suites are plain data, no code)"
        raise YamlProblem(problem, line) from None
    except yaml.YAMLError as exc:  # reader errors carry a position but no mark
        raise _reader_problem(exc, text) from None
    finally:
        loader.dispose()
    return data, lines


def _reader_problem(exc: yaml.YAMLError, text: str) -> YamlProblem:
    position = getattr(exc, "position", None)
    line = text.count("\n", 0, position) + 1 if isinstance(position, int) else None
    reason = getattr(exc, "reason", None) or str(exc).splitlines()[0]
    character = getattr(exc, "character", None)
    code = ord(character) if isinstance(character, str) else character
    shown = f"character U+{code:04X}: " if isinstance(code, int) else ""
    return YamlProblem(f"{shown}{reason}", line)


def _record_lines(node: yaml.Node, path: FieldPath, lines: dict[FieldPath, int]) -> None:
    """Walk the node tree, recording the line of each key/item; reject duplicate mapping keys."""
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                raise YamlProblem(f"duplicate key {key!r}", key_node.start_mark.line + 1, path)
            seen.add(key)
            lines[(*path, key)] = key_node.start_mark.line + 1
            _record_lines(value_node, (*path, key), lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_lines(item, (*path, index), lines)


def line_of(lines: dict[FieldPath, int], path: FieldPath) -> int | None:
    """Line of the deepest recorded prefix of `path` (errors about a missing key point at its parent)."""
    for end in range(len(path), -1, -1):
        line = lines.get(path[:end])
        if line is not None:
            return line
    return None


def format_path(path: FieldPath) -> str:
    """('probes', 0, 'vars', 'x') -> 'probes[0].vars.x'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"
