"""The seeds' curl flows end to end: HTTP invoke, a device over MQTT or the HTTP binding, HTTP result check."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest

from broker_bridge.config import BrokerAddress, Settings
from broker_bridge.device import Answer, DeviceSimulator
from tests.conftest import free_port
from tests.harness import WAIT_S, make_settings, probe, running_service

KEY = "test-key"
DEVICE_ID = "fecbbba0-79f2-4e9e-a6f0-69a310ab110b"  # the seed's device
TOKEN = "lamp1"
# curl -d/--data-raw label the body as a form; these are the headers curl sends with the seed's commands.
CURL = {"User-Agent": "curl/8.5.0", "Accept": "*/*"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
SEED_AUTH = {"X-Enapter-Auth-Token": KEY}
SEED_KEY_NAME = "seed-operator"
MANIFEST = {
    "commands": {
        "change_lux": {
            "aliases": ["change_color_temperature"],
            "arguments": {"temp_kelvins": {"type": "integer", "required": True, "min": 1000, "max": 20000}},
        }
    }
}
# The seed's request bodies, byte for byte as its curl examples send them.
EXECUTE_BODY = '{\n"name": "change_color_temperature",\n"arguments": {\n"temp_kelvins": 1850\n}\n}'
CREATE_BODY = '{\n"name": "change_color_temperature",\n"arguments": {\n"temp_kelvins": 15000\n},\n"ephemeral": true\n}'
# The Kaa tutorial's result body (its --data-raw), with the id it says to fill in.
TUTORIAL_RESULT = (
    '{\n    "id": <command-ID>,\n    "statusCode": 200,\n    "reasonPhrase": "OK",\n    "payload": "Success"\n}'
)
LAMP_MAX_K = 6500  # the simulated lamp refuses warmer settings, as in the seed's ERROR example


@dataclass(frozen=True, slots=True)
class Env:
    """A running service, a curl-like HTTP client and this test's app version."""

    settings: Settings
    mqtt_port: int
    http: httpx.AsyncClient
    av: str

    def kp1(self, rest: str, token: str = TOKEN) -> str:
        return f"/kp1/{self.av}/cex/{token}/{rest}"

    def topic(self, rest: str, token: str = TOKEN) -> str:
        return f"kp1/{self.av}/cex/{token}/{rest}"

    async def curl(self, method: str, url: str, data: str | None = None, headers: dict[str, str] | None = None) -> Any:
        """What curl sends: its headers, and with -d the body labelled as a form."""
        sent = {**CURL, **(headers or {}), **(FORM if data is not None else {})}
        response = await self.http.request(method, url, content=None if data is None else data.encode(), headers=sent)
        assert response.status_code < 300, response.text
        return response.json()


@pytest.fixture
async def env(tmp_path: Path, app_version: str) -> AsyncIterator[Env]:
    """The service with an API key, and a plain HTTP client."""
    port = free_port()
    settings = make_settings(tmp_path, port, api_keys=[{"name": SEED_KEY_NAME, "key": KEY}], sweep_interval_s=0.1)
    async with running_service(settings), httpx.AsyncClient(base_url=f"http://{settings.http_listen}") as http:
        yield Env(settings, port, http, app_version)


async def register(env: Env, device_id: str, token: str, manifest: dict[str, Any] | None = None) -> None:
    body = {"id": device_id, "app_version": env.av, "endpoint_token": token, "manifest": manifest}
    await env.curl("POST", "/v3/devices", json.dumps(body), SEED_AUTH)


async def run_lamp(env: Env, release: asyncio.Event) -> None:
    """An MQTT lamp: 200 for temperatures it supports; else STARTED, IN_PROGRESS, (release), ERROR."""
    push_topic = env.topic("command/change_lux/status")
    async with aiomqtt.Client("127.0.0.1", env.mqtt_port) as client:
        await client.subscribe(push_topic, qos=1)
        seen: set[int] = set()
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            for item in json.loads(message.payload):
                if item["id"] not in seen:
                    seen.add(item["id"])
                    await _lamp_answer(client, env.topic("result/change_lux"), item, release)


