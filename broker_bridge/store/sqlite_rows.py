"""SQL text and the mapping between SQLite rows and command records."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from broker_bridge.commands import Command, CommandState, NewCommand, Report
from broker_bridge.devices import Device, Manifest
from broker_bridge.store.base import CommandQuery, OpenSummary
from broker_bridge.topics import Format, Target

COLUMNS = (
    "id, app_version, endpoint_token, command_type, payload, state, status_code, reason_phrase, "
    "result_payload, created_at, updated_at, expires_at, log, request_name, ephemeral, idempotency_key, rerun_of, "
    "invoked_by, sent_at, delivered_at, device_seen"
)
INSERT = (
    "INSERT INTO commands (app_version, endpoint_token, command_type, payload, state, created_at, "
    "updated_at, expires_at, request_name, ephemeral, idempotency_key, rerun_of, invoked_by, device_seen, "
    "announced) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)"
)
FIND_IDEMPOTENT = (
    f"SELECT {COLUMNS} FROM commands WHERE app_version = ? AND endpoint_token = ? AND idempotency_key = ?"
)
DEVICE_COLUMNS = "device_id, app_version, endpoint_token, labels, manifest, created_at, updated_at"
INSERT_DEVICE = f"INSERT INTO devices ({DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
# Written only by MARK_SEEN and MARK_PRESENCE, never by an edit.
DEVICE_SELECT = DEVICE_COLUMNS + ", last_seen_at, connected, connected_at, disconnected_at"
# A time never goes back (several instances, or a flush that was retried, write in any order).
MARK_SEEN = (
    "UPDATE devices SET last_seen_at = ? WHERE app_version = ? AND endpoint_token = ? "
    "AND (last_seen_at IS NULL OR last_seen_at < ?)"
)
MARK_SENT = "UPDATE commands SET sent_at = ? WHERE id = ? AND sent_at IS NULL"
MARK_DELIVERED = (
    "UPDATE commands SET delivered_at = ?, sent_at = coalesce(sent_at, ?) WHERE id = ? AND delivered_at IS NULL"
)
# Presence only moves forward in time: a change older than the last one recorded is stale.
MARK_PRESENCE = (
    "UPDATE devices SET connected = ?, connected_at = CASE WHEN ? THEN ? ELSE connected_at END, "
    "disconnected_at = CASE WHEN ? THEN disconnected_at ELSE ? END "
    "WHERE app_version = ? AND endpoint_token = ? AND max(coalesce(connected_at, 0), coalesce(disconnected_at, 0)) < ?"
)
DISCONNECT_ALL = "UPDATE devices SET connected = 0, disconnected_at = ? WHERE connected = 1"
UPDATE_DEVICE = (
    "UPDATE devices SET app_version = ?, endpoint_token = ?, labels = ?, manifest = ?, created_at = ?, "
    "updated_at = ? WHERE device_id = ?"
)
# sentAt and deliveredAt are set once, by whoever proves them first (a push's PUBACK may have
# committed one since the row was read): coalesce, never overwrite.
UPDATE = (
    "UPDATE commands SET state = ?, status_code = ?, reason_phrase = ?, result_payload = ?, updated_at = ?, log = ?, "
    "sent_at = coalesce(sent_at, ?), delivered_at = coalesce(delivered_at, ?), "
    "announced = 0 WHERE id = ? AND state = ? AND updated_at = ?"
)
MARK_ANNOUNCED = "UPDATE commands SET announced = 1 WHERE id = ? AND updated_at = ?"
UNANNOUNCED = f"SELECT {COLUMNS} FROM commands WHERE announced = 0 AND id > ? ORDER BY id LIMIT ?"
TARGET_WHERE = "app_version = ? AND endpoint_token = ? AND command_type = ?"
OUTSTANDING = (  # the last parameter is the delivery window (SQLite: -1, PostgreSQL: NULL for none)
    f"SELECT {COLUMNS} FROM commands WHERE {TARGET_WHERE} "
    "AND state IN ('pending', 'in_progress') AND expires_at > ? ORDER BY id LIMIT ?"
)
OPEN_TARGETS = (
    "SELECT DISTINCT app_version, endpoint_token, command_type FROM commands "
    "WHERE state IN ('pending', 'in_progress') AND expires_at > ?"
)
OPEN_COUNT = (
    "SELECT count(*) FROM commands WHERE app_version = ? AND endpoint_token = ? AND state IN ('pending', 'in_progress')"
)
SELECT_OBSERVER = (
    "SELECT observe, format, CASE WHEN retained = 1 THEN coalesce(retained_format, format) END "
    f"FROM observers WHERE {TARGET_WHERE}"
)
# A retained list stays recorded under the format it was published in when the device switches.
UPSERT_OBSERVER = (
    "INSERT INTO observers (app_version, endpoint_token, command_type, observe, format) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT DO UPDATE SET observe = excluded.observe, format = excluded.format, "
    "retained_format = CASE WHEN retained = 1 THEN coalesce(retained_format, format) END"
)
MARK_RETAINED = (
    "INSERT INTO observers (app_version, endpoint_token, command_type, retained, retained_format) "
    "VALUES (?, ?, ?, 1, ?) ON CONFLICT DO UPDATE SET retained = 1, retained_format = excluded.retained_format"
)
# An invoke's mark without reading the list: only for a device that observes and is not marked yet
# (a new observer row is the defaults: observing, plain JSON).
MARK_RETAINED_IF_OBSERVED = (
    "INSERT INTO observers (app_version, endpoint_token, command_type, retained, retained_format) "
    "VALUES (?, ?, ?, 1, '') ON CONFLICT (app_version, endpoint_token, command_type) DO UPDATE "
    "SET retained = 1, retained_format = observers.format WHERE observers.observe = 1 AND observers.retained = 0"
)
# The open commands by state and type (read through the commands_open partial index).
OPEN_SUMMARY = (
    "SELECT state, command_type, count(*), min(created_at) FROM commands "
    "WHERE state IN ('pending', 'in_progress') GROUP BY state, command_type"
)
# Cleared only while the target has no open command (an invoke committed since the list was found
# empty has marked it again, in its own transaction, and its push may be retained by now) or while
# the device does not observe (then the list was deleted, and no invoke marks it).
CLEAR_RETAINED = (
    f"UPDATE observers SET retained = 0, retained_format = NULL WHERE {TARGET_WHERE} AND (observe = 0 OR "
    f"NOT EXISTS (SELECT 1 FROM commands WHERE {TARGET_WHERE} AND state IN ('pending', 'in_progress')))"
)
RETAINED_TARGETS = "SELECT app_version, endpoint_token, command_type FROM observers WHERE retained = 1"


def to_us(moment: datetime) -> int:
    """Microseconds since the epoch: exact, sortable, and the same in every store."""
    delta = moment.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _maybe_us(moment: datetime | None) -> int | None:
    return None if moment is None else to_us(moment)


def from_us(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)  # twice as fast as fromtimestamp().replace()


def load(text: str) -> Any:
    """JSON text to a value; the common constants skip the parser (sweeps decode many rows)."""
    if text == "null":
        return None
    if text == "[]":
        return []
    return json.loads(text)


def dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def target_params(target: Target) -> tuple[str, str, str]:
    return (target.app_version, target.endpoint_token, target.command_type)


def insert_params(new: NewCommand) -> tuple[Any, ...]:
    created = to_us(new.created_at)
    return (
        *target_params(new.target),
        dump(new.payload),
        created,
        created,
        to_us(new.expires_at),
        new.request_name,
        int(new.ephemeral),
        new.idempotency_key,
        new.rerun_of,
        new.invoked_by,
        int(new.device_seen),
    )


def _log_params(log: tuple[Report, ...]) -> str:
    return dump([[r.status_code, r.reason_phrase, r.payload, to_us(r.received_at)] for r in log])


def update_params(before: Command, after: Command) -> tuple[Any, ...]:
    return (
        after.state.value,
        after.status_code,
        after.reason_phrase,
        dump(after.result_payload),
        to_us(after.updated_at),
        _log_params(after.log),
        _maybe_us(after.sent_at),
        _maybe_us(after.delivered_at),
        before.id,
        before.state.value,
        to_us(before.updated_at),
    )


def observer_params(target: Target, observe: bool, fmt: Format) -> tuple[Any, ...]:
    return (*target_params(target), int(observe), fmt.value)


def _to_report(entry: list[Any]) -> Report:
    status_code, reason_phrase, payload, received_us = entry
    return Report(
        status_code=status_code, reason_phrase=reason_phrase, payload=payload, received_at=from_us(received_us)
    )


def to_target(row: Any) -> Target:
    return Target(app_version=row[0], endpoint_token=row[1], command_type=row[2])


def to_command(row: Any) -> Command:
    return Command(
        id=row[0],
        target=to_target(row[1:4]),
        payload=load(row[4]),
        state=CommandState(row[5]),
        status_code=row[6],
        reason_phrase=row[7],
        result_payload=load(row[8]),
        created_at=from_us(row[9]),
        updated_at=from_us(row[10]),
        expires_at=from_us(row[11]),
        log=tuple(_to_report(e) for e in load(row[12])),
        request_name=row[13],
        ephemeral=bool(row[14]),
        idempotency_key=row[15],
        rerun_of=row[16],
        invoked_by=row[17],
        sent_at=None if row[18] is None else from_us(row[18]),
        delivered_at=None if row[19] is None else from_us(row[19]),
        device_seen=bool(row[20]),
    )


def device_params(device: Device) -> tuple[Any, ...]:
    manifest = None if device.manifest is None else device.manifest.model_dump_json(exclude_defaults=True)
    return (
        device.device_id,
        device.app_version,
        device.endpoint_token,
        dump(device.labels),
        manifest,
        to_us(device.created_at),
        to_us(device.updated_at),
    )


def to_device(row: Any) -> Device:
    return Device(
        device_id=row[0],
        app_version=row[1],
        endpoint_token=row[2],
        labels=json.loads(row[3]),
        manifest=None if row[4] is None else Manifest.model_validate_json(row[4]),
        created_at=from_us(row[5]),
        updated_at=from_us(row[6]),
        last_seen_at=None if row[7] is None else from_us(row[7]),
        connected=None if row[8] is None else bool(row[8]),
        connected_at=None if row[9] is None else from_us(row[9]),
        disconnected_at=None if row[10] is None else from_us(row[10]),
    )


def presence_params(av: str, token: str, connected: bool, at: datetime) -> tuple[Any, ...]:
    us = to_us(at)
    return (int(connected), int(connected), us, int(connected), us, av, token, us)


def labels_where(
    labels: Mapping[str, str] | None, connected: bool | None = None
) -> tuple[str, tuple[Any, ...]]:
    """The WHERE clause of a device listing that must carry every one of these labels (any key:
    matched through json_each, not a JSON path that a key's own quotes or dots could break), and
    with ``connected``, be known (not) to be connected."""
    each = "EXISTS (SELECT 1 FROM json_each(devices.labels) WHERE key = ? AND value = ?)"
    tests = [each] * len(labels or {}) + connected_test(connected)
    params = tuple(x for kv in (labels or {}).items() for x in kv)
    return ("WHERE " + " AND ".join(tests) if tests else ""), params


def connected_test(connected: bool | None) -> list[str]:
    """The presence filter as SQL (a literal: no parameter to number)."""
    return [] if connected is None else [f"connected = {int(connected)}"]


def to_summary(found: Any) -> OpenSummary:
    counts = {(str(r[0]), str(r[1])): int(r[2]) for r in found}
    pending = [int(r[3]) for r in found if r[0] == CommandState.PENDING.value]
    return OpenSummary(counts=counts, oldest_pending=from_us(min(pending)) if pending else None)


def where(query: CommandQuery) -> tuple[str, tuple[Any, ...]]:
    """The WHERE clause of a history query."""
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (
        ("app_version", query.app_version),
        ("endpoint_token", query.endpoint_token),
        ("command_type", query.command_type),
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if query.ephemeral is not None:
        clauses.append("ephemeral = ?")
        params.append(int(query.ephemeral))
    if query.states:
        clauses.append(f"state IN ({', '.join('?' * len(query.states))})")
        params.extend(sorted(s.value for s in query.states))
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)
