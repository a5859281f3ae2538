"""Test support: run the service in-process, and an MQTT probe that records what it sees."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from broker_bridge import runtime
from broker_bridge.config import Settings, load_settings
from broker_bridge.protocol import decode
from broker_bridge.service import CommandService
from broker_bridge.topics import Codec
from tests.conftest import free_port

WAIT_S = 10.0  # generous: a failing test fails by timeout, a passing one never waits this long


@dataclass(frozen=True, slots=True)
class Seen:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)

    def decoded(self, codec: Codec) -> Any:
        return decode(self.payload, codec)


def make_settings(tmp_path: Path, port: int, broker_url: str | None = None, **overrides: Any) -> Settings:
    return load_settings(
        db=tmp_path / "bridge.db",
        mqtt_listen=f"127.0.0.1:{port}",
        http_listen=f"127.0.0.1:{free_port()}",
        broker_url=broker_url,
        client_id=f"bridge-{port}",
        **overrides,
    )


@contextlib.asynccontextmanager
async def running_service(settings: Settings) -> AsyncIterator[CommandService]:
    """The whole service (store, broker if embedded, bridge, HTTP, sweepers) in this event loop."""
    started: asyncio.Future[CommandService] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(runtime.serve(settings, started.set_result))
    await asyncio.wait({task, started}, timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert started.done(), "service did not become ready"
    try:
        yield started.result()
    finally:
        await runtime.cancel_firmly(task, grace_s=10)


class Probe:
    """An MQTT client that records every message it receives."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.seen: list[Seen] = []
        self._changed = asyncio.Condition()

    async def subscribe(self, *filters: str) -> None:
        for topic_filter in filters:
            await self.client.subscribe(topic_filter, qos=1)

    async def publish(self, topic: str, payload: bytes | str | dict[str, Any] | list[Any], qos: int = 1) -> None:
        body = json.dumps(payload).encode() if isinstance(payload, dict | list) else payload
        await self.client.publish(topic, body, qos=qos)

    async def _pump(self) -> None:
        async for message in self.client.messages:
            raw = message.payload if isinstance(message.payload, bytes) else str(message.payload or "").encode()
            async with self._changed:
                self.seen.append(Seen(message.topic.value, raw, message.retain))
                self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[Seen], bool], within_s: float = WAIT_S) -> Seen:
        """The first message (already seen or still to come) that matches."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: any(predicate(s) for s in self.seen)), within_s)
            return next(s for s in self.seen if predicate(s))

    async def wait_topic(self, topic: str, within_s: float = WAIT_S) -> Seen:
        return await self.wait_for(lambda s: s.topic == topic, within_s)

    async def request(self, topic: str, payload: bytes | str | dict[str, Any] | list[Any]) -> Seen:
        """Subscribe to the replies, publish, and wait for ``topic/status`` or ``topic/error``."""
        await self.subscribe(f"{topic}/+")
        await self.publish(topic, payload)
        return await self.wait_for(lambda s: s.topic in (f"{topic}/status", f"{topic}/error"))

    def on(self, topic: str) -> list[Seen]:
        return [s for s in self.seen if s.topic == topic]


@contextlib.asynccontextmanager
async def probe(port: int, *filters: str, identifier: str | None = None) -> AsyncIterator[Probe]:
    async with aiomqtt.Client("127.0.0.1", port, identifier=identifier) as client:
        p = Probe(client)
        pump = asyncio.create_task(p._pump())
        await p.subscribe(*filters)
        try:
            yield p
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