async def _lamp_answer(client: aiomqtt.Client, topic: str, item: dict[str, Any], release: asyncio.Event) -> None:
    async def report(code: int, reason: str, payload: Any = None) -> None:
        result = {"id": item["id"], "statusCode": code, "reasonPhrase": reason, "payload": payload}
        await client.publish(topic, json.dumps([result]), qos=1)

    if item["payload"]["temp_kelvins"] <= LAMP_MAX_K:
        await report(200, "OK")
        return
    await report(100, "Started")
    await report(102, "Processing", {"message": "received"})
    await release.wait()
    await report(400, "Bad Request", {"message": "Temperature value is out of range"})


async def wait_state(env: Env, execution_id: str, state: str) -> dict[str, Any]:
    """The execution once it reaches a state (fails after WAIT_S)."""
    url = f"/v3/devices/{DEVICE_ID}/command_executions/{execution_id}"
    for _ in range(int(WAIT_S / 0.02)):
        execution: dict[str, Any] = (await env.curl("GET", url, headers=SEED_AUTH))["execution"]
        if execution["state"] == state:
            return execution
        await asyncio.sleep(0.02)
    raise AssertionError(f"execution {execution_id} is still {execution['state']}, not {state}")


async def test_enapter_seed_flow_with_an_mqtt_device(env: Env) -> None:
    """The seed's execute, create (ephemeral), get (with log) and list curls against an MQTT lamp."""
    await register(env, DEVICE_ID, TOKEN, MANIFEST)
    release = asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        lamp = tasks.create_task(run_lamp(env, release), name="lamp")
        base = f"/v3/devices/{DEVICE_ID}"
        executed = (await env.curl("POST", f"{base}/execute_command", EXECUTE_BODY, SEED_AUTH))["execution"]
        assert executed["state"] == "SUCCESS"
        assert executed["request"] == {
            "name": "change_color_temperature",
            "arguments": {"temp_kelvins": 1850},
            "manifest_name": "change_lux",
        }
        assert (executed["response"]["state"], executed["ephemeral"]) == ("SUCCEEDED", False)
        enapter = {"id", "state", "created_at", "request", "response", "ephemeral"}
        extensions = {"invoked_by", "device_seen", "sent_at", "delivered_at"}  # README: "Delivery and invokedBy"
        assert set(executed) == enapter | extensions
        assert executed["invoked_by"] == SEED_KEY_NAME
        assert executed["sent_at"] is not None
        assert executed["delivered_at"] is not None

        created = await env.curl("POST", f"{base}/command_executions", CREATE_BODY, SEED_AUTH)
        assert set(created) == {"execution_id"}
        running = await wait_state(env, created["execution_id"], "IN_PROGRESS")
        assert running["request"]["arguments"] == {"temp_kelvins": 15000}
        release.set()
        finished = await wait_state(env, created["execution_id"], "ERROR")
        lamp.cancel()
    assert finished["response"]["state"] == "ERROR"
    assert finished["response"]["payload"] == {"message": "Temperature value is out of range"}
    assert "log" not in finished

    url = f"{base}/command_executions/{created['execution_id']}?expand=log"
    expanded = (await env.curl("GET", url, headers=SEED_AUTH))["execution"]
    assert [(r["state"], r.get("payload")) for r in expanded["log"]] == [
        ("ERROR", {"message": "Temperature value is out of range"}),
        ("IN_PROGRESS", {"message": "received"}),
        ("STARTED", None),
    ]
    assert expanded["ephemeral"] is True

    default = await env.curl("GET", f"{base}/command_executions", headers=SEED_AUTH)
    assert ([e["id"] for e in default["executions"]], default["total_count"]) == ([executed["id"]], 1)
    listed = await env.curl("GET", f"{base}/command_executions?show=ALL&order=CREATED_AT_DESC", headers=SEED_AUTH)
    assert [(e["id"], e["state"], e["ephemeral"]) for e in listed["executions"]] == [
        (created["execution_id"], "ERROR", True),
        (executed["id"], "SUCCESS", False),
    ]
    assert listed["total_count"] == 2


