"""The whole bridge over MQTT, once on the embedded amqtt broker and once on a real Mosquitto."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest

from broker_bridge.config import Settings
from broker_bridge.store.sqlite import SqliteStore
from broker_bridge.topics import Codec
from tests.conftest import MosquittoProcess, free_port, mosquitto_available, skip_or_fail
from tests.harness import Probe, make_settings, probe, running_service

TOKEN = "dev1"


@dataclass(frozen=True, slots=True)
class Env:
    """A running service and the topics of one test's endpoint."""

    port: int
    settings: Settings
    av: str

    def kp1(self, rest: str, token: str = TOKEN) -> str:
        return f"kp1/{self.av}/cex/{token}/{rest}"

    def admin(self, rest: str, token: str = TOKEN) -> str:
        return f"cex/admin/{self.av}/{token}/{rest}"

    def events(self) -> str:
        return f"cex/events/{self.av}/#"


@pytest.fixture(params=["embedded", "mosquitto"])
async def env(request: pytest.FixtureRequest, tmp_path: Path, app_version: str) -> AsyncIterator[Env]:
    """The service on the embedded broker, or on a Mosquitto started for this test."""
    if request.param == "embedded":
        port = free_port()
        settings = make_settings(tmp_path, port)
        async with running_service(settings):
            yield Env(port, settings, app_version)
        return
    if not mosquitto_available():
        skip_or_fail("mosquitto is not installed (Debian package 'mosquitto')")
    broker = MosquittoProcess(tmp_path)
    broker.start()
    try:
        settings = make_settings(tmp_path, broker.port, broker_url=broker.url)
        async with running_service(settings):
            yield Env(broker.port, settings, app_version)
    finally:
        broker.stop()


async def invoke(admin: Probe, env: Env, command_type: str = "reboot", body: object = None, rid: int = 1) -> dict:
    reply = await admin.request(env.admin(f"invoke/{command_type}/{rid}"), body or {"payload": {"n": rid}})
    assert reply.topic.endswith("/status"), reply.payload
    record: dict = reply.json()
    return record


async def test_invoke_push_result_and_events(env: Env) -> None:
    """Invoke over the admin tree, the device gets the push, reports, the command is executed."""
    async with probe(env.port, env.events()) as watcher, probe(env.port, env.kp1("command/reboot/status")) as device:
        async with probe(env.port) as admin:
            record = await invoke(admin, env, body={"payload": {"delay": 5}, "ttl": 60})
        assert record["state"] == "pending"
        assert record["payload"] == {"delay": 5}
        push = await device.wait_topic(env.kp1("command/reboot/status"))
        assert push.json() == [{"id": record["id"], "payload": {"delay": 5}}]
        result = {"id": record["id"], "statusCode": 200, "reasonPhrase": "OK", "payload": "Success"}
        reply = await device.request(env.kp1("result/reboot/7"), [result])
        assert reply.json() == {"statusCode": 200, "reasonPhrase": "OK"}
        event_topic = f"cex/events/{env.av}/{TOKEN}/reboot/{record['id']}"
        final = await watcher.wait_for(lambda s: s.topic == event_topic and s.json()["state"] == "executed")
        assert [s.json()["state"] for s in watcher.on(event_topic)] == ["pending", "executed"]
    assert (final.json()["statusCode"], final.json()["reasonPhrase"], final.json()["resultPayload"]) == (
        200,
        "OK",
        "Success",
    )
    assert len(final.json()["log"]) == 1


async def test_progress_report_then_final(env: Env) -> None:
    """A 102 makes the command in_progress; the final result executes it; both are logged."""
    async with probe(env.port, env.kp1("result/#")) as device, probe(env.port) as admin:
        record = await invoke(admin, env)
        await device.request(env.kp1("result/reboot/1"), {"id": record["id"], "statusCode": 102, "payload": 50})
        shown = await admin.request(env.admin(f"invoke/other/{2}"), {})  # any round trip orders the check
        assert shown.topic.endswith("/status")
        await device.request(env.kp1("result/reboot/2"), [{"id": record["id"], "statusCode": 503}])
    command = await _stored(env, record["id"])
    assert (command["state"], command["statusCode"]) == ("executed", 503)
    assert [e["statusCode"] for e in command["log"]] == [102, 503]


async def _stored(env: Env, command_id: int) -> dict:
    from broker_bridge.commands import to_record

    async with SqliteStore(env.settings.db_path) as store:
        command = await store.get(command_id)
    assert command is not None
    return to_record(command)


