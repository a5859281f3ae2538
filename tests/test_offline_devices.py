"""Devices that never subscribe (Kaa's tutorial client) and devices that were offline at invoke time."""

from __future__ import annotations

import asyncio
import json
import queue
import random
import string
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import paho.mqtt.client as mqtt
import pytest

from broker_bridge.commands import CommandState
from broker_bridge.store.sqlite import SqliteStore
from tests.conftest import MosquittoProcess, free_port
from tests.harness import make_settings, probe, running_service

TOKEN = "tutorial-ep"


class TutorialClient:
    """Kaa's "sending commands to device" tutorial client, as published: message callbacks, no SUBSCRIBE."""

    def __init__(self, port: int, app_version: str, token: str = TOKEN) -> None:
        client_id = "".join(random.choice(string.ascii_uppercase + string.digits) for _ in range(6))
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.port = port
        self.data_collection_topic = f"kp1/{app_version}/dcx/{token}/json/32"
        self.received: queue.Queue[tuple[str, list[dict[str, object]]]] = queue.Queue()
        reboot_topic = f"kp1/{app_version}/cex/{token}/command/reboot/status"
        self.client.message_callback_add(reboot_topic, self.handle_reboot_command)
        self.reboot_result_topic = f"kp1/{app_version}/cex/{token}/result/reboot"

    def handle_reboot_command(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        commands = json.loads(message.payload.decode("utf-8"))
        self.received.put((message.topic, commands))
        results = [{"id": c["id"], "statusCode": 200, "reasonPhrase": "OK", "payload": "Success"} for c in commands]
        client.publish(topic=self.reboot_result_topic, payload=json.dumps(results))

    def start(self) -> None:
        self.client.connect("127.0.0.1", self.port, 60)
        self.client.loop_start()
        payload = json.dumps({"timestamp": int(time.time() * 1000), "fuelLevel": 100, "temperature": 97})
        self.client.publish(topic=self.data_collection_topic, payload=payload)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def tutorial_client() -> Iterator[list[TutorialClient]]:
    """Stops every tutorial client a test started."""
    started: list[TutorialClient] = []
    yield started
    for client in started:
        client.stop()


async def _wait_executed(db: Path, command_id: int) -> None:
    async with SqliteStore(db) as store:
        for _ in range(200):
            command = await store.get(command_id)
            if command is not None and command.state is CommandState.EXECUTED:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"command {command_id} was not executed")


async def _received(client: TutorialClient) -> tuple[str, list[dict[str, object]]]:
    return await asyncio.to_thread(client.received.get, timeout=10)


async def test_tutorial_client_without_subscribe_gets_push(
    tmp_path: Path, app_version: str, tutorial_client: list[TutorialClient]
) -> None:
    """Embedded mode: a connected device that never subscribed still receives the push and answers."""
    port = free_port()
    settings = make_settings(tmp_path, port)
    async with running_service(settings), probe(port) as admin:
        device = TutorialClient(port, app_version)
        tutorial_client.append(device)
        device.start()
        await asyncio.sleep(0.3)  # let the data sample arrive; the device is then known and online
        reply = await admin.request(f"cex/admin/{app_version}/{TOKEN}/invoke/reboot/1", {"payload": {"now": True}})
        record = reply.json()
        topic, commands = await _received(device)
        assert topic.endswith("/command/reboot/status")
        assert commands == [{"id": record["id"], "payload": {"now": True}}]
        await _wait_executed(settings.db_path, record["id"])


async def test_offline_device_gets_command_on_next_connection_embedded(
    tmp_path: Path, app_version: str, tutorial_client: list[TutorialClient]
) -> None:
    """Embedded mode: invoked while offline, delivered when the device next connects, without a poll."""
    port = free_port()
    settings = make_settings(tmp_path, port)
    async with running_service(settings), probe(port) as admin:
        reply = await admin.request(f"cex/admin/{app_version}/{TOKEN}/invoke/reboot/1", {"payload": 7})
        record = reply.json()
        device = TutorialClient(port, app_version)
        tutorial_client.append(device)
        device.start()
        _, commands = await _received(device)
        assert commands == [{"id": record["id"], "payload": 7}]
        await _wait_executed(settings.db_path, record["id"])


