"""PostgreSQL store: several instances share one database; each groups its writes into one commit.

Writes go through one FIFO queue to one connection: the writer task takes everything waiting (up to
``max_batch``), runs it in one transaction and commits once, so concurrent requests share one WAL
flush (group commit), as in the SQLite store. Reads take a connection of a small pool and never
wait behind a commit. Futures resolve only after the commit.

Between instances: a report or cancel locks the row it decides on (``FOR UPDATE``), so two
instances deciding on one command serialize and the compare-and-set always holds; sweeps take rows
with ``FOR UPDATE SKIP LOCKED`` and run under a transaction-scoped advisory lock, so each row is
expired or purged once; ids come from one sequence, so a command created after another's commit
has a higher id whichever instance created it.

A batch that fails in the database (a deadlock between two instances, a constraint this code did
not foresee) is rolled back and its operations are run again one per transaction, so one bad
operation fails alone. A lost connection fails the batch with ``StoreUnavailable`` (HTTP 503) and is
opened again for the next one.

Driver: asyncpg (measured against psycopg 3; see the commit that added this store and README
"Scaling out").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Self

import asyncpg
import structlog

from broker_bridge import commands
from broker_bridge.commands import Command, NewCommand, Report
from broker_bridge.devices import Device
from broker_bridge.errors import BridgeError, Conflict, DeviceNotFound, StartupError, StoreUnavailable
from broker_bridge.store import postgres_sql as sql
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
from broker_bridge.store.postgres_rollouts import PostgresRollouts
from broker_bridge.store.postgres_schema import (
    CREATE_VERSION_TABLE,
    EXPIRY_LOCK,
    LOCK_SPACE,
    MIGRATION_LOCK,
    MIGRATIONS,
    RETENTION_LOCK,
)
from broker_bridge.topics import Format, Target

log = structlog.get_logger(__name__)

Conn = Any  # asyncpg.Connection (asyncpg ships no type information)
Results = list[tuple[Any, BaseException | None]]
# Errors that say the server or the connection is gone (as opposed to a statement's own failure).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.InternalClientError,  # "cannot switch to state ...": the connection's state is lost
    TimeoutError,
)
RETRY_ALONE = (asyncpg.PostgresError,)
DB_ERRORS = (*CONNECTION_ERRORS, asyncpg.PostgresError)
# Two instances' batches lock rows (observers, reported commands) in no common order; waiting for
# each other they deadlocked under plain load with few devices, and PostgreSQL needs
# deadlock_timeout (1 s) to notice. So the writer's session gives up on a lock after 100 ms, and the
# batch is run again one operation per transaction that waits as long as it takes (PATIENT).
WRITER_SETTINGS = {"lock_timeout": "100ms"}
PATIENT = "SET LOCAL lock_timeout = 0"  # inside the transaction's BEGIN


@dataclass(slots=True)
class _Op:
    fn: Callable[[Conn], Awaitable[Any]]  # runs inside the batch's transaction
    decides_on: tuple[int, ...] = ()  # command rows it reads to decide (locked for the whole batch at once)
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"database unavailable: {type(exc).__name__}: {exc}".rstrip(": "))


class PostgresStore(PostgresRollouts):
    """The store for several instances: one PostgreSQL database (any libpq URI)."""

    def __init__(
        self,
        dsn: str,
        *,
        instance: str | None = None,
        max_batch: int = 512,
        read_pool: int = 4,
        connect_timeout_s: float = 5.0,
        migrate: bool = True,
    ) -> None:
        self.dsn = dsn
        self.instance = instance  # recorded as the announcer of each change; None: a one-shot CLI run
        self.max_batch = max_batch
        self.read_pool = read_pool
        self.connect_timeout_s = connect_timeout_s
        self.migrate = migrate
        self.batch_sizes: list[int] = []
        self.on_commit: Callable[[int], None] | None = None
        self.on_finished: Callable[[list[int]], None] | None = None  # commands another session finished
        self._inbox: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._writer: Conn | None = None
        self._pool: Any = None  # asyncpg.Pool
        self._listener: Conn | None = None
        self._task: asyncio.Task[None] | None = None
        self._finished: list[int] = []  # ids the running transaction made final (its NOTIFY)
        self._locked: dict[int, Command] = {}  # rows the running transaction locked, as it last wrote them
        self._unwritten: dict[int, tuple[Command, Command]] = {}  # id: (as read, as decided), to write at once

    # -- life cycle ---------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        try:
            conn = await self._connect()
        except DB_ERRORS as exc:
            raise StartupError(f"cannot open database: {exc}") from None
        try:
            if self.migrate:
                await migrate(conn)  # waits for another instance's migration: no lock timeout yet
            else:
                await check_schema(conn)
            for name, value in WRITER_SETTINGS.items():  # now the writer's own settings
                await conn.execute(f"SET {name} = '{value}'")
        except BaseException:
            await conn.close()
            raise
        self._writer = conn
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=1,
            max_size=self.read_pool,
            timeout=self.connect_timeout_s,
            command_timeout=30,
            reset=_reset_reader,
        )
        self._task = asyncio.create_task(self._write_loop(), name="postgres-writer")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None and not self._task.done():
            self._inbox.put_nowait(None)  # what is queued runs first
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._writer.close(), 2)
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 2)

    async def _connect(self, settings: dict[str, str] | None = None) -> Conn:
        conn: Conn = await asyncpg.connect(
            self.dsn, timeout=self.connect_timeout_s, command_timeout=30, server_settings=settings
        )
        return conn

    async def listen(self) -> None:
        """Hear which commands other sessions finished (``on_finished``) until cancelled; reconnects."""
        while True:
            conn: Conn | None = None
            try:
                conn = await self._connect()
                lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                conn.add_termination_listener(lambda _, lost=lost: lost.done() or lost.set_result(None))
                await conn.add_listener(sql.FINAL_CHANNEL, self._notified)
                self._listener = conn
                await lost
            except DB_ERRORS as exc:
                log.warning("postgres_listen_failed", error=str(exc), retry_in_s=1.0)
            finally:
                self._listener = None
                if conn is not None and not conn.is_closed():
                    conn.terminate()  # also on cancellation: nothing to say to the server first
            await asyncio.sleep(1.0)

    def _notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        """Our own writer's finals were announced by the service already; others' are news."""
        if self._writer is not None and pid == self._writer.get_server_pid():
            return
        if self.on_finished is not None:
            self.on_finished([int(i) for i in payload.split(",") if i])

    # -- the writer -----------------------------------------------------------------------------
    async def _submit(self, fn: Callable[[Conn], Awaitable[Any]], decides_on: tuple[int, ...] = ()) -> Any:
        op = _Op(fn=fn, decides_on=decides_on)
        self._inbox.put_nowait(op)  # before any suspension: keeps callers' order
        return await op.future

    async def _write_loop(self) -> None:
        while (first := await self._inbox.get()) is not None:
            batch, stop = [first], False
            while len(batch) < self.max_batch and not self._inbox.empty():
                op = self._inbox.get_nowait()
                if op is None:
                    stop = True
                    break
                batch.append(op)
            await self._run_batch(batch)
            if stop:
                break

    async def _writer_conn(self) -> Conn:
        if self._writer is None or self._writer.is_closed():
            self._writer = await self._connect(WRITER_SETTINGS)
        return self._writer

    async def _run_batch(self, batch: list[_Op], *, patient: bool = False) -> None:
        try:
            results = await self._transaction(batch, patient)
        except CONNECTION_ERRORS as exc:
            await self._drop_writer()
            log.error("store_batch_failed", error=str(exc), size=len(batch))
            _fail_all(batch, unavailable(exc))
            return
        except RETRY_ALONE as exc:  # rolled back: run each alone, so only the broken one fails
            if isinstance(exc, asyncpg.LockNotAvailableError):
                log.info("store_batch_lock_wait", size=len(batch), hint="another instance holds a row; run alone")
            else:
                log.warning("store_batch_retried_alone", error=str(exc), size=len(batch))
            if patient:
                _fail_all(batch, StoreUnavailable(f"database error: {exc}"))
                return
            for op in batch:
                await self._run_batch([op], patient=True)
            return
        except Exception as exc:  # a bug in one operation: the batch is lost, the store lives on
            log.exception("store_batch_crashed", size=len(batch))
            _fail_all(batch, StoreUnavailable(f"internal store error: {type(exc).__name__}"))
            return
        self.batch_sizes = [*self.batch_sizes[-999:], len(batch)]
        if self.on_commit is not None:
            try:
                self.on_commit(len(batch))
            except Exception:
                log.exception("store_on_commit_failed")
        for op, (value, error) in zip(batch, results, strict=True):
            _resolve(op.future, value, error)

    async def _transaction(self, batch: list[_Op], patient: bool) -> Results:
        conn = await self._writer_conn()
        results: Results = []
        self._finished = []
        self._locked, self._unwritten = {}, {}
        # BEGIN and COMMIT by hand, so each shares its round trip (simple-query protocol): BEGIN with
        # a patient batch's setting, COMMIT with the NOTIFY of what the batch made final.
        await conn.execute(f"BEGIN; {PATIENT}" if patient else "BEGIN")
        try:
            # The rows the batch's reports and cancels decide on, locked in one statement (one round
            # trip, not one per report) and in id order, the same order on every instance.
            if wanted := sorted({i for op in batch for i in op.decides_on if 0 < i < 2**63}):
                found = await conn.fetch(sql.SELECT_MANY_FOR_UPDATE, wanted)
                self._locked = {command.id: command for command in map(rows.to_command, found)}
            # Reports and cancels first, their rows written together (one UPDATE for all, not one
            # each); then the rest in order, which see those writes. Every operation of a batch was
            # waiting at once, so any order among them is one they could have run in. So nothing
            # that changes rows behind ``_locked`` (expiry, purges) runs before a decision on them.
            order = sorted(range(len(batch)), key=lambda index: not batch[index].decides_on)
            done: dict[int, tuple[Any, BridgeError | None]] = {}
            for index in order:
                op = batch[index]
                if not op.decides_on:
                    await self._write_decided(conn)
                try:
                    done[index] = (await op.fn(conn), None)
                except BridgeError as exc:  # refused before writing anything
                    done[index] = (None, exc)
            await self._write_decided(conn)
            results = [done[index] for index in range(len(batch))]
            # NOTIFY payloads stay under 8000 bytes; ids are digits, the channel a constant: literals.
            notices = [
                f"SELECT pg_notify('{sql.FINAL_CHANNEL}', '{','.join(map(str, self._finished[i : i + 500]))}')"
                for i in range(0, len(self._finished), 500)
            ]
            for notice in notices[:-1]:
                await conn.execute(notice)
            await conn.execute(f"{notices[-1]}; COMMIT" if notices else "COMMIT")
        except BaseException:
            if not conn.is_closed() and conn.is_in_transaction():
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
            raise
        return results

    async def _drop_writer(self) -> None:
        conn, self._writer = self._writer, None
        if conn is not None:
            conn.terminate()

    async def _read(self, fn: Callable[[Conn], Awaitable[Any]]) -> Any:
        assert self._pool is not None
        try:
            async with self._pool.acquire() as conn:
                return await fn(conn)
        except DB_ERRORS as exc:
            raise unavailable(exc) from None

    async def _rows(self, query: str, *args: Any) -> list[Any]:
        found: list[Any] = await self._read(lambda conn: conn.fetch(query, *args))
        return found

    # -- the contract -------------------------------------------------------------------------
    async def create(self, new: NewCommand) -> Command:
        result: Command = await self._submit(lambda conn: self._insert(conn, new))
        return result

    async def _insert(self, conn: Conn, new: NewCommand) -> Command:
        command_id = await conn.fetchval(sql.INSERT, *rows.insert_params(new), self.instance)
        if command_id is None:  # ON CONFLICT DO NOTHING: the idempotency key is taken
            raise Conflict(f"idempotency key {new.idempotency_key!r} is already used")
        return commands.create(new, command_id)

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

        async def op(conn: Conn) -> Created:
            if new.idempotency_key is not None and (found := await _find_idempotent(conn, target, new.idempotency_key)):
                return Created(command=found, created=False, delivery=None)
            marking = mark_retained and not with_delivery  # with the list read, the mark follows it
            statement = sql.SUBMIT_MARKING if marking else sql.SUBMIT
            command_id = await conn.fetchval(statement, *rows.insert_params(new), self.instance, max_open)
            if command_id is None:  # nothing written: the limit, or the key taken meanwhile
                open_count = await conn.fetchval(sql.OPEN_COUNT, target.app_version, target.endpoint_token)
                check_open_limit(open_count, max_open, target)
                raise Conflict(f"idempotency key {new.idempotency_key!r} is already used")
            command = commands.create(new, command_id)
            if not with_delivery:  # marked by SUBMIT_MARKING if asked
                return Created(command=command, created=True, delivery=None)
            (delivery,) = await _deliveries(conn, [target], new.created_at, window)
            if mark_retained and delivery.observe and not delivery.retained:
                await conn.execute(sql.MARK_RETAINED, *rows.target_params(target), delivery.format.value)
                delivery = dataclasses.replace(delivery, retained_format=delivery.format)
            return Created(command=command, created=True, delivery=delivery)

        result: Created = await self._submit(op)
        return result

    async def find_idempotent(self, target: Target, key: str) -> Command | None:
        result: Command | None = await self._read(lambda conn: _find_idempotent(conn, target, key))
        return result

    async def get(self, command_id: int) -> Command | None:
        found = await self._rows(sql.SELECT_ONE, command_id)
        return rows.to_command(found[0]) if found else None

    async def history(self, query: CommandQuery) -> list[Command]:
        where, params = rows.where(query)
        order = "ASC" if query.oldest_first else "DESC"
        text = sql.numbered(f"SELECT {sql.COLUMNS} FROM commands {where} ORDER BY id {order} LIMIT ? OFFSET ?")
        return [rows.to_command(r) for r in await self._rows(text, *params, query.limit, query.offset)]

    async def count(self, query: CommandQuery) -> int:
        where, params = rows.where(query)
        found = await self._rows(sql.numbered(f"SELECT count(*) FROM commands {where}"), *params)
        return int(found[0][0])

    async def report(self, target: Target, reports: Sequence[tuple[int, Report]]) -> list[ReportOutcome]:
        async def op(conn: Conn) -> list[ReportOutcome]:
            return [await self._report_one(conn, target, command_id, report) for command_id, report in reports]

        result: list[ReportOutcome] = await self._submit(op, decides_on=tuple(i for i, _ in reports))
        return result

    async def _for_update(self, conn: Conn, command_id: int) -> Command | None:
        """The row, locked: as the batch locked it (or last wrote it), else read and locked now."""
        if (locked := self._locked.get(command_id)) is not None:
            return locked
        return await _fetch_for_update(conn, command_id)

    async def _report_one(self, conn: Conn, target: Target, command_id: int, report: Report) -> ReportOutcome:
        current = await self._for_update(conn, command_id)
        outcome = resolve_report(current, target, command_id, report)
        if outcome.changed and outcome.command is not None and current is not None:
            await self._save(conn, current, outcome.command)
        return outcome

    async def _save(self, conn: Conn, before: Command, after: Command) -> None:
        if before.id in self._locked:  # locked by the batch: written with the others (_write_decided)
            first = self._unwritten.get(before.id, (before, after))[0]
            self._unwritten[before.id] = (first, after)
            self._locked[before.id] = after
        else:
            params = rows.update_params(before, after)
            status = await conn.execute(sql.UPDATE, *params[:8], self.instance, *params[8:])
            if _count(status) != 1:  # the row is locked by us: this is a bug, not a race
                raise StoreUnavailable(f"command {before.id} changed concurrently; retry")
        if not after.is_open:
            self._finished.append(after.id)

    async def _write_decided(self, conn: Conn) -> None:
        """Write what the batch's reports and cancels decided so far, in one statement."""
        if not self._unwritten:
            return
        unwritten, self._unwritten = self._unwritten, {}
        columns: list[list[Any]] = [[] for _ in range(11)]
        for before, after in unwritten.values():
            for column, value in zip(columns, rows.update_params(before, after), strict=True):
                column.append(value)
        written = {r[0] for r in await conn.fetch(sql.UPDATE_MANY, *columns, self.instance)}
        if missed := sorted(set(unwritten) - written):  # the rows are locked by us: a bug, not a race
            raise StoreUnavailable(f"commands {missed} changed concurrently; retry")

    async def cancel(self, command_id: int, now: datetime, target: Target | None = None) -> Command:
        async def op(conn: Conn) -> Command:
            current = check_cancel(await self._for_update(conn, command_id), command_id, target)
            cancelled = commands.cancel(current, now)
            await self._save(conn, current, cancelled)
            return cancelled

        result: Command = await self._submit(op, decides_on=(command_id,))
        return result

    async def poll(
        self, target: Target, now: datetime, observe: bool | None, fmt: Format, window: int | None = None
    ) -> Polled:
        async def op(conn: Conn) -> Polled:
            old_observe, old_fmt, retained_fmt = await _observer(conn, target)
            new_observe = old_observe if observe is None else observe
            if (new_observe, fmt) != (old_observe, old_fmt):
                await conn.execute(sql.UPSERT_OBSERVER, *rows.observer_params(target, new_observe, fmt))
            outstanding = await _outstanding(conn, target, now, window)
            return Polled(commands=outstanding, moved=retained_fmt not in (None, fmt))

        result: Polled = await self._submit(op)
        return result

    async def delivery(self, target: Target, now: datetime, window: int | None = None) -> Delivery:
        (found,) = await self.deliveries([target], now, window)
        return found

    async def open_summary(self) -> OpenSummary:
        return rows.to_summary(await self._rows(rows.OPEN_SUMMARY))

    async def deliveries(self, targets: Sequence[Target], now: datetime, window: int | None = None) -> list[Delivery]:
        if not targets:
            return []
        found: list[Delivery] = await self._read(lambda conn: _deliveries(conn, targets, now, window))
        return found

    async def mark_retained(self, target: Target, retained: bool, fmt: Format | None = None) -> None:
        await self.mark_retained_many([(target, retained, fmt)])

    async def mark_retained_many(self, marks: Sequence[tuple[Target, bool, Format | None]]) -> None:
        """One statement for the marks and one for the clears when no target repeats (a push loop's
        chunk); else one statement each, in order."""
        marks = list(marks)
        bulk = len({target for target, _, _ in marks}) == len(marks)

        async def op(conn: Conn) -> None:
            if not bulk:
                for target, retained, fmt in marks:
                    params = rows.target_params(target)
                    if retained:
                        await conn.execute(sql.MARK_RETAINED, *params, None if fmt is None else fmt.value)
                    else:
                        await conn.execute(sql.CLEAR_RETAINED, *params, *params)
                return
            marked = [(t, fmt) for t, retained, fmt in marks if retained]
            cleared = [t for t, retained, _ in marks if not retained]
            if marked:
                formats = [None if fmt is None else fmt.value for _, fmt in marked]
                await conn.execute(sql.MARK_RETAINED_MANY, *_target_columns([t for t, _ in marked]), formats)
            if cleared:
                await conn.execute(sql.CLEAR_RETAINED_MANY, *_target_columns(cleared))

        await self._submit(op)

    async def retained_targets(self) -> list[Target]:
        return [rows.to_target(r) for r in await self._rows(sql.RETAINED_TARGETS)]

    async def open_targets(self, now: datetime, app_version: str, endpoint_token: str) -> list[Target]:
        found = await self._rows(sql.OPEN_TARGETS_OF, rows.to_us(now), app_version, endpoint_token)
        return [rows.to_target(r) for r in found]

    async def all_open_targets(self, now: datetime) -> list[Target]:
        return [rows.to_target(r) for r in await self._rows(sql.OPEN_TARGETS, rows.to_us(now))]

    async def expire_due(self, now: datetime, limit: int) -> list[tuple[int, Target]]:
        async def op(conn: Conn) -> list[tuple[int, Target]]:
            if not await conn.fetchval(sql.TRY_XACT_LOCK, EXPIRY_LOCK):  # another instance is sweeping
                return []
            found = await conn.fetch(sql.EXPIRE_DUE, rows.to_us(now), limit * EXPIRE_WINDOW, limit, self.instance)
            self._finished.extend(r[0] for r in found)
            return [(r[0], rows.to_target(r[1:])) for r in sorted(found)]

        result: list[tuple[int, Target]] = await self._submit(op)
        return result

    async def get_many(self, command_ids: Sequence[int]) -> list[Command]:
        ids = sorted(set(command_ids))
        return [rows.to_command(r) for r in await self._rows(sql.GET_MANY, ids)] if ids else []

    async def purge_finished(self, before: datetime, limit: int) -> int:
        return await self._delete(sql.PURGE_FINISHED, rows.to_us(before), limit)

    async def purge_ephemeral(self, before: datetime, limit: int) -> int:
        return await self._delete(sql.PURGE_EPHEMERAL, rows.to_us(before), limit)

    async def _delete(self, query: str, *args: Any) -> int:
        async def op(conn: Conn) -> int:
            if not await conn.fetchval(sql.TRY_XACT_LOCK, RETENTION_LOCK):
                return 0
            return _count(await conn.execute(query, *args))

        result: int = await self._submit(op)
        return result

    async def mark_announced(self, announced: Sequence[tuple[int, datetime]]) -> None:
        ids = [command_id for command_id, _ in announced]
        versions = [rows.to_us(updated_at) for _, updated_at in announced]

        async def op(conn: Conn) -> None:
            await conn.execute(sql.MARK_ANNOUNCED, ids, versions)

        await self._submit(op)

    async def mark_delivery(
        self, sent: Sequence[tuple[int, datetime]], delivered: Sequence[tuple[int, datetime]]
    ) -> None:
        async def op(conn: Conn) -> None:
            for statement, marks in ((sql.MARK_DELIVERED, delivered), (sql.MARK_SENT, sent)):
                first = dict(reversed(marks))  # one time per id (UPDATE ... FROM takes one match): the earliest given
                if first:
                    await conn.execute(statement, list(first), [rows.to_us(at) for at in first.values()])

        if sent or delivered:
            await self._submit(op)

    async def unannounced(self, after_id: int, limit: int) -> list[Command]:
        found = await self._rows(sql.UNANNOUNCED, after_id, limit, self.instance)
        return [rows.to_command(r) for r in found]

    async def adopt_orphans(self, older_than: datetime, limit: int) -> list[Command]:
        """Take over the unannounced events of instances that are not running (and of CLI runs
        whose flush failed, changed before ``older_than``); this instance publishes them now."""
        if self.instance is None:
            return []

        async def op(conn: Conn) -> list[Command]:
            found = await conn.fetch(sql.ADOPT_ORPHANS, self.instance, rows.to_us(older_than), limit)
            return sorted((rows.to_command(r) for r in found), key=lambda c: c.id)

        result: list[Command] = await self._submit(op)
        return result

    async def check_writable(self, now: datetime) -> None:
        async def op(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO health (instance, checked_at) VALUES ($1, $2) "
                "ON CONFLICT (instance) DO UPDATE SET checked_at = excluded.checked_at",
                self.instance or "",
                rows.to_us(now),
            )

        await self._submit(op)

    async def shared_secret(self, name: str, make: Callable[[], str]) -> tuple[str, bool]:
        """The value every instance shares under ``name``, made now if there is none; and whether
        this call made it (the first instance to start)."""
        candidate = make()

        async def op(conn: Conn) -> tuple[str, bool]:
            made = await conn.fetchval(sql.INSERT_SECRET, name, candidate)
            value = made if made is not None else await conn.fetchval(sql.SELECT_SECRET, name)
            return str(value), made is not None

        result: tuple[str, bool] = await self._submit(op)
        return result

    # -- the device registry --------------------------------------------------------------------
    async def add_device(self, device: Device) -> Device:
        async def op(conn: Conn) -> Device:
            if _count(await conn.execute(sql.INSERT_DEVICE, *rows.device_params(device))) != 1:
                raise _device_conflict(device)
            return device

        result: Device = await self._submit(op)
        return result

    async def replace_device(self, device: Device) -> Device:
        params = rows.device_params(device)

        async def op(conn: Conn) -> Device:
            changed = await conn.execute(
                sql.UPDATE_DEVICE, *params[1:], params[0], device.app_version, device.endpoint_token, params[0]
            )
            if _count(changed) != 1:
                if await conn.fetchval(sql.DEVICE_EXISTS, device.device_id) is None:
                    raise DeviceNotFound(f"no device {device.device_id!r}")
                raise _device_conflict(device)
            return device

        result: Device = await self._submit(op)
        return result

    async def get_device(self, device_id: str) -> Device | None:
        found = await self._rows(sql.SELECT_DEVICE, device_id)
        return rows.to_device(found[0]) if found else None

    async def device_for(self, app_version: str, endpoint_token: str) -> Device | None:
        found = await self._rows(sql.SELECT_DEVICE_FOR, app_version, endpoint_token)
        return rows.to_device(found[0]) if found else None

    async def devices(
        self, limit: int, offset: int, labels: Mapping[str, str] | None = None, connected: bool | None = None
    ) -> list[Device]:
        where, params = _labels_where(labels, connected, first=3)
        query = f"SELECT {rows.DEVICE_SELECT} FROM devices {where} ORDER BY created_at, device_id LIMIT $1 OFFSET $2"
        return [rows.to_device(r) for r in await self._rows(query, limit, offset, *params)]

    async def count_devices(self, labels: Mapping[str, str] | None = None, connected: bool | None = None) -> int:
        where, params = _labels_where(labels, connected, first=1)
        found = await self._rows(f"SELECT count(*) FROM devices {where}", *params)
        return int(found[0][0])

    async def mark_seen(self, seen: Sequence[tuple[str, str, datetime]]) -> None:
        if not seen:
            return
        latest: dict[tuple[str, str], datetime] = {}  # one row each: UPDATE ... FROM takes one match
        for av, token, at in seen:
            if (av, token) not in latest or latest[(av, token)] < at:
                latest[(av, token)] = at
        columns = ([k[0] for k in latest], [k[1] for k in latest], [rows.to_us(at) for at in latest.values()])

        async def op(conn: Conn) -> None:
            await conn.execute(sql.MARK_SEEN_MANY, *columns)

        await self._submit(op)

    async def mark_presence(self, changes: Sequence[tuple[str, str, bool, datetime]]) -> None:
        # UPDATE ... FROM takes one match per row: a device's second change in the batch goes in the
        # next statement (rounds: the n-th change of each device), so all apply in order.
        rounds: list[dict[tuple[str, str], tuple[bool, datetime]]] = []
        for av, token, connected, at in changes:
            free = next((r for r in rounds if (av, token) not in r), None)
            if free is None:
                rounds.append(free := {})
            free[(av, token)] = (connected, at)

        async def op(conn: Conn) -> None:
            for changed in rounds:
                await conn.execute(
                    sql.MARK_PRESENCE_MANY,
                    [k[0] for k in changed],
                    [k[1] for k in changed],
                    [int(c) for c, _ in changed.values()],
                    [rows.to_us(at) for _, at in changed.values()],
                )

        if rounds:
            await self._submit(op)

    async def disconnect_all(self, now: datetime) -> int:
        async def op(conn: Conn) -> int:
            return _count(await conn.execute(sql.DISCONNECT_ALL, rows.to_us(now)))

        result: int = await self._submit(op)
        return result

    async def delete_device(self, device_id: str) -> bool:
        async def op(conn: Conn) -> bool:
            return _count(await conn.execute(sql.DELETE_DEVICE, device_id)) == 1

        result: bool = await self._submit(op)
        return result


