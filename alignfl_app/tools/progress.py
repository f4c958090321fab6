"""Progress with an estimate of the time left for the tools that run many runs in a row (compare, benchmark,
sweep, canary-audit): one bar on stderr, shown only on a terminal, so logs, pipes and tests stay clean.

A progress opened inside another (benchmark runs compare's methods) adds its line under the outer one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

SPEED_WINDOW_S = 7 * 24 * 3600.0  # a step is a whole run: estimate from every finished step, not the last 30 s

_shown: list[Any] = []  # the Progress on screen, while one is


class Steps:
    """Counts finished steps and shows them, with the time left, when a bar is on screen."""

    def __init__(self, bar: Any = None, task: Any = None) -> None:
        self.done = 0
        self._bar, self._task = bar, task

    def doing(self, what: str) -> None:
        """Name the step under way (shown beside the bar)."""
        if self._bar is not None:
            self._bar.update(self._task, what=what)

    def advance(self, steps: int = 1) -> None:
        """``steps`` more finished: the estimate of the time left follows the mean time per step so far."""
        self.done += steps
        if self._bar is not None:
            self._bar.advance(self._task, steps)


@contextmanager
def progress(
    label: str, total: int, stream: TextIO | None = None, clock: Callable[[], float] | None = None
) -> Iterator[Steps]:
    """A bar of ``total`` steps named ``label`` on ``stream`` (stderr); nothing is shown unless it is a terminal.

    ``clock``: seconds, for the estimate (default: a monotonic clock)."""
    stream = sys.stderr if stream is None else stream
    if _shown:  # nested: a line of its own in the display already on screen
        bar = _shown[-1]
        task = _start(bar, label, total)
        try:
            yield Steps(bar, task)
        finally:
            bar.remove_task(task)
        return
    if not _is_terminal(stream):
        yield Steps()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[what]}"),
        console=Console(file=stream),
        get_time=clock,
        speed_estimate_period=SPEED_WINDOW_S,
        redirect_stdout=_is_terminal(sys.stdout),  # a tool's own lines print above the bar, unless piped away
        redirect_stderr=False,
    )
    task = _start(bar, label, total)
    _shown.append(bar)
    try:
        with bar:
            yield Steps(bar, task)
    finally:
        _shown.pop()


def _start(bar: Any, label: str, total: int) -> Any:
    """A task whose clock starts now: the first finished step already gives an estimate of the time left."""
    task = bar.add_task(label, total=total, what="")
    bar.advance(task, 0)
    return task


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
