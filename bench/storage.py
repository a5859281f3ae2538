"""Scenario 3, storage at scale: a big SQLite database, measured through ``SqliteStore``.

The database is created by ``SqliteStore`` (so the schema is exactly the migrated one), then filled
with direct ``sqlite3`` bulk inserts: indexes dropped, rows inserted in one transaction without a
journal, indexes re-created from their own ``CREATE INDEX`` text, WAL mode restored. ``ANALYZE`` is
not run, because the service never runs it either. States are mixed:

    executed 70%, expired 10%, cancelled 5%, open and due 10% (9/10 pending, 1/10 in progress),
    open and deliverable 5% (3/5 pending, 2/5 in progress)

over ``endpoints`` endpoint tokens (uniformly at random) of one app version and 4 command types,
the states scattered at random over the ids (the worst case for the expiry sweep: its 100k rows sit
on nearly every page of the table). A baseline database of 1% of the rows gets the same
measurements, so each figure also has a ratio "at scale / small". The expiry is also measured on
the same rows in creation order (ids ascending with ``created_at``, as the service assigns them):
what the sweep meets after an outage, when what comes due was created together.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import Children, latency_ms, ratio, rss_mb, start_serve
from bench.e2e import peak_rss_mb
from bench.ports import free_port
from bench.progress import Advance, Tracker
from broker_bridge.commands import CommandState
from broker_bridge.store import CommandQuery
from broker_bridge.store.sqlite import SqliteStore
from broker_bridge.topics import Format, Target

APP_VERSION = "bench-app-v1"
TYPES = ("reboot", "set-setpoint", "open-door", "zero")
US = 1_000_000
DAY_US = 86_400 * US
# (kind, share in thousandths)
MIX = (
    ("executed", 700),
    ("expired", 100),
    ("cancelled", 50),
    ("due_pending", 90),
    ("due_in_progress", 10),
    ("pending", 30),
    ("in_progress", 20),
)
DUE_SHARE = 0.10

COLUMNS = (
    "app_version, endpoint_token, command_type, payload, state, status_code, reason_phrase, result_payload, "
    "created_at, updated_at, expires_at, log"
)


def _rows(count: int, endpoints: int, now_us: int, seed: int, advance: Advance) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(seed)
    kinds: list[str] = []
    for kind, share in MIX:
        kinds += [kind] * (count * share // 1000)
    kinds += ["executed"] * (count - len(kinds))
    rng.shuffle(kinds)
    for index, kind in enumerate(kinds):
        token = f"ep{rng.randrange(endpoints)}"
        ctype = TYPES[index & 3]
        payload = f'{{"delay":5,"n":{index}}}'
        age = rng.randrange(1, 7 * DAY_US)
        created = now_us - age
        status: int | None = None
        reason: str | None = None
        result = "null"
        log = "[]"
        if kind.startswith("due"):
            expires = now_us - rng.randrange(1, 3600 * US)
            created = expires - DAY_US
            updated = created
        elif kind in ("pending", "in_progress"):
            created = now_us - rng.randrange(1, 3600 * US)
            expires = created + DAY_US
            updated = created
        else:
            expires = created + DAY_US
            updated = min(created + rng.randrange(1, 60 * US), now_us)
        state = kind.removeprefix("due_")
        if state == "in_progress":
            log = f'[[102,"Processing",null,{created + US}]]'
            updated = created + US
        elif state == "executed":
            status, reason, result = 200, "OK", '"Success"'
            log = f'[[200,"OK","Success",{updated}]]'
        elif state == "expired":
            updated = expires
        yield (APP_VERSION, token, ctype, payload, state, status, reason, result, created, updated, expires, log)
        if index % 10_000 == 9_999:
            advance(10_000)


async def build_db(
    path: Path, rows: int, endpoints: int, advance: Advance, *, creation_order: bool = False
) -> dict[str, Any]:
    """Create the schema through SqliteStore, then bulk-insert ``rows`` commands.

    ``creation_order``: ids ascend with ``created_at``, as the service itself assigns them, instead
    of the states being scattered at random over the ids. Commands that come due together (the
    backlog of an outage) were then created together, so they share table pages."""
    async with SqliteStore(path):
        pass
    started = time.perf_counter()
    now_us = time.time_ns() // 1000
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        indexes = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'commands' AND sql IS NOT NULL"
        ).fetchall()
        for name, _ in indexes:
            conn.execute(f"DROP INDEX {name}")
        conn.execute("BEGIN")
        values = ", ".join("?" * 12)
        table = "staging" if creation_order else "commands"
        if creation_order:
            conn.execute(f"CREATE TABLE staging AS SELECT {COLUMNS} FROM commands WHERE 0")
        generated = _rows(rows, endpoints, now_us, 7, advance)
        conn.executemany(f"INSERT INTO {table} ({COLUMNS}) VALUES ({values})", generated)
        if creation_order:
            conn.execute(f"INSERT INTO commands ({COLUMNS}) SELECT {COLUMNS} FROM staging ORDER BY created_at")
            conn.execute("DROP TABLE staging")
        conn.execute("COMMIT")
        for _, sql in indexes:
            conn.execute(sql)
        conn.execute("PRAGMA journal_mode = WAL")
        states = dict(conn.execute("SELECT state, count(*) FROM commands GROUP BY state").fetchall())
        due = conn.execute(
            "SELECT count(*) FROM commands WHERE state IN ('pending', 'in_progress') AND expires_at <= ?", (now_us,)
        ).fetchone()[0]
    finally:
        conn.close()
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    return {
        "rows": rows,
        "endpoints": endpoints,
        "states": states,
        "due": due,
        "build_s": round(time.perf_counter() - started, 2),
        "file_bytes": size,
        "bytes_per_command": round(size / rows, 1),
        "built_at_us": now_us,
    }


async def _timed(samples: list[Callable[[], Awaitable[Any]]], advance: Advance) -> dict[str, float]:
    durations = []
    for call in samples:
        started = time.perf_counter()
        await call()
        durations.append(time.perf_counter() - started)
        advance(1)
    return latency_ms(durations)


def _history_shapes(rng: random.Random, endpoints: int) -> dict[str, Callable[[], CommandQuery]]:
    def token() -> str:
        return f"ep{rng.randrange(endpoints)}"

    return {
        "endpoint": lambda: CommandQuery(app_version=APP_VERSION, endpoint_token=token(), limit=50),
        "endpoint_executed": lambda: CommandQuery(
            endpoint_token=token(), states=frozenset({CommandState.EXECUTED}), limit=50
        ),
        "type_pending": lambda: CommandQuery(
            command_type=rng.choice(TYPES), states=frozenset({CommandState.PENDING}), limit=50
        ),
        "in_progress_all": lambda: CommandQuery(states=frozenset({CommandState.IN_PROGRESS}), limit=50),
        "all_page_20": lambda: CommandQuery(limit=50, offset=1000),
    }


Opener = Callable[[], Any]  # () -> an async context manager giving a CommandStore


async def measure_expiry(
    path: Path, due: int, tracker: Tracker, label: str, expire_limit: int, opener: Opener | None = None
) -> dict[str, Any]:
    """Expire every due command the way the sweeper does: ``store.expire_due`` a batch at a time."""
    async with (opener or partial(SqliteStore, path))() as store:
        with tracker.step(f"storage {label}: expire {due} due commands", total=due) as advance:
            started = time.perf_counter()
            expired = 0
            while True:
                batch = len(await store.expire_due(datetime.now(UTC), expire_limit))
                expired += batch
                advance(batch)
                if batch < expire_limit:
                    break
            elapsed = time.perf_counter() - started
    return {
        "due": due,
        "expired": expired,
        "batch": expire_limit,
        "seconds": round(elapsed, 3),
        "per_100k_s": round(elapsed / max(expired, 1) * 100_000, 3),
    }


async def measure_store(
    path: Path,
    info: dict[str, Any],
    samples: int,
    tracker: Tracker,
    label: str,
    expire_limit: int | None = None,
    opener: Opener | None = None,
) -> dict[str, Any]:
    """get / poll / delivery / history latency and the expiry of every due command; on the SQLite
    file ``path``, or on the store ``opener`` opens (the PostgreSQL scenario)."""
    rng = random.Random(11)
    expire_limit = expire_limit or service_expire_batch()
    rows, endpoints = info["rows"], info["endpoints"]
    now = datetime.now(UTC)
    results: dict[str, Any] = {}
    shapes = _history_shapes(rng, endpoints)
    per_shape = max(5, samples // len(shapes))
    total = samples * 3 + per_shape * len(shapes)
    async with (opener or partial(SqliteStore, path))() as store:

        def target() -> Target:
            return Target(
                app_version=APP_VERSION, endpoint_token=f"ep{rng.randrange(endpoints)}", command_type=rng.choice(TYPES)
            )

        with tracker.step(f"storage {label}: get / poll / delivery / history", total=total) as advance:
            ids = [rng.randrange(1, rows + 1) for _ in range(samples)]
            results["get"] = await _timed([partial(store.get, i) for i in ids], advance)
            targets = [target() for _ in range(samples)]
            results["poll"] = await _timed([partial(store.poll, t, now, None, Format.PLAIN) for t in targets], advance)
            targets = [target() for _ in range(samples)]
            results["delivery"] = await _timed([partial(store.delivery, t, now) for t in targets], advance)
            history: dict[str, Any] = {}
            for name, make in shapes.items():
                queries = [make() for _ in range(per_shape)]
                history[name] = await _timed([partial(store.history, q) for q in queries], advance)
            results["history"] = history
            results["history_worst_p99_ms"] = max(h["p99_ms"] for h in history.values())
    results["expire"] = await measure_expiry(path, info["due"], tracker, label, expire_limit, opener)
    return results


def service_expire_batch() -> int:
    """The batch the service's own expiry sweeper takes (``runtime.EXPIRE_BATCH``, else ``SWEEP_BATCH``)."""
    from broker_bridge import runtime

    return int(getattr(runtime, "EXPIRE_BATCH", getattr(runtime, "SWEEP_BATCH", 1000)))


