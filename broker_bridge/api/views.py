"""How commands and devices look on the HTTP APIs (Enapter v3 and Kaa REST). Pure mapping functions.

Enapter execution states from our command states and status codes:

    pending -> NEW        in_progress -> IN_PROGRESS     expired -> TIMEOUT
    executed with 2xx -> SUCCESS     executed with 3xx/4xx/5xx -> ERROR     cancelled -> ERROR

Each report in the command's log is a response: 100 -> STARTED, other 1xx -> IN_PROGRESS,
2xx -> SUCCEEDED, 3xx/4xx/5xx -> ERROR.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from broker_bridge.commands import Command, CommandState, Report, rfc3339
from broker_bridge.devices import Device

_STATES = {
    CommandState.PENDING: "NEW",
    CommandState.IN_PROGRESS: "IN_PROGRESS",
    CommandState.EXPIRED: "TIMEOUT",
    CommandState.CANCELLED: "ERROR",
}


def execution_state(command: Command) -> str:
    if command.state is CommandState.EXECUTED:
        return "SUCCESS" if 200 <= (command.status_code or 0) < 300 else "ERROR"
    return _STATES[command.state]


def response_state(report: Report) -> str:
    if report.status_code == 100:
        return "STARTED"
    if report.status_code < 200:
        return "IN_PROGRESS"
    return "SUCCEEDED" if report.status_code < 300 else "ERROR"


def response(report: Report) -> dict[str, Any]:
    body: dict[str, Any] = {"state": response_state(report), "received_at": rfc3339(report.received_at)}
    if report.payload is not None:
        body["payload"] = report.payload
    return body


def execution(command: Command, *, with_log: bool = False) -> dict[str, Any]:
    """An Enapter command execution: the request, the latest response, the log newest first."""
    body: dict[str, Any] = {
        "id": str(command.id),
        "state": execution_state(command),
        "created_at": rfc3339(command.created_at),
        "request": {
            "name": command.request_name or command.target.command_type,
            "arguments": command.payload if command.payload is not None else {},
            "manifest_name": command.target.command_type,
        },
        "ephemeral": command.ephemeral,
        # Our extensions (Enapter has no such fields): who invoked it, and its delivery.
        "invoked_by": command.invoked_by,
        "device_seen": command.device_seen,
        "sent_at": _time(command.sent_at),
        "delivered_at": _time(command.delivered_at),
    }
    if command.rerun_of is not None:
        body["rerun_of"] = str(command.rerun_of)
    if command.log:
        body["response"] = response(command.log[-1])
    if with_log:
        body["log"] = [response(r) for r in reversed(command.log)]
    return body


_KAA_STATES = {
    CommandState.PENDING: "Pending",
    CommandState.IN_PROGRESS: "Pending",
    CommandState.EXECUTED: "Executed",
    CommandState.EXPIRED: "Expired",
    CommandState.CANCELLED: "Cancelled",
}


def kaa_state(command: Command) -> str:
    """Kaa's name of a command's state (the console shows Kaa's names)."""
    return _KAA_STATES[command.state]


def kaa_command(command: Command, endpoint_id: str) -> dict[str, Any]:
    """A command as Kaa's REST API shows it."""
    result = None
    if command.state is CommandState.EXECUTED:
        result = {
            "statusCode": command.status_code,
            "reasonPhrase": command.reason_phrase,
            "payload": command.result_payload,
        }
    return {
        "id": command.id,
        "endpointId": endpoint_id,
        "commandType": command.target.command_type,
        "payload": command.payload,
        "state": _KAA_STATES[command.state],
        "result": result,
        "createdAt": rfc3339(command.created_at),
        "updatedAt": rfc3339(command.updated_at),
        "expiresAt": rfc3339(command.expires_at),
        "rerunOf": command.rerun_of,
        "invokedBy": command.invoked_by,
        "deviceSeen": command.device_seen,
        "sentAt": _time(command.sent_at),
        "deliveredAt": _time(command.delivered_at),
    }


def device(found: Device) -> dict[str, Any]:
    return {
        "id": found.device_id,
        "app_version": found.app_version,
        "endpoint_token": found.endpoint_token,
        "labels": found.labels,
        "manifest": None if found.manifest is None else found.manifest.model_dump(exclude_none=True),
        "created_at": rfc3339(found.created_at),
        "updated_at": rfc3339(found.updated_at),
        "last_seen_at": _time(found.last_seen_at),
        "connected": found.connected,  # null: the broker does not tell (see topics.md, "Presence")
        "connected_at": _time(found.connected_at),
        "disconnected_at": _time(found.disconnected_at),
    }


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else rfc3339(moment)