async def test_offline_device_gets_retained_list_on_mosquitto(
    tmp_path: Path, app_version: str, mosquitto: MosquittoProcess
) -> None:
    """External broker: the outstanding list is retained, so a device that subscribes later gets it."""
    settings = make_settings(tmp_path, mosquitto.port, broker_url=mosquitto.url)
    push_topic = f"kp1/{app_version}/cex/{TOKEN}/command/reboot/status"
    async with running_service(settings), probe(mosquitto.port, push_topic) as watcher:
        reply = await watcher.request(f"cex/admin/{app_version}/{TOKEN}/invoke/reboot/1", {"payload": "x"})
        record = reply.json()
        await watcher.wait_topic(push_topic)  # published while the device was away
        async with probe(mosquitto.port, push_topic) as device:
            pushed = await device.wait_topic(push_topic)
            assert pushed.retain
            assert pushed.json() == [{"id": record["id"], "payload": "x"}]
            result = [{"id": record["id"], "statusCode": 200}]
            await device.request(f"kp1/{app_version}/cex/{TOKEN}/result/reboot/2", result)
            await device.wait_for(lambda s: s.topic == push_topic and s.json() == [])
        async with probe(mosquitto.port, push_topic) as late_device:
            retained = await late_device.wait_topic(push_topic)
            assert retained.json() == []  # nothing stale is handed to a reconnecting device


async def test_retained_list_survives_bridge_restart_on_mosquitto(
    tmp_path: Path, app_version: str, mosquitto: MosquittoProcess
) -> None:
    """After a restart the bridge republishes retained lists, so they match the database."""
    settings = make_settings(tmp_path, mosquitto.port, broker_url=mosquitto.url)
    push_topic = f"kp1/{app_version}/cex/{TOKEN}/command/reboot/status"
    async with running_service(settings), probe(mosquitto.port, push_topic) as watcher:
        reply = await watcher.request(f"cex/admin/{app_version}/{TOKEN}/invoke/reboot/1", {"payload": "x"})
        record = reply.json()
        await watcher.wait_topic(push_topic)  # the list is now retained on the broker
    async with SqliteStore(settings.db_path) as store:  # cancelled while no bridge could announce it
        command = await store.get(record["id"])
        assert command is not None
        await store.cancel(command.id, command.created_at)
    async with running_service(settings), probe(mosquitto.port, push_topic) as device:
        await device.wait_for(lambda s: s.topic == push_topic and s.json() == [])


async def test_a_device_that_switches_to_msgpack_finds_no_stale_list_on_mosquitto(
    tmp_path: Path, app_version: str, mosquitto: MosquittoProcess
) -> None:
    """The list retained on the JSON topic moves to the MessagePack topic when the device polls there:
    a device that comes back on the old topic must not be handed commands it may execute twice."""
    settings = make_settings(tmp_path, mosquitto.port, broker_url=mosquitto.url)
    base = f"kp1/{app_version}/cex/{TOKEN}/command/reboot"
    plain, packed = f"{base}/status", f"{base}/msgpack/status"
    async with running_service(settings), probe(mosquitto.port, plain, packed) as watcher:
        reply = await watcher.request(f"cex/admin/{app_version}/{TOKEN}/invoke/reboot/1", {"payload": "x"})
        record = reply.json()
        await watcher.wait_topic(plain)  # retained on the JSON topic
        async with probe(mosquitto.port) as device:
            polled = await device.request(f"{base}/msgpack/7", msgpack.packb({"observe": True}))
            assert msgpack.unpackb(polled.payload) == [{"id": record["id"], "payload": "x"}]
        await watcher.wait_topic(packed)  # moved: the JSON topic's list was deleted just before
        async with probe(mosquitto.port, packed) as late_packed:
            moved = await late_packed.wait_topic(packed)
            assert moved.retain
            assert msgpack.unpackb(moved.payload) == [{"id": record["id"], "payload": "x"}]
        async with probe(mosquitto.port, plain) as late_plain:
            await late_plain.publish(plain, b"sentinel", qos=1)  # a retained list would arrive before it
            first = await late_plain.wait_topic(plain)
            assert first.payload == b"sentinel", first


async def test_watcher_of_one_reply_topic_gets_only_that_topic(tmp_path: Path, app_version: str) -> None:
    """Embedded mode: mosquitto_sub on a device's reply topic is not handed pushes it did not ask for."""
    port = free_port()
    settings = make_settings(tmp_path, port)
    reply_topic = f"kp1/{app_version}/cex/{TOKEN}/command/reboot/42/status"
    async with running_service(settings), probe(port) as admin:
        await admin.request(f"cex/admin/{app_version}/{TOKEN}/invoke/reboot/1", {"payload": 1})
        async with probe(port, reply_topic) as watcher:
            await admin.publish(f"kp1/{app_version}/cex/{TOKEN}/command/reboot/42", {})
            await watcher.wait_topic(reply_topic)
            await admin.request(f"cex/admin/{app_version}/{TOKEN}/invoke/reboot/2", {"payload": 2})
            await asyncio.sleep(0.3)  # a push to the watcher, if any, would arrive now
        assert {s.topic for s in watcher.seen} == {reply_topic}
