"""The command record, its states and the rules that move it between them. Pure: time is passed in."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from broker_bridge.errors import CommandFinished, PayloadTooLarge
from broker_bridge.topics import Target


class CommandState(StrEnum):
    """Where a command is in its life."""

    PENDING = "pending"  # invoked; no report from the device yet
    IN_PROGRESS = "in_progress"  # the device sent a 1xx progress report
    EXECUTED = "executed"  # the device sent a final (2xx-5xx) result
    EXPIRED = "expired"  # no final result before expires_at
    CANCELLED = "cancelled"  # an operator cancelled it before a final result


OPEN_STATES = frozenset({CommandState.PENDING, CommandState.IN_PROGRESS})
FINAL_STATES = frozenset({CommandState.EXECUTED, CommandState.EXPIRED, CommandState.CANCELLED})

# Every allowed move. Final states have none: nothing resurrects a finished command.
TRANSITIONS: dict[CommandState, frozenset[CommandState]] = {
    CommandState.PENDING: frozenset(
        {CommandState.IN_PROGRESS, CommandState.EXECUTED, CommandState.EXPIRED, CommandState.CANCELLED}
    ),
    CommandState.IN_PROGRESS: frozenset(
        {CommandState.IN_PROGRESS, CommandState.EXECUTED, CommandState.EXPIRED, CommandState.CANCELLED}
    ),
    CommandState.EXECUTED: frozenset(),
    CommandState.EXPIRED: frozenset(),
    CommandState.CANCELLED: frozenset(),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """One progress report or final result from a device, as received."""

    status_code: int
    reason_phrase: str | None
    payload: Any
    received_at: datetime

    @property
    def is_final(self) -> bool:
        return self.status_code >= 200


@dataclass(frozen=True, slots=True, kw_only=True)
class NewCommand:
    """What an invoke asks for; the store assigns the id."""

    target: Target
    payload: Any
    created_at: datetime
    expires_at: datetime
    request_name: str | None = None  # the alias the operator used, when not the command type
    ephemeral: bool = False  # hidden from default listings, deleted a day after creation
    idempotency_key: str | None = None  # a second invoke with this key returns this command
    rerun_of: int | None = None  # the command this one re-runs (same device, type and payload)
    invoked_by: str | None = None  # who asked: an API key's name, an MQTT username, ``cli:<user>``
    device_seen: bool = True  # False: its endpoint had never sent a KP1 message (a mistyped token?)


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """A command and everything that happened to it."""

    id: int
    target: Target
    payload: Any
    state: CommandState
    status_code: int | None
    reason_phrase: str | None
    result_payload: Any
    created_at: datetime
    updated_at: datetime
    expires_at: datetime
    log: tuple[Report, ...] = ()
    request_name: str | None = None
    ephemeral: bool = False
    idempotency_key: str | None = None
    rerun_of: int | None = None
    invoked_by: str | None = None
    device_seen: bool = True
    # First handed to the device (pushed to its live session, returned by a poll); None: not known.
    sent_at: datetime | None = None
    # Proof the device has it: its PUBACK of a push (embedded broker), an HTTP poll's response, a report.
    delivered_at: datetime | None = None

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES

    def is_due(self, now: datetime) -> bool:
        """Open but past its delivery deadline: it must not be delivered any more."""
        return self.is_open and self.expires_at <= now


def create(new: NewCommand, command_id: int) -> Command:
    return Command(
        id=command_id,
        target=new.target,
        payload=new.payload,
        state=CommandState.PENDING,
        status_code=None,
        reason_phrase=None,
        result_payload=None,
        created_at=new.created_at,
        updated_at=new.created_at,
        expires_at=new.expires_at,
        request_name=new.request_name,
        ephemeral=new.ephemeral,
        idempotency_key=new.idempotency_key,
        rerun_of=new.rerun_of,
        invoked_by=new.invoked_by,
        device_seen=new.device_seen,
    )


def _move(command: Command, state: CommandState, now: datetime, **changes: Any) -> Command:
    if state not in TRANSITIONS[command.state]:
        raise CommandFinished(f"command {command.id} is already {command.state.value}")
    return dataclasses.replace(command, state=state, updated_at=now, **changes)


# A command's log is bounded: measured without a bound, 100 progress reports of 100 KB made every
# event of the command 9.7 MB and the database 0.3 -> 39 MB. A progress report past either bound is
# refused (the final result is always taken: the command must be able to finish).
MAX_LOG_ENTRIES = 100
MAX_LOG_BYTES = 1024 * 1024  # the progress payloads of one command, as JSON


def _payload_bytes(payload: Any) -> int:
    return len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())


def check_log_room(command: Command, report: Report) -> None:
    """PayloadTooLarge if a progress report would take the command's log past its bounds."""
    if report.is_final:
        return
    if len(command.log) >= MAX_LOG_ENTRIES:
        raise PayloadTooLarge(
            f"command {command.id} already has {len(command.log)} reports (at most {MAX_LOG_ENTRIES}); "
            "send its final result"
        )
    used = sum(_payload_bytes(r.payload) for r in command.log)
    if used + _payload_bytes(report.payload) > MAX_LOG_BYTES:
        raise PayloadTooLarge(
            f"command {command.id}'s progress payloads would exceed {MAX_LOG_BYTES} bytes; send its final result"
        )


