"""One small registry for named records (metrics, model presets): built-ins, in-process additions, entry points.

Records are data (a `MetricInfo`, a `Preset`), so reading them never imports an implementation. Installed
packages add records through an entry point group (`probe.metrics`, `probe.presets`) whose entry points each
name one record object; they are read once, on the first lookup, so `import probe` and `probe --help` never
pay for them. Clashes are errors that name both sides: a user's package must never silently replace a
built-in, or another package's record, under the same name.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from probe.errors import ProbeError, UsageError, suggest

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint


class Named(Protocol):
    """A record with a name (what suites and command lines refer to it by)."""

    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)


class Registry(MutableMapping[str, T], Generic[T]):
    """name -> record; lookups load the entry points of `group` first (once per process).

    Item assignment (`registry[name] = record`) replaces without checks, for tests that patch one entry;
    `register` is the checked way in.
    """

    def __init__(self, noun: str, group: str, record: type[T], builtins: Iterable[T]) -> None:
        self.noun, self.group, self.record = noun, group, record
        self._items: dict[str, T] = {}
        self._origins: dict[str, str] = {}
        self._done = self._loading = False
        self._error: ProbeError | None = None
        self._lock = threading.RLock()  # RLock: an entry point's module may itself look something up
        for item in builtins:
            self._add(item, "built-in")

    def names_of(self, item: T) -> set[str]:
        """Every name `item` takes in the registry's namespace (a metric also takes its output rows)."""
        return {item.name}

    def reserved(self) -> Mapping[str, str]:
        """Names no record may take, with what holds them."""
        return {}

    def origin(self, name: str) -> str:
        """Where a record came from: "built-in", "registered in-process, ..." or "entry point ...". """
        self._load()
        return self._origins[name]

    def register(self, item: T, origin: str) -> T:
        """Add `item` (the same record again is a no-op); ProbeError naming both when a name is taken."""
        if not isinstance(item, self.record):
            raise ProbeError(f"{origin}: expected a {self.record.__name__}, got {type(item).__name__}")
        with self._lock:
            self._add(item, origin)
        return item

    def lookup(self, name: str) -> T:
        """The record called `name`; UsageError with a "did you mean" suggestion when there is none."""
        self._load()
        if name not in self._items:
            raise UsageError(f"unknown {self.noun} {name!r}{suggest(name, self._items)}")
        return self._items[name]

    def _add(self, item: T, origin: str) -> None:
        if self._items.get(item.name) == item:
            return  # a module imported twice registers the same record twice
        # A notebook cell re-run with an edited record replaces its own earlier in-process registration.
        replaces = item.name if self._origins.get(item.name, "").startswith("registered in-process") and \
            origin.startswith("registered in-process") else None
        taken = {n: f"{self.noun} {key!r} ({self._origins[key]})"
                 for key, other in self._items.items() if key != replaces for n in self.names_of(other)}
        taken.update(self.reserved())
        for name in sorted(self.names_of(item)):
            if name in taken:
                raise UsageError(f"{self.noun} {item.name!r} ({origin}) clashes with {taken[name]}: both use the name "
                                 f"{name!r}; rename one of them")
        self._items[item.name] = item
        self._origins[item.name] = origin

    def _load(self) -> None:
        """Read the entry points of `group` once; a broken one makes every later lookup fail the same way.

        The lock is held while loading, so another thread waits for the full set; the loading thread itself
        passes straight through (an entry point's module may look a built-in up while it is imported).
        """
        if not self._done:
            with self._lock:
                if not self._done and not self._loading:
                    self._loading = True
                    try:
                        self._load_entry_points()
                    except ProbeError as exc:
                        self._error = exc
                    except BaseException:  # Ctrl-C or SystemExit mid-load: not done, read them all next time
                        self._loading = False
                        raise
                    self._loading, self._done = False, True
        if self._error is not None:
            raise self._error

    def _load_entry_points(self) -> None:
        from importlib.metadata import entry_points

        for point in entry_points(group=self.group):
            origin = _describe(point)
            self._add(self._load_one(point, origin), origin)

    def _load_one(self, point: EntryPoint, origin: str) -> T:
        try:
            item = point.load()
        except Exception as exc:  # any import-time failure of someone else's package: name the entry point
            raise UsageError(f"{origin} cannot be loaded: {type(exc).__name__}: {exc}. Fix or uninstall that "
                             "package.") from exc
        if not isinstance(item, self.record):
            raise UsageError(f"{origin} names a {type(item).__name__}; it must name a {self.record.__name__}")
        if item.name != point.name:
            raise UsageError(f"{origin} names the {self.noun} {item.name!r}; the entry point must be called "
                             f"{item.name!r} too")
        return item

    def __getitem__(self, name: str) -> T:
        self._load()
        return self._items[name]

    def __setitem__(self, name: str, item: T) -> None:
        self._items[name] = item
        self._origins[name] = "assigned"

    def __delitem__(self, name: str) -> None:
        del self._items[name]
        del self._origins[name]

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(list(self._items))

    def __len__(self) -> int:
        self._load()
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __repr__(self) -> str:
        return f"<{self.noun} registry: {', '.join(self._items)}>"


def _describe(point: EntryPoint) -> str:
    """'entry point brightness = pkg:INFO (group probe.metrics, package pkg 0.1)' for error messages."""
    dist = getattr(point, "dist", None)
    package = f", package {dist.name} {dist.version}" if dist is not None else ""
    return f"entry point {point.name} = {point.value} (group {point.group}{package})"
