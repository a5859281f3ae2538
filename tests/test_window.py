"""Delivery over MQTT end to end: a per-target window (commands one after another) and pushes split
at the byte limit, on the embedded broker, on Mosquitto and with two instances on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.ports import free_port
from broker_bridge.config import Settings, load_settings
from broker_bridge.service import CommandService
from tests.conftest import MosquittoProcess, mosquitto_available, skip_or_fail
from tests.harness import Probe, make_settings, probe, running_service

TOKEN = "dev1"
EXECUTING_S = 0.2  # how long the slow device takes over each command


@dataclass(frozen=True, slots=True)
class Env:
    port: int
    settings: Settings
    service: CommandService
    av: str

    def kp1(self, rest: str) -> str:
        return f"kp1/{self.av}/cex/{TOKEN}/{rest}"

    def admin(self, rest: str) -> str:
        return f"cex/admin/{self.av}/{TOKEN}/{rest}"


@contextlib.asynccontextmanager
async def started(broker: str, tmp_path: Path, app_version: str, **overrides: Any) -> AsyncIterator[Env]:
    """The service with these settings on the embedded broker, or on a Mosquitto of its own."""
    if broker == "embedded":
        port = free_port()
        settings = make_settings(tmp_path, port, **overrides)
        async with running_service(settings) as service:
            yield Env(port, settings, service, app_version)
        return
    if not mosquitto_available():
        skip_or_fail("mosquitto is not installed (Debian package 'mosquitto')")
    mosquitto = MosquittoProcess(tmp_path)
    mosquitto.start()
    try:
        settings = make_settings(tmp_path, mosquitto.port, broker_url=mosquitto.url, **overrides)
        async with running_service(settings) as service:
            yield Env(mosquitto.port, settings, service, app_version)
    finally:
        mosquitto.stop()


async def invoke_all(admin: Probe, env: Env, count: int, body: Any = None) -> list[int]:
    """Invoke ``count`` reboots one after another (each reply awaited): ids in invoke order."""
    ids = []
    for n in range(1, count + 1):
        reply = await admin.request(env.admin(f"invoke/reboot/{n}"), {"payload": body or {"n": n}})
        assert reply.topic.endswith("/status"), reply.payload
        ids.append(reply.json()["id"])
    return ids


def listed(device: Probe, topic: str) -> list[list[int]]:
    """The ids of every non-empty list the device was handed on a topic, in arrival order."""
    return [[item["id"] for item in s.json()] for s in device.on(topic) if s.payload and s.json()]


async def run_slowly(device: Probe, env: Env, count: int) -> list[int]:
    """A device that takes EXECUTING_S over each command and reports it before looking at the next:
    it executes what it is handed, in the order handed, and checks nothing else came meanwhile."""
    push = env.kp1("command/reboot/status")
    done: list[int] = []
    for n in range(count):
        handed = await device.wait_for(lambda s: s.topic == push and bool(_new_ids(s, done)))
        fresh = _new_ids(handed, done)
        assert len(fresh) == 1, f"the window holds one command, the device was handed {fresh}"
        await asyncio.sleep(EXECUTING_S)
        seen = {i for ids in listed(device, push) for i in ids}
        assert seen == {*done, fresh[0]}, "a command arrived before the one executing was reported"
        reply = await device.request(env.kp1(f"result/reboot/{n + 1}"), [{"id": fresh[0], "statusCode": 200}])
        assert reply.json()["statusCode"] == 200
        done.append(fresh[0])
    return done


def _new_ids(seen: Any, done: list[int]) -> list[int]:
    return [item["id"] for item in (seen.json() if seen.payload else []) if item["id"] not in done]


@pytest.mark.parametrize(("broker", "retain"), [("embedded", None), ("mosquitto", None), ("mosquitto", False)])
async def test_a_window_of_one_runs_five_commands_strictly_in_order(
    broker: str, retain: bool | None, tmp_path: Path, app_version: str
) -> None:
    """max_in_flight_per_target = 1: five commands invoked at once reach a slow device one at a
    time, each only after the previous one's result, in invoke order (non-retained pushes on the
    embedded broker; on Mosquitto retained ones, the default there, and non-retained ones)."""
    async with started(broker, tmp_path, app_version, max_in_flight_per_target=1, retain_pushes=retain) as env:
        async with probe(env.port, env.kp1("command/reboot/status")) as device, probe(env.port) as admin:
            ids = await invoke_all(admin, env, 5)
            assert await run_slowly(device, env, 5) == ids
            assert listed(device, env.kp1("command/reboot/status")) == [[i] for i in ids]
        for command_id in ids:
            assert (await env.service.get(command_id)).state.value == "executed"


@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
async def test_polls_hand_out_the_window_only(broker: str, tmp_path: Path, app_version: str) -> None:
    """An MQTT poll and an HTTP poll both answer with the oldest two of five commands."""
    import httpx

    async with started(broker, tmp_path, app_version, max_in_flight_per_target=2) as env:
        async with probe(env.port, env.kp1("command/reboot/9/status")) as device, probe(env.port) as admin:
            ids = await invoke_all(admin, env, 5)
            answer = await device.request(env.kp1("command/reboot/9"), {})
            assert [item["id"] for item in answer.json()] == ids[:2]
        url = f"http://{env.settings.http_listen}/kp1/{env.av}/cex/{TOKEN}/command/reboot"
        async with httpx.AsyncClient() as http:
            polled = await http.post(url, json={})
        assert [item["id"] for item in polled.json()] == ids[:2]


def pg_settings(tmp_path: Path, mosquitto: MosquittoProcess, pg_url: str, name: str, **overrides: Any) -> Settings:
    return load_settings(
        db=pg_url,
        broker_url=mosquitto.url,
        http_listen=f"127.0.0.1:{free_port()}",
        instance=name,
        client_id=f"bridge-{name}-{mosquitto.port}",
        **overrides,
    )


@pytest.mark.mosquitto
async def test_two_instances_on_postgresql_keep_the_window(
    tmp_path: Path, app_version: str, mosquitto: MosquittoProcess, pg_url: str
) -> None:
    """Two instances sharing the work (shared subscriptions, lists read afresh under push locks):
    invokes and results are taken by either, and the commands still arrive one at a time in order."""
    fleet = [pg_settings(tmp_path, mosquitto, pg_url, name, max_in_flight_per_target=1) for name in ("w1", "w2")]
    async with running_service(fleet[0]) as service, running_service(fleet[1]):
        env = Env(mosquitto.port, fleet[0], service, app_version)
        async with probe(env.port, env.kp1("command/reboot/status")) as device, probe(env.port) as admin:
            ids = await invoke_all(admin, env, 5)
            assert await run_slowly(device, env, 5) == ids
            # An invoke's list is read afresh under the lock here, so it may repeat the window [first].
            handed = listed(device, env.kp1("command/reboot/status"))
            assert [ids for n, ids in enumerate(handed) if n == 0 or handed[n - 1] != ids] == [[i] for i in ids]


# -- pushes split at the byte limit -----------------------------------------------------------------
MAX_PAYLOAD = 1000
MAX_PUSH = 2500  # room for two of the commands below (each ~920 bytes in its array), not three
SPLIT = {"max_payload_bytes": MAX_PAYLOAD, "max_push_bytes": MAX_PUSH}
BIG = "x" * 900


def pairs(ids: list[int]) -> list[list[int]]:
    return [ids[n : n + 2] for n in range(0, len(ids), 2)]


@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
async def test_a_long_list_reaches_a_subscribed_device_in_messages_within_the_limit(
    broker: str, tmp_path: Path, app_version: str
) -> None:
    """Six commands of 900 bytes at a 2500-byte limit: the device is handed the list as three
    messages of two commands, oldest first, none over the limit."""
    async with started(broker, tmp_path, app_version, **SPLIT) as env:
        push = env.kp1("command/reboot/status")
        async with probe(env.port, push) as device, probe(env.port) as admin:
            ids = await invoke_all(admin, env, 6, BIG)
            await device.wait_for(lambda s: s.topic == push and ids[-1] in _new_ids(s, []))
            assert listed(device, push)[-3:] == pairs(ids)  # the last invoke's push, whole
            assert all(len(s.payload) <= MAX_PUSH for s in device.on(push))


@pytest.mark.mosquitto
async def test_a_device_that_subscribes_later_gets_the_oldest_message_retained_then_the_rest(
    tmp_path: Path, app_version: str
) -> None:
    """Retained pushes split: only the first message (the oldest commands) is retained. A device
    that subscribes afterwards gets it at once; each report pushes the list again, so the next
    commands follow, the oldest of them retained again."""
    async with started("mosquitto", tmp_path, app_version, **SPLIT) as env:
        push = env.kp1("command/reboot/status")
        async with probe(env.port) as admin:
            ids = await invoke_all(admin, env, 6, BIG)
        async with probe(env.port, push) as device:
            first = await device.wait_topic(push)
            assert (first.retain, [item["id"] for item in first.json()]) == (True, ids[:2])
            results = [{"id": i, "statusCode": 200} for i in ids[:2]]
            assert (await device.request(env.kp1("result/reboot/1"), results)).json()["statusCode"] == 200
            await device.wait_for(lambda s: s.topic == push and ids[-1] in _new_ids(s, []))
            assert listed(device, push) == pairs(ids)
        async with probe(env.port, push) as late:
            retained = await late.wait_topic(push)
            assert (retained.retain, [item["id"] for item in retained.json()]) == (True, ids[2:4])


@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
async def test_an_mqtt_poll_reply_carries_the_oldest_that_fit_and_http_all(
    broker: str, tmp_path: Path, app_version: str
) -> None:
    """An MQTT poll is answered with the oldest commands that fit max_push_bytes (the device polls
    again after reporting them); the HTTP binding answers with the whole list."""
    import httpx

    async with started(broker, tmp_path, app_version, **SPLIT) as env:
        async with probe(env.port, env.kp1("command/reboot/9/status")) as device, probe(env.port) as admin:
            ids = await invoke_all(admin, env, 5, BIG)
            answer = await device.request(env.kp1("command/reboot/9"), {})
            assert [item["id"] for item in answer.json()] == ids[:2]
            assert len(answer.payload) <= MAX_PUSH
            results = [{"id": i, "statusCode": 200} for i in ids[:2]]
            assert (await device.request(env.kp1("result/reboot/1"), results)).json()["statusCode"] == 200
            again = await device.request(env.kp1("command/reboot/10"), {})
            assert [item["id"] for item in again.json()] == ids[2:4]
        url = f"http://{env.settings.http_listen}/kp1/{env.av}/cex/{TOKEN}/command/reboot"
        async with httpx.AsyncClient() as http:
            polled = await http.post(url, json={})
        assert [item["id"] for item in polled.json()] == ids[2:]
