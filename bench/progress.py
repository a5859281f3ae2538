"""Progress display: one bar for the whole run, one for the step under way (rich), or plain lines."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

Advance = Callable[[int], None]


class Tracker:
    """``with tracker.step("echo mosquitto w64", total=20000) as advance: advance(1)``."""

    def __init__(self, total_steps: int, *, enabled: bool) -> None:
        self.console = Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self._started = time.monotonic()
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
            refresh_per_second=4,
            disable=not self.enabled,
        )
        self._overall: TaskID = self._progress.add_task("bench run", total=total_steps)

    def __enter__(self) -> Tracker:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()

    def log(self, message: str) -> None:
        elapsed = time.monotonic() - self._started
        if self.enabled:
            self._progress.console.print(f"[dim]{elapsed:6.1f}s[/dim] {message}", highlight=False)
        else:
            print(f"{elapsed:6.1f}s {message}", file=sys.stderr, flush=True)

    @contextmanager
    def step(self, description: str, total: int | None = None) -> Iterator[Advance]:
        """One step of the plan: its own bar while it runs; the overall bar moves on when it ends."""
        task = self._progress.add_task(description, total=total)
        self.log(f"start  {description}")
        started = time.monotonic()

        def advance(n: int = 1) -> None:
            self._progress.advance(task, n)

        try:
            yield advance
        finally:
            self._progress.remove_task(task)
            self._progress.advance(self._overall, 1)
            self.log(f"done   {description} ({time.monotonic() - started:.1f}s)")
