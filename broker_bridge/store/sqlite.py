"""SQLite store: one connection on its own thread, one FIFO queue of operations, one commit per batch.

Every operation is put on a thread-safe queue. The store's thread takes everything waiting (up to
``max_batch``), runs it in one ``BEGIN IMMEDIATE`` transaction and commits once, so many concurrent
requests share one fsync (group commit); while it commits, new operations queue up for the next
batch. It then hands the results back to the event loop in one ``call_soon_threadsafe``, and the
futures resolve only after the commit. FIFO order keeps a device's progress report ahead of its
final result.

Why not aiosqlite, nor ``run_in_executor`` per batch: aiosqlite hops to its thread and back once
per statement; profiled under the benchmark's end-to-end load, those hops cost more of the event
loop than the SQL itself cost the worker (bench/README.md). An executor per batch still needed a
worker task on the loop to gather the batch and a chain of futures to bring it back: three loop
wake-ups per batch. Now a batch costs the thread's wake-up and one loop wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Self

import structlog

from broker_bridge import commands
from broker_bridge.commands import Command, NewCommand, Report
from broker_bridge.errors import BridgeError, Conflict, StartupError, StoreUnavailable
from broker_bridge.store import sqlite_rows as rows
from broker_bridge.store.base import (
    EXPIRE_WINDOW,
    CommandQuery,
    Created,
    Delivery,
    OpenSummary,
    Polled,
    ReportOutcome,
    check_cancel,
    check_open_limit,
    resolve_report,
)
from broker_bridge.store.sqlite_devices import SqliteDevices
from broker_bridge.store.sqlite_rollouts import SqliteRollouts
from broker_bridge.store.sqlite_schema import migrate
from broker_bridge.topics import Format, Target

log = structlog.get_logger(__name__)

Conn = sqlite3.Connection
OPEN = "('pending', 'in_progress')"
FINISHED = "('executed', 'expired', 'cancelled')"
Results = list[tuple[Any, BaseException | None]]


@dataclass(slots=True)
class _Op:
    fn: Callable[[Conn], Any]  # runs on the store's thread, inside the batch's transaction
    writes: bool
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class SqliteStore(SqliteDevices, SqliteRollouts):
    """The default store: a single SQLite file in WAL mode."""

    def __init__(
        self, path: Path, *, max_batch: int = 512, busy_timeout_ms: int = 5000, synchronous: str = "full"
    ) -> None:
        self.path = path
        self.max_batch = max_batch
        self.busy_timeout_ms = busy_timeout_ms
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        self.synchronous = synchronous
        self._inbox: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()  # None: finish what is queued, stop
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._inode: int | None = None
        self.batch_sizes: list[int] = []  # recent commit batch sizes, for tests
        self.on_commit: Callable[[int], None] | None = None  # told each commit's batch size (metrics)

    # -- life cycle ---------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._loop = loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        self._stopped = loop.create_future()
        self._thread = threading.Thread(target=self._serve, args=(opened,), name="sqlite-store", daemon=True)
        self._thread.start()
        await opened
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._inbox.put(None)  # what is queued runs first
            await asyncio.shield(self._stopped)

    async def _submit(self, fn: Callable[[Conn], Any], *, writes: bool) -> Any:
        op = _Op(fn=fn, writes=writes)
        self._inbox.put(op)  # before any suspension: keeps callers' order
        return await op.future

    # -- the store's thread ---------------------------------------------------------------------
    def _serve(self, opened: asyncio.Future[None]) -> None:
        try:
            conn = _open(self.path, self.busy_timeout_ms, self.synchronous)
        except Exception as exc:  # e.g. a schema newer than this program: raised as it is
            error: Exception = exc
            if isinstance(exc, sqlite3.Error):
                error = StoreUnavailable(f"cannot open database {self.path}: {exc}")
            self._post(_resolve, opened, None, error)
            self._post(_resolve, self._stopped, None, None)
            return
        with contextlib.suppress(OSError):
            self._inode = os.stat(self.path).st_ino  # the file we opened, to notice it being replaced
        self._post(_resolve, opened, None, None)
        try:
            while (first := self._inbox.get()) is not None:
                batch, stop = [first], False
                while len(batch) < self.max_batch:
                    try:
                        op = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if op is None:
                        stop = True
                        break
                    batch.append(op)
                self._run_batch(conn, batch)
                if stop:
                    break
        finally:
            conn.close()
            self._post(_resolve, self._stopped, None, None)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(fn, *args)

    def _run_batch(self, conn: Conn, batch: list[_Op]) -> None:
        writes = any(op.writes for op in batch)
        try:
            results: Results = _execute(conn, batch, writes)
        except (sqlite3.Error, OSError) as exc:  # rolled back
            log.error("store_batch_failed", error=str(exc), size=len(batch))
            self._post(_fail_all, batch, StoreUnavailable(f"database error: {exc}"))
            return
        except Exception as exc:  # a bug in one operation: the batch is lost, the store lives on
            log.exception("store_batch_crashed", size=len(batch))
            self._post(_fail_all, batch, StoreUnavailable(f"internal store error: {type(exc).__name__}"))
            return
        self._post(self._settle, batch, results, writes)

    def _settle(self, batch: list[_Op], results: Results, writes: bool) -> None:
        """On the loop: count the commit, resolve every future of the batch."""
        if writes:
            self.batch_sizes = [*self.batch_sizes[-999:], len(batch)]
            if self.on_commit is not None:
                try:
                    self.on_commit(len(batch))
                except Exception:  # a metrics hook must not leave the batch's callers waiting
                    log.exception("store_on_commit_failed")
        for op, (value, error) in zip(batch, results, strict=True):
            _resolve(op.future, value, error)

    # -- the contract -------------------------------------------------------------------------
    async def create(self, new: NewCommand) -> Command:
        result: Command = await self._submit(lambda conn: _insert(conn, new), writes=True)
        return result

    async def submit(
        self,
        new: NewCommand,
        *,
        max_open: int,
        mark_retained: bool,
        with_delivery: bool = True,
        window: int | None = None,
    ) -> Created:
        target = new.target

        def op(conn: Conn) -> Created:
            if new.idempotency_key is not None and (found := _find_idempotent(conn, target, new.idempotency_key)):
                return Created(command=found, created=False, delivery=None)
            (open_count,) = conn.execute(rows.OPEN_COUNT, (target.app_version, target.endpoint_token)).fetchone()
            check_open_limit(open_count, max_open, target)  # refused before writing anything
            command = _insert(conn, new)
            if not with_delivery:
                if mark_retained:
                    conn.execute(rows.MARK_RETAINED_IF_OBSERVED, rows.target_params(target))
                return Created(command=command, created=True, delivery=None)
            delivery = _delivery(conn, target, new.created_at, window)
            if mark_retained and delivery.observe and not delivery.retained:
                conn.execute(rows.MARK_RETAINED, (*rows.target_params(target), delivery.format.value))
                delivery = dataclasses.replace(delivery, retained_format=delivery.format)
            return Created(command=command, created=True, delivery=delivery)

        result: Created = await self._submit(op, writes=True)
        return result

    async def find_idempotent(self, target: Target, key: str) -> Command | None:
        result: Command | None = await self._submit(lambda conn: _find_idempotent(conn, target, key), writes=False)
        return result

    async def get(self, command_id: int) -> Command | None:
        def op(conn: Conn) -> Command | None:
            return _fetch_one(conn, command_id)

        result: Command | None = await self._submit(op, writes=False)
        return result

    async def history(self, query: CommandQuery) -> list[Command]:
        where, params = rows.where(query)
        order = "ASC" if query.oldest_first else "DESC"
        sql = f"SELECT {rows.COLUMNS} FROM commands {where} ORDER BY id {order} LIMIT ? OFFSET ?"

        def op(conn: Conn) -> list[Command]:
            return [rows.to_command(r) for r in conn.execute(sql, (*params, query.limit, query.offset))]

        result: list[Command] = await self._submit(op, writes=False)
        return result

    async def count(self, query: CommandQuery) -> int:
        where, params = rows.where(query)

        def op(conn: Conn) -> int:
            found = list(conn.execute(f"SELECT count(*) FROM commands {where}", params))
            return int(found[0][0])

        result: int = await self._submit(op, writes=False)
        return result

    async def report(self, target: Target, reports: Sequence[tuple[int, Report]]) -> list[ReportOutcome]:
        def op(conn: Conn) -> list[ReportOutcome]:
            return [_report_one(conn, target, command_id, report) for command_id, report in reports]

        result: list[ReportOutcome] = await self._submit(op, writes=True)
        return result

    async def cancel(self, command_id: int, now: datetime, target: Target | None = None) -> Command:
        def op(conn: Conn) -> Command:
            current = check_cancel(_fetch_one(conn, command_id), command_id, target)
            cancelled = commands.cancel(current, now)
            _save(conn, current, cancelled)
            return cancelled

        result: Command = await self._submit(op, writes=True)
        return result

    async def poll(
        self, target: Target, now: datetime, observe: bool | None, fmt: Format, window: int | None = None
    ) -> Polled:
        def op(conn: Conn) -> Polled:
            old_observe, old_fmt, retained_fmt = _observer(conn, target)
            new_observe = old_observe if observe is None else observe
            if (new_observe, fmt) != (old_observe, old_fmt):
                conn.execute(rows.UPSERT_OBSERVER, rows.observer_params(target, new_observe, fmt))
            return Polled(commands=_outstanding(conn, target, now, window), moved=retained_fmt not in (None, fmt))

        result: Polled = await self._submit(op, writes=True)
        return result

    async def delivery(self, target: Target, now: datetime, window: int | None = None) -> Delivery:
        result: Delivery = await self._submit(lambda conn: _delivery(conn, target, now, window), writes=False)
        return result

    async def open_summary(self) -> OpenSummary:
        result: OpenSummary = await self._submit(
            lambda conn: rows.to_summary(list(conn.execute(rows.OPEN_SUMMARY))), writes=False
        )
        return result

    async def deliveries(self, targets: Sequence[Target], now: datetime, window: int | None = None) -> list[Delivery]:
        found: list[Delivery] = await self._submit(
            lambda conn: [_delivery(conn, t, now, window) for t in targets], writes=False
        )
        return found

    async def mark_retained(self, target: Target, retained: bool, fmt: Format | None = None) -> None:
        await self.mark_retained_many([(target, retained, fmt)])

    async def mark_retained_many(self, marks: Sequence[tuple[Target, bool, Format | None]]) -> None:
        def op(conn: Conn) -> None:
            for target, retained, fmt in marks:
                params = rows.target_params(target)
                if retained:  # NULL: the observer's format (Format.PLAIN is '', so test for None)
                    conn.execute(rows.MARK_RETAINED, (*params, None if fmt is None else fmt.value))
                else:
                    conn.execute(rows.CLEAR_RETAINED, (*params, *params))

        await self._submit(op, writes=True)

    async def retained_targets(self) -> list[Target]:
        return await self._targets(rows.RETAINED_TARGETS, ())

    async def open_targets(self, now: datetime, app_version: str, endpoint_token: str) -> list[Target]:
        sql = rows.OPEN_TARGETS + " AND app_version = ? AND endpoint_token = ? ORDER BY command_type"
        return await self._targets(sql, (rows.to_us(now), app_version, endpoint_token))

    async def all_open_targets(self, now: datetime) -> list[Target]:
        return await self._targets(rows.OPEN_TARGETS, (rows.to_us(now),))

    async def _targets(self, sql: str, params: tuple[Any, ...]) -> list[Target]:
        def op(conn: Conn) -> list[Target]:
            return [rows.to_target(r) for r in conn.execute(sql, params)]

        result: list[Target] = await self._submit(op, writes=False)
        return result

    async def expire_due(self, now: datetime, limit: int) -> list[tuple[int, Target]]:
        sql = (
            f"UPDATE commands SET state = 'expired', updated_at = :now, announced = 0 WHERE id IN ("
            f"SELECT id FROM (SELECT id FROM commands WHERE state IN {OPEN} AND expires_at <= :now "
            f"ORDER BY expires_at LIMIT :window) ORDER BY id LIMIT :limit) "
            f"RETURNING id, app_version, endpoint_token, command_type"
        )
        params = {"now": rows.to_us(now), "window": limit * EXPIRE_WINDOW, "limit": limit}

        def op(conn: Conn) -> list[tuple[int, Target]]:
            found = conn.execute(sql, params)
            return [(r[0], rows.to_target(r[1:])) for r in found]

        result: list[tuple[int, Target]] = await self._submit(op, writes=True)
        return result

    async def get_many(self, command_ids: Sequence[int]) -> list[Command]:
        ids = sorted(set(command_ids))

        def op(conn: Conn) -> list[Command]:
            found: list[Command] = []
            for start in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
                chunk = ids[start : start + 500]
                sql = f"SELECT {rows.COLUMNS} FROM commands WHERE id IN ({', '.join('?' * len(chunk))}) ORDER BY id"
                found.extend(rows.to_command(r) for r in conn.execute(sql, chunk))
            return found

        result: list[Command] = await self._submit(op, writes=False)
        return result

    async def purge_finished(self, before: datetime, limit: int) -> int:
        sql = (
            f"DELETE FROM commands WHERE id IN (SELECT id FROM commands WHERE state IN {FINISHED} "
            f"AND updated_at < ? ORDER BY updated_at LIMIT ?)"
        )

        return await self._delete(sql, (rows.to_us(before), limit))

    async def mark_announced(self, announced: Sequence[tuple[int, datetime]]) -> None:
        params = [(command_id, rows.to_us(updated_at)) for command_id, updated_at in announced]

        def op(conn: Conn) -> None:
            conn.executemany(rows.MARK_ANNOUNCED, params)

        await self._submit(op, writes=True)

    async def mark_delivery(
        self, sent: Sequence[tuple[int, datetime]], delivered: Sequence[tuple[int, datetime]]
    ) -> None:
        sent_params = [(rows.to_us(at), command_id) for command_id, at in sent]
        delivered_params = [(rows.to_us(at), rows.to_us(at), command_id) for command_id, at in delivered]

        def op(conn: Conn) -> None:
            conn.executemany(rows.MARK_DELIVERED, delivered_params)
            conn.executemany(rows.MARK_SENT, sent_params)

        if sent_params or delivered_params:
            await self._submit(op, writes=True)

    async def unannounced(self, after_id: int, limit: int) -> list[Command]:
        def op(conn: Conn) -> list[Command]:
            return [rows.to_command(r) for r in conn.execute(rows.UNANNOUNCED, (after_id, limit))]

        result: list[Command] = await self._submit(op, writes=False)
        return result

    async def purge_ephemeral(self, before: datetime, limit: int) -> int:
        sql = (
            "DELETE FROM commands WHERE id IN (SELECT id FROM commands WHERE ephemeral = 1 "
            "AND created_at < ? ORDER BY created_at LIMIT ?)"
        )
        return await self._delete(sql, (rows.to_us(before), limit))

    async def check_writable(self, now: datetime) -> None:
        try:
            current = os.stat(self.path).st_ino
        except OSError as exc:
            raise StoreUnavailable(f"database file {self.path} is gone while open: {exc.strerror}") from None
        if self._inode is not None and current != self._inode:
            raise StoreUnavailable(f"database file {self.path} was replaced while open")

        def op(conn: Conn) -> None:
            conn.execute(
                "INSERT INTO health (id, checked_at) VALUES (1, ?) "
                "ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
                (rows.to_us(now),),
            )

        await self._submit(op, writes=True)

    async def _delete(self, sql: str, params: tuple[Any, ...]) -> int:
        def op(conn: Conn) -> int:
            cursor = conn.execute(sql, params)
            return cursor.rowcount

        result: int = await self._submit(op, writes=True)
        return result


# -- run on the store's thread ------------------------------------------------------------------
def check_files(path: Path) -> None:
    """Refuse files SQLite would take silently and lose with: an empty database file (it would start
    an empty database in its place; measured: no warning), and a shared-memory file we cannot write
    (SQLite maps it: the process died of SIGBUS with no log line)."""
    if path.exists() and path.is_file() and path.stat().st_size == 0:
        raise StartupError(
            f"database file {path} is empty (0 bytes), not a database; if that is meant, delete it and "
            "a new database is created, else restore it from a backup"
        )
    shm = path.with_name(path.name + "-shm")
    if shm.exists() and not os.access(shm, os.R_OK | os.W_OK):
        raise StartupError(f"cannot write {shm} (SQLite's shared memory for {path}): fix its owner or mode")


def _open(path: Path, busy_timeout_ms: int, synchronous: str) -> Conn:
    check_files(path)
    conn = sqlite3.connect(path, isolation_level=None)  # autocommit: we issue BEGIN/COMMIT ourselves
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: every commit is fsynced and survives power loss. NORMAL (in WAL mode): a commit
        # survives kill -9 and restarts, but an OS crash can lose the last ones; ~100x cheaper here.
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")  # then "database is locked"
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _execute(conn: Conn, batch: list[_Op], writes: bool) -> Results:
    """One transaction for the whole batch; an operation's own refusal does not spoil the others."""
    try:
        if writes:
            conn.execute("BEGIN IMMEDIATE")
        results: Results = []
        for op in batch:
            try:
                results.append((op.fn(conn), None))
            except BridgeError as exc:  # refused before writing anything
                results.append((None, exc))
        if writes:
            conn.execute("COMMIT")
    except Exception:
        if writes:
            with contextlib.suppress(sqlite3.Error):  # no transaction was open
                conn.execute("ROLLBACK")
        raise  # the batch fails as a whole
    return results