async def serve_rss(children: Children, db: Path, settle_s: float, name: str) -> dict[str, Any]:
    """Resident memory of ``broker-bridge serve`` (embedded broker) started on ``db``, once it is ready."""
    backlog = unannounced(db)  # events serve must publish after its start (a restart after an outage)
    serve = await start_serve(children, "amqtt", db=db, port=free_port(), log_level="info", name=name)
    at_ready = rss_mb(serve.ps)
    samples = [at_ready]
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        samples.append(rss_mb(serve.ps))
    result: dict[str, Any] = {
        "ready_mb": at_ready,
        "settled_mb": samples[-1],
        "max_mb": max(samples),
        "peak_mb": peak_rss_mb(serve.ps),
        "settle_s": settle_s,
    }
    result["events_recovered"] = backlog
    await children.stop(serve.child)
    return result


def _outbox_sql(path: Path, sql: str) -> int:
    """Run ``sql`` (a count or an update of the ``announced`` column) if this schema has the durable
    event outbox; returns the count or the rows touched (0 without the column, or without a file:
    connecting would create an empty one, which serve refuses as a damaged database)."""
    if not path.exists():
        return 0
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(commands)")}
        if "announced" not in columns:
            return 0
        cursor = conn.execute(sql)
        return int(cursor.fetchone()[0]) if sql.startswith("SELECT") else cursor.rowcount
    finally:
        conn.close()


