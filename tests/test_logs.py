"""Repeated warnings and errors are counted, not printed line by line."""

from __future__ import annotations

import contextlib

import pytest
import structlog

from broker_bridge.logs import REPEAT_BURST, REPEAT_WINDOW_S, RepeatLimit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_flood_of_one_event_prints_a_burst_then_a_count() -> None:
    clock = Clock()
    limit = RepeatLimit(clock)
    printed = []
    for _ in range(1000):
        with contextlib.suppress(structlog.DropEvent):
            printed.append(limit(None, "error", {"event": "store_unavailable"}))
    assert len(printed) == REPEAT_BURST
    assert limit(None, "warning", {"event": "other"}) == {"event": "other"}  # another event: its own budget
    assert limit(None, "info", {"event": "store_unavailable"}) == {"event": "store_unavailable"}  # info: never
    clock.now += REPEAT_WINDOW_S
    assert limit(None, "error", {"event": "store_unavailable"}) == {
        "event": "store_unavailable",
        "repeated": 1000 - REPEAT_BURST,
    }
    for _ in range(REPEAT_BURST - 1):  # the new window's burst
        limit(None, "error", {"event": "store_unavailable"})
    with pytest.raises(structlog.DropEvent):
        limit(None, "error", {"event": "store_unavailable"})