def _fail_all(batch: list[_Op], error: BaseException) -> None:
    for op in batch:
        _resolve(op.future, None, error)


def _resolve(future: asyncio.Future[Any] | None, value: Any, error: BaseException | None) -> None:
    if future is None or future.done():  # the caller was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _insert(conn: Conn, new: NewCommand) -> Command:
    try:
        cursor = conn.execute(rows.INSERT, rows.insert_params(new))
    except sqlite3.IntegrityError:  # the statement changed nothing
        raise Conflict(f"idempotency key {new.idempotency_key!r} is already used") from None
    assert cursor.lastrowid is not None
    return commands.create(new, cursor.lastrowid)


def _find_idempotent(conn: Conn, target: Target, key: str) -> Command | None:
    found = conn.execute(rows.FIND_IDEMPOTENT, (target.app_version, target.endpoint_token, key)).fetchone()
    return rows.to_command(found) if found else None


def _fetch_one(conn: Conn, command_id: int) -> Command | None:
    found = conn.execute(f"SELECT {rows.COLUMNS} FROM commands WHERE id = ?", (command_id,)).fetchone()
    return rows.to_command(found) if found else None


def _save(conn: Conn, before: Command, after: Command) -> None:
    """Write a transition, compare-and-set on the state and version the decision was made from."""
    cursor = conn.execute(rows.UPDATE, rows.update_params(before, after))
    if cursor.rowcount != 1:
        raise StoreUnavailable(f"command {before.id} changed concurrently; retry")