def unannounced(path: Path) -> int:
    """How many committed changes await their event."""
    return _outbox_sql(path, "SELECT count(*) FROM commands WHERE announced = 0")


def mark_announced(path: Path) -> int:
    """Mark every change as published, as a running service would have by now; returns the rows touched."""
    return _outbox_sql(path, "UPDATE commands SET announced = 1 WHERE announced = 0")


async def measure(
    children: Children, *, rows: int, endpoints: int, samples: int, tracker: Tracker, settle_s: float
) -> dict[str, Any]:
    workdir = children.workdir
    base_rows = max(2_000, rows // 100)
    base_endpoints = max(20, endpoints // 100)
    results: dict[str, Any] = {}
    with tracker.step(f"storage: build {rows:,}-row database", total=rows + base_rows) as advance:
        info = await build_db(workdir / "big.db", rows, endpoints, advance)
        base_info = await build_db(workdir / "small.db", base_rows, base_endpoints, advance)
    results["db"] = info
    results["baseline_db"] = base_info
    results["at_scale"] = await measure_store(workdir / "big.db", info, samples, tracker, f"{rows:,} rows")
    results["baseline"] = await measure_store(workdir / "small.db", base_info, samples, tracker, f"{base_rows:,} rows")
    with tracker.step(f"storage: build {rows:,}-row database in creation order", total=rows) as advance:
        ordered = await build_db(workdir / "ordered.db", rows, endpoints, advance, creation_order=True)
    results["creation_order"] = await measure_expiry(
        workdir / "ordered.db", ordered["due"], tracker, f"{rows:,} rows in creation order", service_expire_batch()
    )
    (workdir / "ordered.db").unlink()
    with tracker.step("storage: serve RSS on the big DB (after expiry, then idle) and on an empty one"):
        # Right after the expiry test the 100k expiries are committed but not yet published: serve
        # recovers and publishes them at start (a restart after an outage looks the same).
        results["serve_rss_backlog_mb"] = await serve_rss(children, workdir / "big.db", settle_s, "serve-backlog")
        results["marked_announced"] = await asyncio.to_thread(mark_announced, workdir / "big.db")
        results["serve_rss_mb"] = await serve_rss(children, workdir / "big.db", settle_s, "serve-big")
        results["serve_rss_empty_db_mb"] = await serve_rss(children, workdir / "empty.db", settle_s, "serve-empty")
    big, small = results["at_scale"], results["baseline"]
    results["scale_ratios"] = {
        "get_p99": ratio(big["get"]["p99_ms"], small["get"]["p99_ms"]),
        "poll_p99": ratio(big["poll"]["p99_ms"], small["poll"]["p99_ms"]),
        "delivery_p99": ratio(big["delivery"]["p99_ms"], small["delivery"]["p99_ms"]),
        "history_worst_p99": ratio(big["history_worst_p99_ms"], small["history_worst_p99_ms"]),
        "expire_per_command": ratio(big["expire"]["per_100k_s"], small["expire"]["per_100k_s"]),
        "bytes_per_command": ratio(info["bytes_per_command"], base_info["bytes_per_command"]),
        "serve_rss": ratio(results["serve_rss_mb"]["max_mb"], results["serve_rss_empty_db_mb"]["max_mb"]),
    }
    if big["expire"]["expired"] != info["due"]:
        results["warning"] = f"expired {big['expire']['expired']} of {info['due']} due commands"
    return results