async def test_poll_with_and_without_request_id(env: Env) -> None:
    """A poll answers with every outstanding command of the type, [] when none."""
    async with probe(env.port, env.kp1("command/#")) as device, probe(env.port) as admin:
        empty = await device.request(env.kp1("command/zero/3"), {})
        assert empty.json() == []
        first = await invoke(admin, env, rid=1)
        second = await invoke(admin, env, rid=2)
        listed = await device.request(env.kp1("command/reboot/4"), b"")
        assert [c["id"] for c in listed.json()] == [first["id"], second["id"]]
        device.seen.clear()
        await device.publish(env.kp1("command/reboot"), {"observe": True})
        plain = await device.wait_topic(env.kp1("command/reboot/status"))
        assert [c["id"] for c in plain.json()] == [first["id"], second["id"]]


async def test_observe_false_stops_pushes(env: Env) -> None:
    """After {"observe": false} invokes are not pushed; polls still answer."""
    async with probe(env.port, env.kp1("command/#")) as device, probe(env.port) as admin:
        await device.request(env.kp1("command/reboot/1"), {"observe": False})
        record = await invoke(admin, env)
        polled = await device.request(env.kp1("command/reboot/2"), {})
        assert [c["id"] for c in polled.json()] == [record["id"]]
        assert device.on(env.kp1("command/reboot/status")) == []


@pytest.mark.parametrize(
    ("body", "status", "reason_part"),
    [
        (b"{nope", 400, "malformed JSON"),
        (b"[]", 400, "empty"),
        (b'{"id": "x", "statusCode": 200}', 400, "id"),
        (b'{"id": 1, "statusCode": 99}', 400, "statusCode"),
        (b'{"id": 999999, "statusCode": 200}', 404, "no command 999999"),
    ],
)
async def test_bad_results_get_kp1_errors(env: Env, body: bytes, status: int, reason_part: str) -> None:
    """Malformed or unknown results are answered on /error with the KP1 error body."""
    async with probe(env.port, env.kp1("result/#")) as device:
        reply = await device.request(env.kp1("result/reboot/5"), body)
    assert reply.topic.endswith("/error")
    error = reply.json()
    assert set(error) == {"statusCode", "reasonPhrase"}
    assert error["statusCode"] == status
    assert reason_part in error["reasonPhrase"]


async def test_result_for_other_endpoint_or_type_changes_nothing(env: Env) -> None:
    """A device cannot finish another endpoint's or another type's command."""
    async with probe(env.port, "kp1/#") as devices, probe(env.port) as admin:
        record = await invoke(admin, env)
        for topic in (env.kp1("result/reboot/1", token="intruder"), env.kp1("result/zero/2")):
            reply = await devices.request(topic, [{"id": record["id"], "statusCode": 200}])
            assert reply.json()["statusCode"] == 404
        finished = await devices.request(env.kp1("result/reboot/3"), [{"id": record["id"], "statusCode": 200}])
        assert finished.topic.endswith("/status")
        again = await devices.request(env.kp1("result/reboot/4"), [{"id": record["id"], "statusCode": 500}])
        assert again.json()["statusCode"] == 409
    stored = await _stored(env, record["id"])
    assert (stored["state"], stored["statusCode"], len(stored["log"])) == ("executed", 200, 1)


async def test_admin_errors_and_cancel(env: Env) -> None:
    """Bad admin input gets an error reply; a cancelled command is never delivered again."""
    async with probe(env.port, env.kp1("command/#")) as device, probe(env.port) as admin:
        bad = await admin.request(env.admin("invoke/reboot/1"), {"payload": 1, "ttl": -5})
        assert (bad.topic.endswith("/error"), bad.json()["statusCode"]) == (True, 400)
        typo = await admin.request(env.admin("invoke/reboot/2"), {"payload": 1, "tll": 5})
        assert "tll" in typo.json()["reasonPhrase"]
        bad_type = await admin.request(env.admin("invoke/re.boot/3"), {})
        assert bad_type.json()["statusCode"] == 400
        record = await invoke(admin, env, rid=4)
        cancelled = await admin.request(env.admin(f"cancel/reboot/{record['id']}/5"), b"")
        assert cancelled.json()["state"] == "cancelled"
        twice = await admin.request(env.admin(f"cancel/reboot/{record['id']}/6"), b"")
        assert twice.json()["statusCode"] == 409
        polled = await device.request(env.kp1("command/reboot/7"), {})
        assert polled.json() == []


