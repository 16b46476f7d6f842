"""Rich progress bars for `probe run`: one overall bar and one for the model group being generated."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class ImagesPerSecondColumn(ProgressColumn):
    """Throughput in images per second (rich's own speed column speaks in bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("   - img/s" if speed is None else f"{speed:5.2f} img/s", style="progress.data.speed")


class RichProgress:
    """Implements the runner's Progress protocol with rich."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._progress = self._new()
        self._running = False
        self._overall: TaskID | None = None
        self._group: TaskID | None = None

    def _new(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            ImagesPerSecondColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self._console,
            transient=False,
        )

    def _ensure_running(self) -> None:
        if not self._running:
            self._progress.start()
            self._running = True

    def start(self, total: int) -> None:
        if total == 0:
            return
        self._ensure_running()
        self._overall = self._progress.add_task("all images", total=total)

    def group(self, label: str, total: int) -> None:
        self._ensure_running()
        self._group = self._progress.add_task(f"  {label}", total=total)

    def advance(self, n: int) -> None:
        for task in (self._overall, self._group):
            if task is not None:
                self._progress.advance(task, n)

    def side(self, label: str) -> SideProgress:
        """A bar for work done beside the current phase (scoring while generating), driven from another thread."""
        return SideProgress(self, label)

    def finish(self) -> None:
        """Stop drawing; the next phase (scoring) gets fresh bars."""
        if self._running:
            self._progress.stop()
        self._progress = self._new()
        self._running = False
        self._overall = self._group = None


class SideProgress:
    """One bar whose total grows with each pass it is given (the scorer beside generation runs many small
    passes); it never touches the main bars. rich's Progress takes a lock per update, so threads may share it."""

    def __init__(self, owner: RichProgress, label: str) -> None:
        self._owner = owner
        self._label = label
        self._task: TaskID | None = None
        self._progress: Progress | None = None
        self._total = 0

    def start(self, total: int) -> None: ...

    def group(self, label: str, total: int) -> None:
        owner = self._owner
        owner._ensure_running()
        if self._task is None or self._progress is not owner._progress:  # the owner moved on to fresh bars
            self._progress, self._total = owner._progress, 0
            self._task = self._progress.add_task(f"  {self._label}", total=0)
        self._total += total
        self._progress.update(self._task, total=self._total)

    def advance(self, n: int) -> None:
        if self._task is not None and self._progress is not None:
            self._progress.advance(self._task, n)

    def finish(self) -> None: ...
