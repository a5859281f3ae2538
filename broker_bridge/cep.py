"""KP1 Command Execution requests, whatever carried them: the MQTT bridge and the HTTP binding both
decode a body, call the service, and get back the reply body. Only the transport differs."""

from __future__ import annotations

from typing import Any

from broker_bridge import protocol
from broker_bridge.commands import Command, delivery_item
from broker_bridge.service import CommandService
from broker_bridge.store import ReportOutcome
from broker_bridge.topics import Format, Target


async def poll(service: CommandService, target: Target, fmt: Format, body: bytes) -> list[dict[str, Any]]:
    """The outstanding-command array a poll is answered with (in the delivery window; the HTTP
    binding has no message size limit)."""
    return [delivery_item(c) for c in await poll_commands(service, target, fmt, body)]


async def poll_commands(service: CommandService, target: Target, fmt: Format, body: bytes) -> tuple[Command, ...]:
    """The commands a poll hands out, for a transport that encodes them itself (MQTT: bounded)."""
    request = protocol.parse_poll(body, fmt.codec)
    return await service.poll(target, request.observe, fmt)


async def results(service: CommandService, target: Target, fmt: Format, body: bytes) -> dict[str, Any]:
    """Apply a result body; the KP1 reply body (an error body if any result was refused)."""
    outcomes = await service.report(target, protocol.parse_results(body, fmt.codec))
    refused = [o for o in outcomes if o.error is not None]
    if not refused:
        return protocol.ok_body()
    return protocol.error_body(_worst(refused), "; ".join(o.error.reason for o in refused if o.error))


def _worst(refused: list[ReportOutcome]) -> int:
    return max(o.error.status_code for o in refused if o.error is not None)