def apply_report(command: Command, report: Report) -> Command:
    """The command after a device report; raises CommandFinished if it can take none, and
    PayloadTooLarge for a progress report its log has no room for."""
    if command.is_due(report.received_at):
        raise CommandFinished(f"command {command.id} expired at {rfc3339(command.expires_at)}")
    if command.is_open:
        check_log_room(command, report)
    log = (*command.log, report)
    # A report proves the device had the command; it was handed to it by then at the latest.
    delivered = command.delivered_at or report.received_at
    sent = command.sent_at or delivered
    if not report.is_final:
        return _move(
            command, CommandState.IN_PROGRESS, report.received_at, log=log, sent_at=sent, delivered_at=delivered
        )
    return _move(
        command,
        CommandState.EXECUTED,
        report.received_at,
        log=log,
        sent_at=sent,
        delivered_at=delivered,
        status_code=report.status_code,
        reason_phrase=report.reason_phrase,
        result_payload=report.payload,
    )


def log_late_report(command: Command, report: Report) -> Command:
    """An expired command keeps a report that came too late, without changing state."""
    delivered = command.delivered_at or report.received_at
    return dataclasses.replace(
        command,
        log=(*command.log, report),
        updated_at=report.received_at,
        sent_at=command.sent_at or delivered,
        delivered_at=delivered,
    )


def expire(command: Command, now: datetime) -> Command:
    return _move(command, CommandState.EXPIRED, now)


def cancel(command: Command, now: datetime) -> Command:
    return _move(command, CommandState.CANCELLED, now)


def expires_at(now: datetime, ttl_s: float) -> datetime:
    return now + timedelta(seconds=ttl_s)


# -- the record: the same JSON everywhere (MQTT replies, events, CLI --json, HTTP) -------------
def rfc3339(moment: datetime) -> str:
    """RFC 3339 UTC with millisecond precision and a ``Z``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def report_record(report: Report) -> dict[str, Any]:
    return {
        "statusCode": report.status_code,
        "reasonPhrase": report.reason_phrase,
        "payload": report.payload,
        "receivedAt": rfc3339(report.received_at),
    }


def to_record(command: Command) -> dict[str, Any]:
    return {
        "id": command.id,
        "appVersion": command.target.app_version,
        "endpointToken": command.target.endpoint_token,
        "commandType": command.target.command_type,
        "payload": command.payload,
        "state": command.state.value,
        "statusCode": command.status_code,
        "reasonPhrase": command.reason_phrase,
        "resultPayload": command.result_payload,
        "createdAt": rfc3339(command.created_at),
        "updatedAt": rfc3339(command.updated_at),
        "expiresAt": rfc3339(command.expires_at),
        "rerunOf": command.rerun_of,
        "invokedBy": command.invoked_by,
        "deviceSeen": command.device_seen,
        "sentAt": None if command.sent_at is None else rfc3339(command.sent_at),
        "deliveredAt": None if command.delivered_at is None else rfc3339(command.delivered_at),
        "log": [report_record(r) for r in command.log],
    }


def delivery_item(command: Command) -> dict[str, Any]:
    """How a device sees an outstanding command."""
    return {"id": command.id, "payload": command.payload}