def _labels_where(labels: Mapping[str, str] | None, connected: bool | None, first: int) -> tuple[str, list[str]]:
    """Devices carrying every one of these labels and, with ``connected``, known (not) to be
    connected; placeholders numbered from ``first``."""
    tests = [f"labels::jsonb ->> ${first + 2 * i} = ${first + 2 * i + 1}" for i in range(len(labels or {}))]
    tests += rows.connected_test(connected)
    return ("WHERE " + " AND ".join(tests) if tests else ""), [x for kv in (labels or {}).items() for x in kv]


def _target_columns(targets: Sequence[Target]) -> tuple[list[str], list[str], list[str]]:
    """Targets as three arrays, for ``unnest``."""
    return [t.app_version for t in targets], [t.endpoint_token for t in targets], [t.command_type for t in targets]


async def _reset_reader(conn: Conn) -> None:
    """A read connection back in the pool. asyncpg's default reset (advisory unlock, CLOSE ALL,
    UNLISTEN, RESET ALL) costs a round trip after every read; reads here take no locks, listen to
    nothing and set nothing, so only a transaction left open (a read cancelled inside one) is undone."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def _count(status: str) -> int:
    """The row count of a command status such as ``UPDATE 3`` or ``DELETE 0``."""
    return int(status.rpartition(" ")[2] or 0)


def _device_conflict(device: Device) -> Conflict:
    endpoint = f"{device.app_version}/{device.endpoint_token}"
    return Conflict(f"device {device.device_id!r} or endpoint {endpoint} is already registered")


def _fail_all(batch: list[_Op], error: BaseException) -> None:
    for op in batch:
        _resolve(op.future, None, error)


def _resolve(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


async def _find_idempotent(conn: Conn, target: Target, key: str) -> Command | None:
    found = await conn.fetchrow(sql.FIND_IDEMPOTENT, target.app_version, target.endpoint_token, key)
    return rows.to_command(found) if found else None


async def _fetch_for_update(conn: Conn, command_id: int) -> Command | None:
    found = await conn.fetchrow(sql.SELECT_FOR_UPDATE, command_id)
    return rows.to_command(found) if found else None


async def _observer(conn: Conn, target: Target) -> tuple[bool, Format, Format | None]:
    found = await conn.fetchrow(sql.SELECT_OBSERVER, *rows.target_params(target))
    if found is None:
        return True, Format.PLAIN, None
    observe, fmt, retained_fmt = found
    return bool(observe), Format(fmt), None if retained_fmt is None else Format(retained_fmt)


async def _deliveries(conn: Conn, targets: Sequence[Target], now: datetime, window: int | None) -> list[Delivery]:
    """Each target's delivery, in the order given, in one statement (DELIVERIES; LIMIT NULL: all)."""
    found = await conn.fetch(sql.DELIVERIES, *_target_columns(targets), rows.to_us(now), window)
    grouped: list[list[Any]] = [[] for _ in targets]
    for row in found:
        grouped[row[0] - 1].append(row[1:])
    return [_to_delivery(target, group) for target, group in zip(targets, grouped, strict=True)]


