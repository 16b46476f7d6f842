"""Safe YAML loading that remembers the line of every field, so errors can point at it.

PyYAML's safe loader builds plain data and throws away positions; we compose the node tree first
(same safe loader, so tags like ``!!python/object`` are still refused) and record the line of every
mapping key and sequence item by field path.

Composing is where a hostile document is stopped: aliases make the tree a graph whose expansion can be
exponential in the file's size ("billion laughs"), and PyYAML's composer recurses once per nesting level.
`_BoundedLoader` counts every node's expanded size and depth as it is composed and refuses the document at
the first node past `MAX_YAML_NODES` or `MAX_YAML_DEPTH`, long before anything walks the expansion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from probe.spec.limits import MAX_SUITE_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, shown

FieldPath = tuple[str | int, ...]


class YamlProblem(Exception):
    """A YAML document that cannot be read: syntax error, forbidden tag or duplicate key."""

    def __init__(self, message: str, line: int | None, path: FieldPath = ()) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.path = path


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, refusing documents that nest or expand (through aliases) past the limits."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0  # counted apart from the path: mapping keys nest too, without a path part
        self._path: list[str | int] = []  # field path of the node being composed, for errors
        self._sizes: dict[int, int] = {}  # id(node) -> nodes in its expansion; absent while it is composed

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        event = self.peek_event()
        line = event.start_mark.line + 1
        # A mapping value's index is its key node, a sequence item's its position; a key has none.
        part = index.value if isinstance(index, yaml.ScalarNode) else index if isinstance(index, int) else None
        if part is not None:
            self._path.append(part)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise YamlProblem(f"nested more than {MAX_YAML_DEPTH} levels deep", line, tuple(self._path[:4]))
            node: yaml.Node = super().compose_node(parent, index)
            if isinstance(event, yaml.AliasEvent):
                if id(node) not in self._sizes:
                    raise self._problem(f"alias *{event.anchor} is inside the node it refers to (a recursive "
                                        "structure)", line)
                size = self._sizes[id(node)]
            else:
                size = 1 + sum(self._sizes[id(child)] for child in _children(node))
                self._sizes[id(node)] = size
            if size > MAX_YAML_NODES:
                raise self._problem(f"the document expands to more than {shown(MAX_YAML_NODES)} values (aliases "
                                    "are copied where they are used); a suite is far smaller", line)
        finally:
            self._depth -= 1
            if part is not None:
                self._path.pop()
        return node

    def _problem(self, message: str, line: int) -> YamlProblem:
        return YamlProblem(message, line, tuple(self._path))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load_yaml(path: Path) -> tuple[Any, dict[FieldPath, int]]:
    """Read a YAML file with the safe loader; return the data and a map field path -> 1-based line.

    Raises:
        YamlProblem: unreadable, too big, not UTF-8, not YAML, a forbidden tag, a duplicate key, or past a
            bound of probe.spec.limits.
    """
    try:
        size = path.stat().st_size
        if size > MAX_SUITE_BYTES:
            raise YamlProblem(f"the file is {shown(size)} bytes; a suite may be at most {shown(MAX_SUITE_BYTES)} "
                              "(put long prompt lists in a `file:`)", None)
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise YamlProblem(f"not UTF-8 text ({exc.reason} at byte {exc.start})", None) from None
    except OSError as exc:
        raise YamlProblem(f"cannot read the file: {exc.strerror or exc}", None) from None
    try:
        loader = _BoundedLoader(text)
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