def _report_one(conn: Conn, target: Target, command_id: int, report: Report) -> ReportOutcome:
    current = _fetch_one(conn, command_id)
    outcome = resolve_report(current, target, command_id, report)
    if outcome.changed and outcome.command is not None and current is not None:
        _save(conn, current, outcome.command)
    return outcome


def _observer(conn: Conn, target: Target) -> tuple[bool, Format, Format | None]:
    """observe, format, and the format whose topic holds a retained list (None: none is)."""
    found = list(conn.execute(rows.SELECT_OBSERVER, rows.target_params(target)))
    if not found:
        return True, Format.PLAIN, None
    observe, fmt, retained_fmt = found[0]
    return bool(observe), Format(fmt), None if retained_fmt is None else Format(retained_fmt)


def _delivery(conn: Conn, target: Target, now: datetime, window: int | None) -> Delivery:
    observe, fmt, retained_fmt = _observer(conn, target)
    commands = _outstanding(conn, target, now, window)
    return Delivery(target=target, observe=observe, format=fmt, commands=commands, retained_format=retained_fmt)


def _outstanding(conn: Conn, target: Target, now: datetime, window: int | None) -> tuple[Command, ...]:
    limit = -1 if window is None else window  # SQLite: a negative LIMIT is none
    found = conn.execute(rows.OUTSTANDING, (*rows.target_params(target), rows.to_us(now), limit))
    return tuple(rows.to_command(r) for r in found)
