"""bridge.send: the lean publish, against a stand-in for the two aiomqtt internals it uses."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import aiomqtt
import paho.mqtt.client as mqtt
import pytest

from broker_bridge.bridge import send


@dataclass
class Info:
    mid: int
    rc: int = mqtt.MQTT_ERR_SUCCESS
    published: bool = False

    def is_published(self) -> bool:
        return self.published


@dataclass
class Paho:
    rc: int = mqtt.MQTT_ERR_SUCCESS
    sent: list[tuple[str, bytes, int, bool]] = field(default_factory=list)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> Info:
        self.sent.append((topic, payload, qos, retain))
        return Info(mid=len(self.sent), rc=self.rc)


@dataclass
class Client:
    """What aiomqtt.Client offers send(): its paho client, its pending publishes, its timeout."""

    timeout: float = 5.0
    _client: Paho = field(default_factory=Paho)
    _pending_publishes: dict[int, Any] = field(default_factory=dict)

    def acknowledge(self, mid: int) -> None:
        """What aiomqtt's on_publish callback does when the PUBACK arrives."""
        self._pending_publishes.pop(mid).set()


def as_client(fake: Client) -> aiomqtt.Client:
    return cast(aiomqtt.Client, fake)


async def test_resolves_on_the_acknowledgement_and_batches_without_tasks() -> None:
    fake = Client()
    futures = [send(as_client(fake), f"t/{n}", b"x", qos=1) for n in range(3)]
    assert [s[0] for s in fake._client.sent] == ["t/0", "t/1", "t/2"]  # published at once, in order
    assert not any(f.done() for f in futures)
    for mid in (2, 1, 3):
        fake.acknowledge(mid)
    await asyncio.gather(*futures)
    assert fake._pending_publishes == {}


async def test_qos_0_is_done_at_once() -> None:
    fake = Client()
    assert send(as_client(fake), "t", b"x", qos=0).done()
    assert fake._pending_publishes == {}


async def test_times_out_like_aiomqtt_and_forgets_the_message() -> None:
    fake = Client(timeout=0.05)
    with pytest.raises(aiomqtt.MqttError, match="timed out"):
        await send(as_client(fake), "t", b"x", qos=1)
    assert fake._pending_publishes == {}


async def test_a_refused_publish_fails_its_future_at_once() -> None:
    """Never raised from send itself: callers that send from a callback or several at once see it too."""
    fake = Client(_client=Paho(rc=mqtt.MQTT_ERR_NO_CONN))
    refused = send(as_client(fake), "t", b"x", qos=1)
    assert refused.done()
    with pytest.raises(aiomqtt.MqttCodeError):
        await refused
    assert fake._pending_publishes == {}