def _to_delivery(target: Target, found: Sequence[Any]) -> Delivery:
    """One target's DELIVERIES rows: the observer's columns on each, then a command (NULLs: none)."""
    observe, fmt, retained_fmt = found[0][0:3]
    outstanding = tuple(rows.to_command(r[3:]) for r in found if r[3] is not None)
    return Delivery(
        target=target,
        observe=True if observe is None else bool(observe),
        format=Format.PLAIN if fmt is None else Format(fmt),
        commands=outstanding,
        retained_format=None if retained_fmt is None else Format(retained_fmt),
    )


async def _outstanding(conn: Conn, target: Target, now: datetime, window: int | None) -> tuple[Command, ...]:
    found = await conn.fetch(sql.OUTSTANDING, *rows.target_params(target), rows.to_us(now), window)
    return tuple(rows.to_command(r) for r in found)


# -- schema -------------------------------------------------------------------------------------
async def migrate(conn: Conn) -> int:
    """Bring the schema to the newest version, one step per transaction under the migration lock."""
    await conn.execute(CREATE_VERSION_TABLE_LOCKED)
    while True:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_SPACE, MIGRATION_LOCK)
            version = await _version(conn)
            if version >= len(MIGRATIONS):
                return len(MIGRATIONS)
            await conn.execute(MIGRATIONS[version])
            await conn.execute("UPDATE broker_bridge_schema SET version = $1", version + 1)
            log.info("postgres_migrated", version=version + 1)


