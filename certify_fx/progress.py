"""Progress for anything long: live bars in a terminal, plain periodic lines everywhere else.

:func:`progress_display` gives one object with rich's task API (``add_task``, ``update``,
``advance``, ``remove_task``) whatever the output is. In a terminal it is a :class:`rich.progress.
Progress` with elapsed time and ETA. When the console is not a terminal (CI, ``nohup``, ``| tee``)
a live bar would print nothing until the end, so :class:`LineProgress` prints one unwrapped line
per task every ``interval`` seconds, and when a task that took a while finishes.

>>> with progress_display(console) as progress:
...     task = progress.add_task("bound", total=len(nodes))
...     for node in nodes:
...         progress.advance(task)
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["LineProgress", "ProgressLike", "progress_display"]

#: Seconds between the plain lines of :class:`LineProgress`.
DEFAULT_INTERVAL = 30.0


class ProgressLike(Protocol):
    """The part of rich's ``Progress`` API the library uses."""

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> Any: ...

    def update(self, task_id: Any, *, advance: float | None = None, completed: float | None = None,
               **fields: Any) -> None: ...

    def advance(self, task_id: Any, advance: float = 1) -> None: ...

    def remove_task(self, task_id: Any) -> None: ...


class _InfoColumn(ProgressColumn):
    """The task's free-text ``info`` field (empty when a task has none)."""

    def render(self, task) -> Text:
        return Text(str(task.fields.get("info", "")))


@dataclass
class _Line:
    description: str
    total: float | None
    completed: float
    fields: dict[str, Any]
    start: float = field(default_factory=time.monotonic)
    printed: float = field(default_factory=time.monotonic)


class LineProgress:
    """Plain progress lines for logs: ``description: 120/235 (51%) 0:32 elapsed, ETA 0:30  info``."""

    def __init__(self, console: Console, interval: float = DEFAULT_INTERVAL) -> None:
        self.console, self.interval = console, interval
        self._tasks: dict[int, _Line] = {}
        self._next = 0

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self._tasks.clear()

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        self._next += 1
        self._tasks[self._next] = _Line(description, total, completed, dict(fields))
        return self._next

    def update(self, task_id: int, *, advance: float | None = None, completed: float | None = None,
               total: float | None = None, description: str | None = None, **fields: Any) -> None:
        task = self._tasks.get(task_id)
        if task is None:
            return
        task.completed = completed if completed is not None else task.completed + (advance or 0)
        task.total = total if total is not None else task.total
        task.description = description or task.description
        task.fields.update(fields)
        now = time.monotonic()
        # a finished task gets a closing line unless it was too quick to be worth one
        finished = task.total is not None and task.completed >= task.total and now - task.start >= self.interval / 10
        if finished or now - task.printed >= self.interval:
            task.printed = now
            self.console.print(self._line(task, now), soft_wrap=True, highlight=False, markup=False)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def remove_task(self, task_id: int) -> None:
        self._tasks.pop(task_id, None)

    @staticmethod
    def _line(task: _Line, now: float) -> str:
        elapsed = now - task.start
        parts = [f"{task.description}: {task.completed:g}"]
        if task.total:
            parts[0] += f"/{task.total:g} ({100 * task.completed / task.total:.0f}%)"
        parts.append(f"{_clock(elapsed)} elapsed")
        if task.total and 0 < task.completed < task.total:
            parts.append(f"ETA {_clock(elapsed * (task.total - task.completed) / task.completed)}")
        info = str(task.fields.get("info", ""))
        return ", ".join(parts) + (f"  {info}" if info else "")


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@contextmanager
def progress_display(console: Console | None = None, enabled: bool = True, transient: bool = True,
                     interval: float = DEFAULT_INTERVAL) -> Iterator[ProgressLike]:
    """A progress display on ``console`` (default: stderr, so stdout stays clean for ``--json``).

    Args:
        enabled: ``False`` shows nothing (other processes of a distributed run).
        transient: terminal bars disappear when their task is removed.
        interval: seconds between the plain lines printed when ``console`` is not a terminal.
    """
    console = console or Console(stderr=True)
    if enabled and not console.is_terminal:
        with LineProgress(console, interval) as lines:
            yield lines
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), _InfoColumn())
    with Progress(*columns, console=console, disable=not enabled, transient=transient) as progress:
        yield progress
