"""Issue 13 on a running service: presence (embedded broker sessions; an external broker's presence
topic), sentAt/deliveredAt, deviceSeen and invokedBy on every path."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import MosquittoProcess, free_port
from tests.harness import WAIT_S, make_settings, probe, running_service

KEY = "secret-of-the-ops-team"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAMED_KEYS = [{"name": "ops-team", "key": KEY}]
TOKEN = "lamp1"
DEVICE = "lamp-1"


class Env:
    def __init__(self, settings: Any, mqtt_port: int, http: httpx.AsyncClient, av: str) -> None:
        self.settings, self.mqtt_port, self.http, self.av = settings, mqtt_port, http, av

    def topic(self, rest: str, token: str = TOKEN) -> str:
        return f"kp1/{self.av}/cex/{token}/{rest}"

    async def device(self, device_id: str = DEVICE) -> dict[str, Any]:
        response = await self.http.get(f"/v3/devices/{device_id}")
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()["device"]
        return found

    async def execution(self, execution_id: str, device_id: str = DEVICE) -> dict[str, Any]:
        response = await self.http.get(f"/v3/devices/{device_id}/command_executions/{execution_id}")
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()["execution"]
        return found

    async def invoke(self, device_id: str = DEVICE, name: str = "reboot") -> str:
        body = {"name": name, "arguments": {"n": 1}}
        response = await self.http.post(f"/v3/devices/{device_id}/command_executions", json=body)
        assert response.status_code == 200, response.text
        execution_id: str = response.json()["execution_id"]
        return execution_id

    async def register(self, device_id: str = DEVICE, token: str = TOKEN) -> None:
        body = {"id": device_id, "app_version": self.av, "endpoint_token": token}
        assert (await self.http.post("/v3/devices", json=body)).status_code == 201


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, av: str, **overrides: Any) -> AsyncIterator[Env]:
    port = free_port()
    settings = make_settings(tmp_path, port, api_keys=NAMED_KEYS, sweep_interval_s=0.1, **overrides)
    async with running_service(settings):
        base = f"http://{settings.http_listen}"
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=WAIT_S) as http:
            yield Env(settings, port, http, av)


@pytest.fixture
async def env(tmp_path: Path, app_version: str) -> AsyncIterator[Env]:
    async with serving(tmp_path, app_version) as running:
        yield running


async def eventually(read: Callable[[], Awaitable[Any]], wanted: Callable[[Any], bool], what: str) -> Any:
    """Read until ``wanted`` holds (the once-a-second flushes write some of these), or fail."""
    found = None
    for _ in range(int(WAIT_S / 0.05)):
        found = await read()
        if wanted(found):
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: still {found!r}")


# -- presence on the embedded broker ------------------------------------------------------------
async def test_embedded_presence_follows_the_device_session(env: Env) -> None:
    """A device is unknown until it connects, connected (with connectedAt) while a session speaks
    for it, disconnected when the session ends; each change is an event; listings filter by it."""
    await env.register()
    await env.register("other", "other-token")
    assert (await env.device())["connected"] is None
    async with probe(env.mqtt_port, f"cex/events/presence/{env.av}/#") as monitor:
        async with probe(env.mqtt_port, env.topic("command/reboot/status")):
            up = await monitor.wait_topic(f"cex/events/presence/{env.av}/{TOKEN}")
            assert (up.json()["connected"], up.json()["endpointToken"]) == (True, TOKEN)
            device = await env.device()
            assert (device["connected"], device["disconnected_at"]) == (True, None)
            assert device["connected_at"] == up.json()["at"]
            listed = (await env.http.get("/v3/devices", params={"connected": "true"})).json()
            assert ([d["id"] for d in listed["devices"]], listed["total_count"]) == ([DEVICE], 1)
        down = await monitor.wait_for(lambda s: s.json()["connected"] is False)
        assert down.topic == f"cex/events/presence/{env.av}/{TOKEN}"
    device = await env.device()
    assert (device["connected"], device["disconnected_at"]) == (False, down.json()["at"])
    assert device["connected_at"] == up.json()["at"] < down.json()["at"]
    listed = (await env.http.get("/v3/devices", params={"connected": "false"})).json()
    assert [d["id"] for d in listed["devices"]] == [DEVICE]  # "other" never connected: unknown, not false
    metrics = await eventually(
        lambda: env.http.get("/metrics"), lambda r: "broker_bridge_devices_connected 0.0" in r.text, "gauge"
    )
    assert metrics.status_code == 200


async def test_a_device_that_never_subscribes_is_present_while_connected(env: Env) -> None:
    """A Kaa device that only publishes (polls, results) is connected from its first publish."""
    await env.register()
    async with probe(env.mqtt_port) as device:
        await device.publish(env.topic("command/reboot"), {})
        found = await eventually(env.device, lambda d: d["connected"] is True, "connected")
        assert found["connected_at"] is not None
        gauge = await eventually(
            lambda: env.http.get("/metrics"), lambda r: "broker_bridge_devices_connected 1.0" in r.text, "gauge"
        )
        assert gauge.status_code == 200
    await eventually(env.device, lambda d: d["connected"] is False, "disconnected")


# -- delivery -----------------------------------------------------------------------------------
async def test_http_poll_and_mqtt_report_prove_delivery(env: Env) -> None:
    """An HTTP poll's response delivers (sentAt = deliveredAt); over MQTT a progress report proves
    receipt, and the final result keeps that first proof."""
    await env.register()
    polled = await env.invoke()
    assert (await env.execution(polled))["sent_at"] is None
    response = await env.http.post(f"/kp1/{env.av}/cex/{TOKEN}/command/reboot", json={})
    assert [item["id"] for item in response.json()] == [int(polled)]
    found = await eventually(lambda: env.execution(polled), lambda e: e["delivered_at"] is not None, "delivered")
    assert found["sent_at"] == found["delivered_at"]
    await env.http.post(f"/kp1/{env.av}/cex/{TOKEN}/result/reboot", json=[{"id": int(polled), "statusCode": 200}])
    assert (await env.execution(polled))["delivered_at"] == found["delivered_at"]

    reported = await env.invoke()
    async with probe(env.mqtt_port) as device:
        await device.request(env.topic("result/reboot/1"), [{"id": int(reported), "statusCode": 102}])
        progress = await env.execution(reported)
        assert progress["state"] == "IN_PROGRESS"
        assert progress["delivered_at"] is not None
        await device.request(env.topic("result/reboot/2"), [{"id": int(reported), "statusCode": 200}])
    final = await env.execution(reported)
    assert (final["state"], final["delivered_at"]) == ("SUCCESS", progress["delivered_at"])


async def test_embedded_push_is_sent_and_delivered_by_the_devices_puback(env: Env) -> None:
    """A push handed to the device's own session sets sentAt, its PUBACK deliveredAt; a monitor
    watching every device's pushes proves nothing; a poll reply to a device that never subscribed
    is delivered the same way."""
    await env.register()
    async with probe(env.mqtt_port, f"kp1/{env.av}/cex/+/command/#"):
        watched = await env.invoke()
        await asyncio.sleep(1.5)  # past a flush: nothing was written for the monitor
        assert (await env.execution(watched))["sent_at"] is None
    async with probe(env.mqtt_port, env.topic("command/reboot/status")) as device:
        await device.wait_topic(env.topic("command/reboot/status"))  # the reconnect push: both commands
        pushed = await env.invoke()
        for execution_id in (watched, pushed):
            found = await eventually(
                lambda e=execution_id: env.execution(e), lambda e: e["delivered_at"] is not None, "delivered"
            )
            assert found["sent_at"] is not None
            assert found["sent_at"] <= found["delivered_at"]
    await env.register("kaa", "kaa-token")
    polled = await env.invoke("kaa")
    async with probe(env.mqtt_port) as kaa_device:  # never subscribes: the reply comes to it anyway
        await kaa_device.publish(env.topic("command/reboot/5", token="kaa-token"), {})
        found = await eventually(
            lambda: env.execution(polled, "kaa"), lambda e: e["delivered_at"] is not None, "delivered"
        )
        assert found["sent_at"] <= found["delivered_at"]


# -- deviceSeen and invokedBy ---------------------------------------------------------------------
async def test_device_seen_warns_of_an_endpoint_never_heard_from(env: Env) -> None:
    """Invoking for a token nobody ever used still works (Kaa allows it) but says so in the reply,
    the record and the CLI; once the device has spoken, commands for it are deviceSeen."""
    await env.register()
    first = await env.execution(await env.invoke())
    assert first["device_seen"] is False
    kaa = await env.http.post(f"/api/v1/endpoints/{DEVICE}/commands/reboot", json={"n": 2})
    assert kaa.json()["deviceSeen"] is False
    await env.http.post(f"/kp1/{env.av}/cex/{TOKEN}/command/reboot", json={})
    assert (await env.execution(await env.invoke()))["device_seen"] is True
    async with probe(env.mqtt_port) as admin:
        reply = await admin.request(f"cex/admin/{env.av}/typo-token/invoke/reboot/1", {"payload": None})
    assert (reply.json()["deviceSeen"], reply.json()["endpointToken"]) == (False, "typo-token")


async def test_invoked_by_on_http_console_keys_and_mqtt(env: Env) -> None:
    """v3 and Kaa REST record the API key's name; MQTT without logins records "mqtt"; a plain
    (unnamed) key is named after its fingerprint."""
    await env.register()
    assert (await env.execution(await env.invoke()))["invoked_by"] == "ops-team"
    kaa = await env.http.post(f"/api/v1/endpoints/{DEVICE}/commands/reboot", json={"n": 2})
    assert kaa.json()["invokedBy"] == "ops-team"
    async with probe(env.mqtt_port) as admin:
        reply = await admin.request(f"cex/admin/{env.av}/{TOKEN}/invoke/reboot/1", {"payload": None})
    assert reply.json()["invokedBy"] == "mqtt"


def test_invoked_by_on_the_cli(tmp_path: Path, app_version: str) -> None:
    """The CLI records cli:<os user>, and warns on stderr about an endpoint never heard from."""
    db = tmp_path / "cli.db"
    run = subprocess.run(
        [
            *(sys.executable, "-m", "broker_bridge.cli", "invoke", app_version, "nobody", "reboot", "--json"),
            *("--db", str(db), "--mqtt-listen", f"127.0.0.1:{free_port()}"),  # no broker there: stored all the same
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["invokedBy"].startswith("cli:")
    assert len(record["invokedBy"]) > len("cli:")
    assert record["deviceSeen"] is False
    assert "has never been heard from" in run.stderr


# -- an external broker: the devices' own presence topic --------------------------------------------
@pytest.mark.mosquitto
async def test_external_presence_from_birth_and_last_will(
    tmp_path: Path, app_version: str, mosquitto: MosquittoProcess
) -> None:
    """On Mosquitto the bridge knows presence only from the device: its birth message and its Last
    Will on kp1/{av}/cex/{token}/presence; a device that sends none stays unknown. A declared
    ``invoked-by`` user property (MQTT 5) names the admin."""
    async with serving(tmp_path, app_version, broker_url=mosquitto.url) as env:
        await env.register()
        await env.register("silent", "silent-token")
        presence = env.topic("presence")
        will = aiomqtt.Will(presence, json.dumps({"connected": False}), qos=1)
        async with probe(mosquitto.port, f"cex/events/presence/{app_version}/#") as monitor:
            device = aiomqtt.Client("127.0.0.1", mosquitto.port, identifier=f"{TOKEN}-dev", will=will)
            await device.__aenter__()
            await device.publish(presence, json.dumps({"connected": True}), qos=1)
            up = await monitor.wait_for(lambda s: s.json()["connected"] is True)
            assert (await env.device())["connected"] is True
            # An abrupt end (no DISCONNECT): the broker publishes the Last Will.
            device._client._sock.close()
            with contextlib.suppress(Exception):
                await device.__aexit__(None, None, None)
            down = await monitor.wait_for(lambda s: s.json()["connected"] is False)
            assert down.json()["at"] > up.json()["at"]
        assert (await env.device())["connected"] is False
        assert (await env.device("silent"))["connected"] is None

        # A push on an external broker proves nothing (nobody says who got it); a poll's reply is
        # handed to the device that asked.
        pushed = await env.invoke()
        async with probe(mosquitto.port, env.topic("command/reboot/status")) as subscriber:
            await subscriber.wait_topic(env.topic("command/reboot/status"))
            await asyncio.sleep(1.5)  # past a flush
            assert (await env.execution(pushed))["sent_at"] is None
            await subscriber.request(env.topic("command/reboot/9"), {})
        found = await eventually(lambda: env.execution(pushed), lambda e: e["sent_at"] is not None, "sent")
        assert found["delivered_at"] is None

        properties = Properties(PacketTypes.PUBLISH)
        properties.UserProperty = [("invoked-by", "night-shift")]
        async with aiomqtt.Client(
            "127.0.0.1", mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5, identifier=f"admin-{app_version}"
        ) as admin:
            topic = f"cex/admin/{app_version}/{TOKEN}/invoke/reboot/7"
            await admin.subscribe(f"{topic}/+", qos=1)
            await admin.publish(topic, b'{"payload": null}', qos=1, properties=properties)
            async for message in admin.messages:
                assert isinstance(message.payload, bytes)
                assert json.loads(message.payload)["invokedBy"] == "mqtt:night-shift"
                break
