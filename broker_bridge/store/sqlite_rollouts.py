"""The rollout half of the SQLite store (same connection, same queue, same commits)."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from broker_bridge import commands
from broker_bridge.commands import Command
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

Conn = sqlite3.Connection


class SqliteRollouts:
    """Rollout operations; ``SqliteStore`` provides ``_submit`` and the command helpers."""

    async def _submit(self, fn: Callable[[Conn], Any], *, writes: bool) -> Any:
        raise NotImplementedError

    async def create_rollout(self, draft: Rollout, members: Sequence[tuple[str, str, str]]) -> Rollout:
        us = rows.to_us(draft.created_at)

        def op(conn: Conn) -> Rollout:
            cursor = conn.execute(rr.INSERT_ROLLOUT, rr.insert_params(draft))
            assert cursor.lastrowid is not None
            rollout_id = cursor.lastrowid
            conn.executemany(rr.INSERT_MEMBER, ((rollout_id, n, *m, us) for n, m in enumerate(members)))
            return dataclasses.replace(draft, id=rollout_id)

        result: Rollout = await self._submit(op, writes=True)
        return result

    async def get_rollout(self, rollout_id: int) -> Rollout | None:
        def op(conn: Conn) -> Rollout | None:
            return _rollout(conn, rollout_id)

        result: Rollout | None = await self._submit(op, writes=False)
        return result

    async def rollouts(self, limit: int, offset: int) -> tuple[list[Rollout], int]:
        def op(conn: Conn) -> tuple[list[Rollout], int]:
            sql = f"SELECT {rr.ROLLOUT_COLUMNS} FROM rollouts ORDER BY id DESC LIMIT ? OFFSET ?"
            found = [rr.to_rollout(r) for r in conn.execute(sql, (limit, offset))]
            return found, int(conn.execute("SELECT count(*) FROM rollouts").fetchone()[0])

        result: tuple[list[Rollout], int] = await self._submit(op, writes=False)
        return result

    async def rollout_members(
        self, rollout_id: int, states: frozenset[DeviceState], limit: int, offset: int
    ) -> tuple[list[Member], int]:
        where, params = rr.members_where(states)

        def op(conn: Conn) -> tuple[list[Member], int]:
            base = f"FROM rollout_members WHERE rollout_id = ?{where}"
            sql = f"SELECT {rr.MEMBER_COLUMNS} {base} ORDER BY position LIMIT ? OFFSET ?"
            found = [rr.to_member(r) for r in conn.execute(sql, (rollout_id, *params, limit, offset))]
            return found, int(conn.execute(f"SELECT count(*) {base}", (rollout_id, *params)).fetchone()[0])

        result: tuple[list[Member], int] = await self._submit(op, writes=False)
        return result

    async def active_rollouts(self) -> list[int]:
        def op(conn: Conn) -> list[int]:
            return [int(r[0]) for r in conn.execute(rr.ACTIVE_ROLLOUTS)]

        result: list[int] = await self._submit(op, writes=False)
        return result

    async def step_rollout(
        self, rollout_id: int, now: datetime, decide: Decide, build: Build, *, wait: bool = True
    ) -> Stepped | None:
        """One step in one transaction (see ``rollouts``). One writer: ``wait`` changes nothing here."""

        def op(conn: Conn) -> Stepped:
            return _step(conn, rollout_id, now, decide, build)

        result: Stepped = await self._submit(op, writes=True)
        return result


def _rollout(conn: Conn, rollout_id: int) -> Rollout | None:
    found = conn.execute(f"SELECT {rr.ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
    return rr.to_rollout(found) if found else None


def _command(conn: Conn, command_id: int | None) -> Command | None:
    if command_id is None:
        return None
    found = conn.execute(f"SELECT {rows.COLUMNS} FROM commands WHERE id = ?", (command_id,)).fetchone()
    return rows.to_command(found) if found else None


def _step(conn: Conn, rollout_id: int, now: datetime, decide: Decide, build: Build) -> Stepped:
    rollout = _rollout(conn, rollout_id)
    if rollout is None:
        raise RolloutNotFound(f"no rollout {rollout_id}")
    in_flight = []
    for row in conn.execute(rr.CHANGED_IN_FLIGHT, (rollout_id,)).fetchall():
        in_flight.append((rr.to_member(row[:8]), _command(conn, row[8])))
    plan = decide(Snapshot(rollout=rollout, in_flight=in_flight))  # may refuse: nothing written yet
    us = rows.to_us(now)
    conn.executemany(rr.SET_MEMBER, ((state.value, us, rollout_id, m.position) for m, state in plan.settle))
    created: list[Command] = []
    cancelled: list[Command] = []
    after = plan.rollout
    if plan.cancel_open:
        for position, command_id in conn.execute(rr.OPEN_MEMBERS, (rollout_id,)).fetchall():
            current = _command(conn, command_id)
            if current is not None and current.is_open:
                done = commands.cancel(current, now)
                cursor = conn.execute(rows.UPDATE, rows.update_params(current, done))
                if cursor.rowcount == 1:
                    cancelled.append(done)
            conn.execute(rr.SET_MEMBER, (DeviceState.CANCELLED.value, us, rollout_id, position))
        conn.execute(rr.CANCEL_QUEUED, (us, rollout_id))
        after = dataclasses.replace(after, counts=_recount(conn, rollout_id))
    elif plan.send:
        sent = skipped = 0
        for row in conn.execute(rr.QUEUED_MEMBERS, (rollout_id, plan.send)).fetchall():
            member = rr.to_member(row)
            new = build(rollout.spec, member, _device(conn, member))
            if new is None:
                conn.execute(rr.SET_MEMBER, (DeviceState.SKIPPED.value, us, rollout_id, member.position))
                skipped += 1
                continue
            cursor = conn.execute(rows.INSERT, rows.insert_params(new))
            assert cursor.lastrowid is not None
            created.append(commands.create(new, cursor.lastrowid))
            conn.execute(rr.SENT_MEMBER, (cursor.lastrowid, us, rollout_id, member.position))
            sent += 1
        after = counted(after, sent=sent, skipped=skipped, now=now)
    conn.execute(rr.UPDATE_ROLLOUT, rr.rollout_params(after))
    return Stepped(rollout=after, created=created, cancelled=cancelled, settled=len(plan.settle))


def _recount(conn: Conn, rollout_id: int) -> dict[DeviceState, int]:
    return {DeviceState(s): int(n) for s, n in conn.execute(rr.COUNT_BY_STATE, (rollout_id,))}


def _device(conn: Conn, member: Member) -> Any:
    found = conn.execute(
        f"SELECT {rows.DEVICE_SELECT} FROM devices WHERE device_id = ?", (member.device_id,)
    ).fetchone()
    return rows.to_device(found) if found else None