async def check_schema(conn: Conn) -> int:
    version = await _version(conn)
    if version != len(MIGRATIONS):
        raise StartupError(f"database schema is version {version}, this broker-bridge needs {len(MIGRATIONS)}")
    return version


async def _version(conn: Conn) -> int:
    version = await conn.fetchval("SELECT max(version) FROM broker_bridge_schema")
    if version is None:
        await conn.execute("INSERT INTO broker_bridge_schema (version) VALUES (0)")
        version = 0
    if version > len(MIGRATIONS):
        raise StartupError(f"database schema {version} is newer than this broker-bridge ({len(MIGRATIONS)})")
    return int(version)


# Two instances starting at once must not both create the version table.
CREATE_VERSION_TABLE_LOCKED = f"""
DO $$ BEGIN
    PERFORM pg_advisory_xact_lock({LOCK_SPACE}, {MIGRATION_LOCK});
    {CREATE_VERSION_TABLE};
END $$
"""


# -- instances ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class InstanceRecord:
    name: str
    host: str
    pid: int
    embedded_broker: bool
    running: bool


class InstanceLease:
    """This instance's claim on its name: a session advisory lock held on a connection of its own
    for as long as the instance runs (PostgreSQL frees it when the process dies)."""

    def __init__(self, dsn: str, name: str, *, embedded_broker: bool, connect_timeout_s: float = 5.0) -> None:
        self.dsn = dsn
        self.name = name
        self.embedded_broker = embedded_broker
        self.connect_timeout_s = connect_timeout_s
        self._conn: Conn | None = None
        self.lost = asyncio.Event()  # set when the lock's connection was lost

    async def __aenter__(self) -> Self:
        await self._claim()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), 2)

    async def _claim(self) -> None:
        try:
            conn: Conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout_s)
        except DB_ERRORS as exc:
            raise StartupError(f"cannot open database: {exc}") from None
        try:
            await self._register(conn)
        except DB_ERRORS as exc:  # the server went away meanwhile: retried by ``keep``
            conn.terminate()
            raise StartupError(f"cannot claim instance {self.name!r}: {exc}") from None
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(lambda _: self.lost.set())
        self._conn = conn

    async def _register(self, conn: Conn) -> None:
        if not await conn.fetchval(sql.TRY_INSTANCE_LOCK, self.name):
            raise StartupError(
                f"an instance named {self.name!r} is already running against this database; "
                "give each instance its own --instance NAME (setting 'instance')"
            )
        others = [r for r in await instances(conn) if r.running and r.name != self.name]
        clash = [r.name for r in others if r.embedded_broker or self.embedded_broker]
        if clash:
            raise StartupError(
                f"instance {clash[0]!r} is running against this database; several instances need an "
                "external MQTT broker (--broker-url) for all of them, not the embedded one"
            )
        await conn.execute(sql.REGISTER_INSTANCE, self.name, socket.gethostname(), os.getpid(), self.embedded_broker)

    async def keep(self) -> None:
        """Hold the claim until cancelled; after a lost connection, claim again (retrying while the
        database is down). Raises StartupError if another process took the name meanwhile."""
        while True:
            await self.lost.wait()
            log.error("instance_lock_lost", instance=self.name, hint="the database connection was lost")
            while True:
                await asyncio.sleep(1.0)
                try:
                    self.lost.clear()
                    await self._claim()
                    log.info("instance_lock_regained", instance=self.name)
                    break
                except StartupError as exc:
                    if "already running" in exc.reason:
                        raise
                    log.warning("instance_lock_retry", error=exc.reason)


