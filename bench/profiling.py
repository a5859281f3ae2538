"""Profile of ``broker-bridge serve`` under the end-to-end load: ``py-spy record`` around the process.

py-spy writes collapsed stacks (``thread;outer;...;leaf count``); this module adds them up:
- by thread (the event loop vs the SQLite store's thread),
- by what the time is spent in (the innermost frame of a known library: JSON, pydantic, sqlite,
  paho, amqtt, structlog, asyncio's loop, ... or broker_bridge's own modules),
- the functions with the most samples, on their own (self) and with what they call (inclusive).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import BenchError, Broker, Children, tool
from bench.e2e import measure_e2e
from bench.progress import Tracker

THREAD = re.compile(r"^thread \((\w+)\): ([^;\n]+?)(?=;| \d+$)", re.MULTILINE)
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# (category, substrings of a frame's file); the first match walking from the leaf up wins.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # sqlite3 runs in C: py-spy charges the SQL to the Python line that called it (store code on the
    # store's thread); the thread table says how much of serve that thread is.
    ("sqlite (store thread: SQL, commit/fsync)", ("aiosqlite/core.py", "sqlite3/")),
    ("store thread hand-off on the loop (futures, queue, context)", ("aiosqlite/", "concurrent/futures", "queue.py")),
    ("JSON encode/decode", ("json/",)),
    ("pydantic validation", ("pydantic/", "pydantic_core/")),
    ("structlog / logging", ("structlog/", "logging/")),
    ("paho-mqtt (packet I/O)", ("paho/",)),
    ("aiomqtt", ("aiomqtt/",)),
    ("amqtt broker", ("amqtt/",)),
    ("msgpack", ("msgpack/",)),
    ("datetime / isoformat", ("datetime.py",)),
    ("asyncio event loop & tasks (scheduling, sockets, epoll)", ("asyncio/", "selectors.py")),
    ("broker_bridge.bridge", ("broker_bridge/bridge.py",)),
    ("broker_bridge.outbox", ("broker_bridge/outbox.py",)),
    ("broker_bridge.store", ("broker_bridge/store/",)),
    ("broker_bridge.broker (KP1 plugin)", ("broker_bridge/broker.py",)),
    ("broker_bridge.protocol / commands / topics", ("broker_bridge/",)),
)


def _parse(frame: str) -> tuple[str, str, int]:
    """(function, file, line) of one py-spy frame such as ``publish (aiomqtt/client.py:480)``."""
    match = FRAME.match(frame)
    if match is None:
        return frame, "", 0
    return match["func"], match["file"], int(match["line"] or 0)


def _category(files: list[str]) -> str:
    for file in reversed(files):  # innermost first
        for name, needles in CATEGORIES:
            if any(needle in file for needle in needles):
                return name
    return "other"


@functools.cache
def _source_line(file: str, line: int) -> str:
    """The source text of a frame (py-spy names files relative to their sys.path entry)."""
    for root in sys.path:
        path = Path(root) / file
        if path.is_file():
            lines = path.read_text(errors="replace").splitlines()
            return lines[line - 1].strip() if 0 < line <= len(lines) else ""
    return ""


def _waiting(file: str, line: int) -> bool:
    """A thread blocked in a wait: the worker's queue get, the loop's epoll, a lock.

    py-spy cannot always tell these from work (a C call holding no GIL looks alike), so they are
    recognised by the source line of the innermost frame and counted as idle.
    """
    return bool(IDLE_LINE.search(_source_line(file, line)))


IDLE_LINE = re.compile(
    r"tx\.get\(\)|_inbox\.get\(\)|\.get\(block=True\)|_selector\.poll\(|\.wait\(|\.acquire\(|\bsleep\("
)


def analyse(raw: Path, *, top: int = 25) -> dict[str, Any]:
    """Add up a py-spy ``--format raw --threads`` file."""
    total = startup = 0
    idle: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    categories_loop: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    lines = raw.read_text(errors="replace").splitlines()
    names = dict(THREAD.findall("\n".join(lines)))  # thread id -> name (some samples lack the name)
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        tid = re.match(r"thread \((\w+)\)", frames[0])
        thread = names.get(tid[1], f"thread {tid[1]}") if tid else "?"
        frames = [f for f in frames if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        if any("importlib" in f for f in frames):
            startup += count  # imports and class creation before the service runs
            continue
        parsed = [_parse(f) for f in frames]
        worker = thread.startswith("sqlite-store") or any("concurrent/futures/thread.py" in f[1] for f in parsed[:2])
        role = "store thread" if worker else ("event loop (main thread)" if thread == "MainThread" else thread)
        func, file, lineno = parsed[-1]
        if _waiting(file, lineno):
            idle[role] += count
            continue
        files = [f for _, f, _ in parsed]
        threads[role] += count
        category = _category(files)
        if not worker and category == CATEGORIES[0][0]:
            category = CATEGORIES[1][0]  # on the loop: handing work over, not SQL
        categories[category] += count
        if not worker:
            categories_loop[category] += count
        self_time[f"{func} ({file})"] += count
        for name in {f"{fn} ({fl})" for fn, fl, _ in parsed}:
            inclusive[name] += count
        total += count
    if total == 0:
        raise BenchError(f"py-spy recorded no samples in {raw}")

    def share(counter: Counter[str], limit: int | None = None) -> list[dict[str, Any]]:
        return [{"name": name, "samples": n, "share": round(n / total, 4)} for name, n in counter.most_common(limit)]

    return {
        "samples_active": total,
        "samples_idle": dict(idle),
        "samples_startup": startup,
        "threads": share(threads),
        "categories": share(categories),
        "categories_event_loop": share(categories_loop),
        "top_self": share(self_time, top),
        "top_inclusive": [row for row in share(inclusive, top * 3) if not _boring(row["name"])][:top],
    }


def _boring(name: str) -> bool:
    """Frames every sample of the loop passes through: they say nothing about where time goes."""
    return any(
        needle in name
        for needle in (
            "<module>",
            "runpy",
            "runners.py",
            "(broker_bridge/cli.py)",
            "run_forever",
            "run_until_complete",
            "_run_once",
            "Handle._run",
            "threading.py",
            "serve_until_signalled",
            "_bootstrap",
            "_connection_worker_thread",
        )
    )


async def profile(
    children: Children,
    broker: Broker,
    *,
    endpoints: int,
    count: int,
    window: int,
    rate: int,
    tracker: Tracker,
    timeout_s: float,
    log_level: str,
    out_dir: Path,
) -> dict[str, Any]:
    spy = tool("py-spy")
    if spy is None:
        raise BenchError("py-spy is not installed (pip install -e '.[bench]')")
    raw = children.workdir / f"profile-{broker}.txt"
    load = await measure_e2e(
        children,
        broker,
        endpoints=endpoints,
        count=count,
        window=window,
        light_s=0,
        tracker=tracker,
        timeout_s=timeout_s,
        log_level=log_level,
        profile=(spy, raw, rate),
    )
    # Stop serve (not py-spy): py-spy then writes its file and exits.
    serve = [c for c in children.children if c.name == "serve"][-1]
    for ps in serve.ps.children(recursive=True):
        ps.terminate()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(serve.proc.wait(), 30.0)
    await children.stop(serve)
    if not raw.exists():
        raise BenchError(f"py-spy wrote no profile: {serve.tail()}")
    kept = out_dir / f"profile-{broker}.collapsed.txt"
    shutil.copyfile(raw, kept)
    result = analyse(raw)
    result["load"] = load["full"]
    result["raw_file"] = str(kept)
    result["rate_hz"] = rate
    return result