async def test_enapter_seed_execute_with_the_device_simulator(env: Env) -> None:
    """The seed's execute_command curl answered by broker-bridge's own DeviceSimulator."""
    await register(env, DEVICE_ID, TOKEN, MANIFEST)
    simulator = DeviceSimulator(
        address=BrokerAddress(host="127.0.0.1", port=env.mqtt_port),
        app_version=env.av,
        token=TOKEN,
        answers={"change_lux": Answer(status_code=200)},
        progress=True,
        exit_after=1,
        out=io.StringIO(),
    )
    async with asyncio.timeout(WAIT_S * 2), asyncio.TaskGroup() as tasks:
        device = tasks.create_task(simulator.run(), name="simulator")
        url = f"/v3/devices/{DEVICE_ID}/execute_command?expand=log"
        execution = (await env.curl("POST", url, EXECUTE_BODY, SEED_AUTH))["execution"]
        await device
    assert (execution["state"], execution["response"]["state"]) == ("SUCCESS", "SUCCEEDED")
    assert [r["state"] for r in execution["log"]] == ["SUCCEEDED", "IN_PROGRESS"]
    assert simulator.executed == {int(execution["id"]): 200}


async def test_kaa_tutorial_curl_flow(env: Env) -> None:
    """Kaa's tutorial: invoke over the admin topic, poll and report with its curls, the command is executed."""
    events_topic = f"cex/events/{env.av}/#"
    async with probe(env.mqtt_port, events_topic) as watcher:
        invoke = await watcher.request(f"cex/admin/{env.av}/{TOKEN}/invoke/reboot/1", {"payload": {}, "ttl": 3600})
        assert invoke.topic.endswith("/status")
        command_id = invoke.json()["id"]
        polled = await env.curl("POST", env.kp1("command/reboot"), "{}")
        assert polled == [{"id": command_id, "payload": {}}]
        assert await env.curl("POST", env.kp1("command/reboot"), "{}") == polled  # still pending until a result
        result = TUTORIAL_RESULT.replace("<command-ID>", str(command_id))
        assert await env.curl("POST", env.kp1("result/reboot"), result) == {
            "statusCode": 200,
            "reasonPhrase": "OK",
        }
        event = f"cex/events/{env.av}/{TOKEN}/reboot/{command_id}"
        final = await watcher.wait_for(lambda s: s.topic == event and s.json()["state"] == "executed")
    assert (final.json()["statusCode"], final.json()["resultPayload"]) == (200, "Success")
    assert await env.curl("POST", env.kp1("command/reboot"), "{}") == []
    devices = await env.curl("GET", "/v3/devices", headers={"Authorization": f"Bearer {KEY}"})
    endpoint_id = devices["devices"][0]["id"]
    last = await env.curl("GET", f"/api/v1/endpoints/{endpoint_id}/commands/reboot/last", headers=SEED_AUTH)
    assert (last["id"], last["state"]) == (command_id, "Executed")
    assert last["result"] == {"statusCode": 200, "reasonPhrase": "OK", "payload": "Success"}


async def test_http_and_mqtt_devices_at_once(env: Env) -> None:
    """An HTTP-polling and an MQTT device each get and execute only their own commands."""
    await register(env, "poller", "poller1")
    await register(env, "mqtt", "mqtt1")
    create = json.dumps({"name": "reboot", "arguments": {"delay": 1}})
    ids = {
        device: [
            (await env.curl("POST", f"/v3/devices/{device}/command_executions", create, SEED_AUTH))["execution_id"]
            for _ in range(2)
        ]
        for device in ("poller", "mqtt")
    }
    simulator = DeviceSimulator(
        address=BrokerAddress(host="127.0.0.1", port=env.mqtt_port),
        app_version=env.av,
        token="mqtt1",
        answers={"reboot": Answer(status_code=200)},
        exit_after=2,
        out=io.StringIO(),
    )
    async with asyncio.timeout(WAIT_S * 2), asyncio.TaskGroup() as tasks:
        tasks.create_task(simulator.run(), name="simulator")
        polled = await env.curl("POST", env.kp1("command/reboot", token="poller1"), "{}")
        assert [str(c["id"]) for c in polled] == ids["poller"]
        results = [{"id": c["id"], "statusCode": 200, "reasonPhrase": "OK"} for c in polled]
        await env.curl("POST", env.kp1("result/reboot", token="poller1"), json.dumps(results))
    assert sorted(simulator.executed) == sorted(int(i) for i in ids["mqtt"])
    assert await env.curl("POST", env.kp1("command/reboot", token="poller1"), "{}") == []
    for device, execution_ids in ids.items():
        listing = await env.curl("GET", f"/v3/devices/{device}/command_executions", headers=SEED_AUTH)
        assert [(e["id"], e["state"]) for e in listing["executions"]] == [(i, "SUCCESS") for i in execution_ids]
