"""The device registry half of the SQLite store (same connection, same queue, same commits)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from broker_bridge.devices import Device
from broker_bridge.errors import Conflict, DeviceNotFound
from broker_bridge.store import sqlite_rows as rows

Conn = sqlite3.Connection


class SqliteDevices:
    """Registry operations; ``SqliteStore`` provides ``_submit`` and ``_delete``."""

    async def _submit(self, fn: Callable[[Conn], Any], *, writes: bool) -> Any:
        raise NotImplementedError

    async def _delete(self, sql: str, params: tuple[Any, ...]) -> int:
        raise NotImplementedError

    # -- the device registry --------------------------------------------------------------------
    async def add_device(self, device: Device) -> Device:
        def op(conn: Conn) -> Device:
            _write_device(conn, rows.INSERT_DEVICE, rows.device_params(device), device)
            return device

        result: Device = await self._submit(op, writes=True)
        return result

    async def replace_device(self, device: Device) -> Device:
        params = rows.device_params(device)

        def op(conn: Conn) -> Device:
            if _write_device(conn, rows.UPDATE_DEVICE, (*params[1:], params[0]), device) != 1:
                raise DeviceNotFound(f"no device {device.device_id!r}")
            return device

        result: Device = await self._submit(op, writes=True)
        return result

    async def get_device(self, device_id: str) -> Device | None:
        return await self._one_device("device_id = ?", (device_id,))

    async def device_for(self, app_version: str, endpoint_token: str) -> Device | None:
        return await self._one_device("app_version = ? AND endpoint_token = ?", (app_version, endpoint_token))

    async def _one_device(self, where: str, params: tuple[Any, ...]) -> Device | None:
        sql = f"SELECT {rows.DEVICE_SELECT} FROM devices WHERE {where}"

        def op(conn: Conn) -> Device | None:
            found = list(conn.execute(sql, params))
            return rows.to_device(found[0]) if found else None

        result: Device | None = await self._submit(op, writes=False)
        return result

    async def devices(
        self, limit: int, offset: int, labels: Mapping[str, str] | None = None, connected: bool | None = None
    ) -> list[Device]:
        where, params = rows.labels_where(labels, connected)
        sql = f"SELECT {rows.DEVICE_SELECT} FROM devices {where} ORDER BY created_at, device_id LIMIT ? OFFSET ?"

        def op(conn: Conn) -> list[Device]:
            return [rows.to_device(r) for r in conn.execute(sql, (*params, limit, offset))]

        result: list[Device] = await self._submit(op, writes=False)
        return result

    async def count_devices(self, labels: Mapping[str, str] | None = None, connected: bool | None = None) -> int:
        where, params = rows.labels_where(labels, connected)

        def op(conn: Conn) -> int:
            found = list(conn.execute(f"SELECT count(*) FROM devices {where}", params))
            return int(found[0][0])

        result: int = await self._submit(op, writes=False)
        return result

    async def delete_device(self, device_id: str) -> bool:
        return await self._delete("DELETE FROM devices WHERE device_id = ?", (device_id,)) == 1

    async def mark_seen(self, seen: Sequence[tuple[str, str, datetime]]) -> None:
        params = [(rows.to_us(at), av, token, rows.to_us(at)) for av, token, at in seen]

        def op(conn: Conn) -> None:
            conn.executemany(rows.MARK_SEEN, params)

        if params:
            await self._submit(op, writes=True)

    async def mark_presence(self, changes: Sequence[tuple[str, str, bool, datetime]]) -> None:
        params = [rows.presence_params(*change) for change in changes]

        def op(conn: Conn) -> None:
            conn.executemany(rows.MARK_PRESENCE, params)

        if params:
            await self._submit(op, writes=True)

    async def disconnect_all(self, now: datetime) -> int:
        def op(conn: Conn) -> int:
            return conn.execute(rows.DISCONNECT_ALL, (rows.to_us(now),)).rowcount

        result: int = await self._submit(op, writes=True)
        return result


def _write_device(conn: Conn, sql: str, params: tuple[Any, ...], device: Device) -> int:
    try:
        cursor = conn.execute(sql, params)
    except sqlite3.IntegrityError:  # the statement changed nothing
        endpoint = f"{device.app_version}/{device.endpoint_token}"
        raise Conflict(f"device {device.device_id!r} or endpoint {endpoint} is already registered") from None
    return cursor.rowcount
