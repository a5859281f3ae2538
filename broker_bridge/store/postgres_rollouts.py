"""The rollout half of the PostgreSQL store: the SQLite store's statements, numbered, and the
rollout row locked for a step (``FOR UPDATE``; a tick skips one another instance is stepping)."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from broker_bridge import commands
from broker_bridge.commands import Command, NewCommand
from broker_bridge.errors import RolloutNotFound
from broker_bridge.rollouts import (
    Build,
    Decide,
    DeviceState,
    Member,
    Rollout,
    Snapshot,
    Stepped,
    counted,
)
from broker_bridge.store import rollout_rows as rr
from broker_bridge.store import sqlite_rows as rows
from broker_bridge.store.postgres_sql import numbered

Conn = Any  # asyncpg.Connection (asyncpg ships no type information)

SELECT_ROLLOUT = f"SELECT {rr.ROLLOUT_COLUMNS} FROM rollouts WHERE id = $1"
INSERT_ROLLOUT = numbered(rr.INSERT_ROLLOUT) + " RETURNING id"
INSERT_MEMBERS = (
    "INSERT INTO rollout_members (rollout_id, position, device_id, app_version, endpoint_token, state, updated_at) "
    "SELECT $1, n - 1, d, av, t, 'queued', $5 FROM unnest($2::text[], $3::text[], $4::text[]) "
    "WITH ORDINALITY AS m(d, av, t, n)"
)
CHANGED_IN_FLIGHT = numbered(rr.CHANGED_IN_FLIGHT)
OPEN_MEMBERS = numbered(rr.OPEN_MEMBERS)
QUEUED_MEMBERS = numbered(rr.QUEUED_MEMBERS)
SET_MEMBER = numbered(rr.SET_MEMBER)
SENT_MEMBER = numbered(rr.SENT_MEMBER)
CANCEL_QUEUED = numbered(rr.CANCEL_QUEUED)
COUNT_BY_STATE = numbered(rr.COUNT_BY_STATE)
UPDATE_ROLLOUT = numbered(rr.UPDATE_ROLLOUT)


class PostgresRollouts:
    """Rollout operations; ``PostgresStore`` provides the writer, reads and command helpers."""

    async def _submit(self, fn: Callable[[Conn], Awaitable[Any]], decides_on: tuple[int, ...] = ()) -> Any:
        raise NotImplementedError

    async def _rows(self, query: str, *args: Any) -> list[Any]:
        raise NotImplementedError

    async def _insert(self, conn: Conn, new: NewCommand) -> Command:
        raise NotImplementedError

    async def _for_update(self, conn: Conn, command_id: int) -> Command | None:
        raise NotImplementedError

    async def _save(self, conn: Conn, before: Command, after: Command) -> None:
        raise NotImplementedError

    async def create_rollout(self, draft: Rollout, members: Sequence[tuple[str, str, str]]) -> Rollout:
        columns = ([m[0] for m in members], [m[1] for m in members], [m[2] for m in members])

        async def op(conn: Conn) -> Rollout:
            rollout_id = await conn.fetchval(INSERT_ROLLOUT, *rr.insert_params(draft))
            if members:
                await conn.execute(INSERT_MEMBERS, rollout_id, *columns, rows.to_us(draft.created_at))
            return dataclasses.replace(draft, id=rollout_id)

        result: Rollout = await self._submit(op)
        return result

    async def get_rollout(self, rollout_id: int) -> Rollout | None:
        found = await self._rows(SELECT_ROLLOUT, rollout_id)
        return rr.to_rollout(found[0]) if found else None

    async def rollouts(self, limit: int, offset: int) -> tuple[list[Rollout], int]:
        found = await self._rows(
            f"SELECT {rr.ROLLOUT_COLUMNS} FROM rollouts ORDER BY id DESC LIMIT $1 OFFSET $2", limit, offset
        )
        total = await self._rows("SELECT count(*) FROM rollouts")
        return [rr.to_rollout(r) for r in found], int(total[0][0])

    async def rollout_members(
        self, rollout_id: int, states: frozenset[DeviceState], limit: int, offset: int
    ) -> tuple[list[Member], int]:
        where, params = rr.members_where(states)
        base = f"FROM rollout_members WHERE rollout_id = ?{where}"
        page = numbered(f"SELECT {rr.MEMBER_COLUMNS} {base} ORDER BY position LIMIT ? OFFSET ?")
        found = await self._rows(page, rollout_id, *params, limit, offset)
        total = await self._rows(numbered(f"SELECT count(*) {base}"), rollout_id, *params)
        return [rr.to_member(r) for r in found], int(total[0][0])

    async def active_rollouts(self) -> list[int]:
        return [int(r[0]) for r in await self._rows(rr.ACTIVE_ROLLOUTS)]

    async def step_rollout(
        self, rollout_id: int, now: datetime, decide: Decide, build: Build, *, wait: bool = True
    ) -> Stepped | None:
        async def op(conn: Conn) -> Stepped | None:
            return await self._step(conn, rollout_id, now, decide, build, wait)

        result: Stepped | None = await self._submit(op)
        return result

    async def _step(
        self, conn: Conn, rollout_id: int, now: datetime, decide: Decide, build: Build, wait: bool
    ) -> Stepped | None:
        found = await conn.fetchrow(SELECT_ROLLOUT + (" FOR UPDATE" if wait else " FOR UPDATE SKIP LOCKED"), rollout_id)
        if found is None:
            if not wait and await conn.fetchval("SELECT 1 FROM rollouts WHERE id = $1", rollout_id):
                return None  # another instance is stepping it
            raise RolloutNotFound(f"no rollout {rollout_id}")
        rollout = rr.to_rollout(found)
        in_flight = []
        for row in await conn.fetch(CHANGED_IN_FLIGHT, rollout_id):
            command = None if row[8] is None else await self._for_update(conn, row[8])
            in_flight.append((rr.to_member(row[:8]), command))
        plan = decide(Snapshot(rollout=rollout, in_flight=in_flight))  # may refuse: nothing written yet
        us = rows.to_us(now)
        if plan.settle:
            await conn.executemany(SET_MEMBER, [(s.value, us, rollout_id, m.position) for m, s in plan.settle])
        created: list[Command] = []
        cancelled: list[Command] = []
        after = plan.rollout
        if plan.cancel_open:
            for position, command_id in await conn.fetch(OPEN_MEMBERS, rollout_id):
                current = None if command_id is None else await self._for_update(conn, command_id)
                if current is not None and current.is_open:
                    done = commands.cancel(current, now)
                    await self._save(conn, current, done)
                    cancelled.append(done)
                await conn.execute(SET_MEMBER, DeviceState.CANCELLED.value, us, rollout_id, position)
            await conn.execute(CANCEL_QUEUED, us, rollout_id)
            recount = await conn.fetch(COUNT_BY_STATE, rollout_id)
            after = dataclasses.replace(after, counts={DeviceState(s): int(n) for s, n in recount})
        elif plan.send:
            sent = skipped = 0
            for row in await conn.fetch(QUEUED_MEMBERS, rollout_id, plan.send):
                member = rr.to_member(row)
                device = await conn.fetchrow(
                    f"SELECT {rows.DEVICE_SELECT} FROM devices WHERE device_id = $1", member.device_id
                )
                new = build(rollout.spec, member, None if device is None else rows.to_device(device))
                if new is None:
                    await conn.execute(SET_MEMBER, DeviceState.SKIPPED.value, us, rollout_id, member.position)
                    skipped += 1
                    continue
                command = await self._insert(conn, new)
                created.append(command)
                await conn.execute(SENT_MEMBER, command.id, us, rollout_id, member.position)
                sent += 1
            after = counted(after, sent=sent, skipped=skipped, now=now)
        await conn.execute(UPDATE_ROLLOUT, *rr.rollout_params(after))
        return Stepped(rollout=after, created=created, cancelled=cancelled, settled=len(plan.settle))
