"""A KP1 device simulator: receives commands over MQTT and answers them like firmware would.

It subscribes to its push topics, polls with ``{"observe": true}`` on every (re)connect, executes
each command id once, and reports results with request IDs, resending any result whose reply it
has not seen after a reconnect.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiomqtt

from broker_bridge import protocol
from broker_bridge.bridge import client_options
from broker_bridge.config import BrokerAddress
from broker_bridge.errors import BridgeError
from broker_bridge.topics import Format, Resource, Target, TopicScheme, parse_positive_int

RESEND_S = 3.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """How the simulated device answers one command type."""

    status_code: int = 200
    delay_s: float = 0.0
    progress: bool = False  # send a 102 progress report before the final result


def parse_answer(spec: str) -> tuple[str, Answer]:
    """``TYPE=CODE[:DELAY_S]``, e.g. ``reboot=200`` or ``open-door=409:2.5``."""
    command_type, sep, rest = spec.partition("=")
    code, _, delay = (rest or "200").partition(":")
    if not command_type or (sep and not code.isdigit()):
        raise ValueError(f"expected TYPE=CODE[:DELAY_S], got {spec!r}")
    return command_type, Answer(status_code=int(code), delay_s=float(delay or 0))


@dataclass(slots=True)
class DeviceSimulator:
    """One simulated endpoint."""

    address: BrokerAddress
    app_version: str
    token: str
    answers: dict[str, Answer]
    scheme: TopicScheme = field(default_factory=TopicScheme)
    fmt: Format = Format.PLAIN
    progress: bool = False
    exit_after: int | None = None
    out: TextIO = sys.stdout
    executed: dict[int, int] = field(default_factory=dict)  # command id -> status code reported
    _seen: set[int] = field(default_factory=set)
    _unconfirmed: dict[str, bytes] = field(default_factory=dict)  # result topic -> body
    _request_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _done: asyncio.Event = field(default_factory=asyncio.Event)

    def _target(self, command_type: str) -> Target:
        return Target(app_version=self.app_version, endpoint_token=self.token, command_type=command_type)

    def say(self, **fields: Any) -> None:
        print(json.dumps(fields), file=self.out, flush=True)

    async def run(self) -> None:
        """Run until ``exit_after`` commands are confirmed executed (forever if None)."""
        runner = asyncio.create_task(self._connect_forever())
        await self._done.wait()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)

    async def _connect_forever(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(**client_options(self.address, None), keepalive=10) as client:
                    await self._session(client)
            except* aiomqtt.MqttError as group:  # also raised from inside the session's TaskGroup
                self.say(event="disconnected", error=str(group.exceptions[0]))
            await asyncio.sleep(0.5)

    async def _session(self, client: aiomqtt.Client) -> None:
        base = self.scheme.endpoint_base(self.app_version, self.token)
        await client.subscribe(f"{base}/{Resource.COMMAND.value}/#", qos=1)
        await client.subscribe(f"{base}/{Resource.RESULT.value}/#", qos=1)
        for command_type in self.answers:
            poll = self.scheme.device_topic(Resource.COMMAND, self._target(command_type), self.fmt)
            body = protocol.encode({"observe": True}, self.fmt.codec)
            await client.publish(f"{poll}/{next(self._request_ids)}", body, qos=1)
        for topic, body in list(self._unconfirmed.items()):
            await client.publish(topic, body, qos=1)  # results whose reply we never saw
        self.say(event="connected", appVersion=self.app_version, token=self.token, types=sorted(self.answers))
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._resend_unconfirmed(client))
            async for message in client.messages:
                self._on_message(client, tasks, message.topic.value, _bytes(message.payload))

    async def _resend_unconfirmed(self, client: aiomqtt.Client) -> None:
        """Firmware retries a result until it hears back: the service may have died in between."""
        while True:
            await asyncio.sleep(RESEND_S)
            for topic, body in list(self._unconfirmed.items()):
                await client.publish(topic, body, qos=1)

    def _on_message(self, client: aiomqtt.Client, tasks: asyncio.TaskGroup, topic: str, payload: bytes) -> None:
        levels = topic.split("/")
        if levels[-1] not in ("status", "error"):
            return
        resource, command_type = levels[4], levels[5]
        if resource == Resource.RESULT.value:
            self._on_result_reply(topic, levels, payload)
        elif command_type in self.answers and levels[-1] == "status":
            for item in self._command_list(payload):
                if item["id"] not in self._seen:
                    self._seen.add(item["id"])
                    tasks.create_task(self._execute(client, command_type, item))

    def _command_list(self, payload: bytes) -> list[dict[str, Any]]:
        try:
            items = protocol.decode(payload, self.fmt.codec) if payload else []
        except BridgeError as exc:
            self.say(event="bad_command_list", reason=exc.reason)
            return []
        if not isinstance(items, list):
            return []
        return [i for i in items if isinstance(i, dict) and isinstance(i.get("id"), int)]

    async def _execute(self, client: aiomqtt.Client, command_type: str, item: dict[str, Any]) -> None:
        answer = self.answers[command_type]
        self.say(event="command", type=command_type, id=item["id"], payload=item.get("payload"))
        result_topic = self.scheme.device_topic(Resource.RESULT, self._target(command_type), self.fmt)
        if self.progress or answer.progress:
            await self._report(client, result_topic, item["id"], 102, "Processing")
        await asyncio.sleep(answer.delay_s)
        reason = "OK" if answer.status_code < 300 else "Failed"
        await self._report(client, result_topic, item["id"], answer.status_code, reason)

    async def _report(self, client: aiomqtt.Client, result_topic: str, command_id: int, code: int, reason: str) -> None:
        topic = f"{result_topic}/{next(self._request_ids)}"
        result = {"id": command_id, "statusCode": code, "reasonPhrase": reason, "payload": reason}
        body = protocol.encode([result], self.fmt.codec)
        if code >= 200:
            self._unconfirmed[topic] = body
            self.executed[command_id] = code
        await client.publish(topic, body, qos=1)

    def _on_result_reply(self, topic: str, levels: list[str], payload: bytes) -> None:
        request_topic = "/".join(levels[:-1])
        if request_topic not in self._unconfirmed or parse_positive_int(levels[-2]) is None:
            return
        try:
            reply = protocol.decode(payload, self.fmt.codec) if payload else {}
        except BridgeError as exc:
            reply = {"undecodable": exc.reason}
        code = reply.get("statusCode") if isinstance(reply, dict) else None
        if isinstance(code, int) and code >= 500:  # the service could not store it (503): send it again
            self.say(event="result_retry", topic=request_topic, reply=reply)
            return
        del self._unconfirmed[request_topic]
        self.say(event="result_confirmed", topic=request_topic, reply=reply)
        confirmed = len(self.executed) - len(self._unconfirmed)
        if self.exit_after is not None and confirmed >= self.exit_after:
            self._done.set()


def _bytes(payload: Any) -> bytes:
    return payload if isinstance(payload, bytes) else str(payload or "").encode()
