"""Closed-loop (window) and open-loop (rate) request drivers shared by every load scenario.

A phase sends requests numbered ``first .. first+count-1``; whoever reads the answers calls
``complete(seq)``. At most ``window`` requests are outstanding; with ``rate`` the sends also follow a
fixed schedule (open loop, so queueing shows up as latency). The first ``warmup`` requests are not
counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from bench.common import BenchError, latency_ms, now

Send = Callable[[int], Coroutine[Any, Any, None]]
Progress = Callable[[int], None]


@dataclass
class Phase:
    first: int
    count: int
    window: int
    warmup: int = 0
    rate: float | None = None  # requests per second; None: as fast as the window allows
    progress: Progress | None = None
    sent: dict[int, float] = field(default_factory=dict)
    done: dict[int, float] = field(default_factory=dict)
    marks: dict[str, dict[int, float]] = field(default_factory=dict)  # other timestamps, e.g. device receipt
    errors: list[str] = field(default_factory=list)
    _slots: asyncio.Semaphore = field(init=False)
    _finished: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.window)

    def __contains__(self, seq: int) -> bool:
        return seq in self.sent

    def mark(self, name: str, seq: int, at: float) -> None:
        if seq in self.sent:
            self.marks.setdefault(name, {})[seq] = at

    def complete(self, seq: int, at: float | None = None) -> None:
        if seq not in self.sent or seq in self.done:
            return
        self.done[seq] = now() if at is None else at
        self._slots.release()
        if self.progress is not None:
            self.progress(1)
        if len(self.done) == self.count:
            self._finished.set()

    def fail(self, seq: int, reason: str) -> None:
        """A request refused: counted as an error, and its slot freed."""
        if len(self.errors) < 20:
            self.errors.append(reason)
        self.complete(seq)

    async def run(self, send: Send, timeout_s: float) -> None:
        """Send everything, then wait until every request completed (or raise after ``timeout_s``)."""
        try:
            async with asyncio.timeout(timeout_s), asyncio.TaskGroup() as tasks:
                start = now()
                for index in range(self.count):
                    await self._slots.acquire()
                    if self.rate:
                        delay = start + index / self.rate - now()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    seq = self.first + index
                    self.sent[seq] = now()
                    tasks.create_task(send(seq))
                await self._finished.wait()
        except TimeoutError:
            raise BenchError(
                f"only {len(self.done)} of {self.count} requests completed within {timeout_s:g}s "
                f"({len(self.sent)} sent)"
            ) from None

    # -- results ----------------------------------------------------------------------------------------
    def measured(self) -> list[int]:
        start = self.first + self.warmup
        return [seq for seq in self.done if seq >= start]

    def summary(self) -> dict[str, Any]:
        """Throughput over the measured requests and their latency (send -> complete)."""
        seqs = self.measured()
        if not seqs:
            return {"count": 0}
        begin = min(self.sent[s] for s in seqs)
        end = max(self.done[s] for s in seqs)
        elapsed = max(end - begin, 1e-9)
        result: dict[str, Any] = {
            "count": len(seqs),
            "warmup": self.warmup,
            "window": self.window,
            "elapsed_s": round(elapsed, 3),
            "per_s": round(len(seqs) / elapsed, 1),
            "latency": latency_ms(self.done[s] - self.sent[s] for s in seqs),
            "errors": len(self.errors),
        }
        if self.rate:
            result["target_rate_per_s"] = round(self.rate, 1)
        for name, stamps in self.marks.items():
            result[f"latency_{name}"] = latency_ms(stamps[s] - self.sent[s] for s in seqs if s in stamps)
        if self.errors:
            result["first_errors"] = self.errors[:5]
        return result