async def test_msgpack_device(env: Env) -> None:
    """A device using the /msgpack format gets MessagePack pushes and replies."""
    pack = msgpack.packb
    async with probe(env.port, env.kp1("command/#"), env.kp1("result/#")) as device, probe(env.port) as admin:
        empty = await device.request(env.kp1("command/reboot/msgpack/1"), pack({"observe": True}))
        assert empty.decoded(Codec.MSGPACK) == []
        record = await invoke(admin, env, body={"payload": {"pos": [1, 2]}})
        push = await device.wait_topic(env.kp1("command/reboot/msgpack/status"))
        assert push.decoded(Codec.MSGPACK) == [{"id": record["id"], "payload": {"pos": [1, 2]}}]
        result = pack([{"id": record["id"], "statusCode": 200, "payload": {"ok": True}}])
        reply = await device.request(env.kp1("result/reboot/msgpack/2"), result)
        assert reply.decoded(Codec.MSGPACK) == {"statusCode": 200, "reasonPhrase": "OK"}
        bad = await device.request(env.kp1("result/reboot/msgpack/3"), b"\xc1")
        assert bad.decoded(Codec.MSGPACK)["statusCode"] == 400
    assert (await _stored(env, record["id"]))["resultPayload"] == {"ok": True}


async def test_expiry_and_late_result(env: Env) -> None:
    """A command without a result expires on time; a late result is refused and logged."""
    async with probe(env.port, env.events(), env.kp1("result/#")) as watcher, probe(env.port) as admin:
        record = await invoke(admin, env, body={"payload": 1, "ttl": 0.3})
        topic = f"cex/events/{env.av}/{TOKEN}/reboot/{record['id']}"
        expired = await watcher.wait_for(lambda s: s.topic == topic and s.json()["state"] == "expired")
        assert expired.json()["statusCode"] is None
        late = await watcher.request(env.kp1("result/reboot/9"), {"id": record["id"], "statusCode": 200})
        assert late.json()["statusCode"] == 409
        assert "expired" in late.json()["reasonPhrase"]
    stored = await _stored(env, record["id"])
    assert (stored["state"], [e["statusCode"] for e in stored["log"]]) == ("expired", [200])


async def test_oversized_payload_is_refused(env: Env) -> None:
    """A body over max_payload_bytes gets a 413 error and is not stored."""
    async with probe(env.port) as admin:
        big = json.dumps({"payload": "x" * (env.settings.max_payload_bytes + 10)})
        reply = await admin.request(env.admin("invoke/reboot/1"), big)
    assert reply.json()["statusCode"] == 413


async def test_mqtt5_spares_the_bridge_its_own_messages(env: Env) -> None:
    """On Mosquitto (MQTT 5, no-local) and in-process on the embedded broker, the bridge receives none
    of its own pushes and replies; only an MQTT 3.1.1 session gets them back (and ignores them)."""
    import httpx

    async with probe(env.port, env.kp1("command/reboot/status")) as device, probe(env.port) as admin:
        record = await invoke(admin, env)
        await device.wait_topic(env.kp1("command/reboot/status"))
        await device.request(env.kp1("result/reboot/9"), [{"id": record["id"], "statusCode": 200}])
    async with httpx.AsyncClient(base_url=f"http://{env.settings.http_listen}") as http:
        metrics = (await http.get("/metrics")).text
    counts = {
        line.split('"')[1]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("broker_bridge_mqtt_received_total{")
    }
    assert counts["device"] == 1
    assert counts["admin"] == 1
    if env.settings.use_mqtt5 or env.settings.embedded:
        assert counts.get("ignored", 0) == 0
    else:
        assert counts["ignored"] >= 2  # 3.1.1: the push, the result reply and the admin reply come back


async def test_in_process_session_restarts_after_a_refused_publish(
    tmp_path: Path, app_version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Embedded: a publish the broker refuses restarts the bridge's in-process session, as a reconnect
    does on an external broker, instead of stopping the service; the event goes out on the next one."""
    import asyncio

    import aiomqtt

    from broker_bridge.broker import InProcessLink

    send, refused = InProcessLink.send, []

    def refuse_first_event(
        self: InProcessLink, topic: str, payload: bytes, *, qos: int, retain: bool = False, receipt: Any = None
    ) -> asyncio.Future[None]:
        if topic.startswith("cex/events/") and not refused:
            refused.append(topic)
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.set_exception(aiomqtt.MqttError("refused by the test"))
            return future
        return send(self, topic, payload, qos=qos, retain=retain, receipt=receipt)

    monkeypatch.setattr(InProcessLink, "send", refuse_first_event)
    port = free_port()
    env = Env(port, make_settings(tmp_path, port), app_version)
    async with running_service(env.settings), probe(env.port, env.events()) as watcher, probe(env.port) as admin:
        record = await invoke(admin, env)
        event = await watcher.wait_topic(f"cex/events/{env.av}/{TOKEN}/reboot/{record['id']}")
        assert event.json()["state"] == "pending"
        again = await invoke(admin, env, rid=2)  # the service still answers
        assert again["id"] == record["id"] + 1
    assert refused == [f"cex/events/{env.av}/{TOKEN}/reboot/{record['id']}"]