async def instances(conn: Conn) -> list[InstanceRecord]:
    return [InstanceRecord(*r) for r in await conn.fetch(sql.INSTANCE_RECORDS)]


class PushLocks:
    """Per-target advisory locks held while a target's outstanding list is read and published, so
    instances publish one target's lists one at a time and each reads the list after the previous
    publish was acknowledged: a retained list never goes back to an older state."""

    def __init__(self, dsn: str, connect_timeout_s: float = 5.0) -> None:
        self.dsn = dsn
        self.connect_timeout_s = connect_timeout_s
        self._conn: Conn | None = None
        self._lock = asyncio.Lock()  # one statement at a time on the connection

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), 2)

    async def _call(self, query: str, keys: list[int]) -> list[Any]:
        async with self._lock:
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout_s)
                found: list[Any] = await self._conn.fetch(query, keys)
                return found
            except DB_ERRORS as exc:
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.terminate()  # its locks go with it
                raise unavailable(exc) from None

    @staticmethod
    def key(target: Target) -> int:
        """A stable 32-bit key (collisions only make two targets wait for each other)."""
        text = f"{target.app_version}/{target.endpoint_token}/{target.command_type}".encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=4).digest(), "big", signed=True)

    async def acquire(self, targets: Sequence[Target]) -> list[Target]:
        """Lock what can be locked now; the targets another instance is pushing are left out."""
        by_key: dict[int, list[Target]] = {}
        for target in targets:
            by_key.setdefault(self.key(target), []).append(target)
        got = {r[0] for r in await self._call(sql.TRY_PUSH_LOCKS, list(by_key))}
        return [t for k in got for t in by_key[k]]

    async def release(self, targets: Sequence[Target]) -> None:
        await self._call(sql.RELEASE_PUSH_LOCKS, sorted({self.key(t) for t in targets}))
