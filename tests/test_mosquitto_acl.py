"""The shipped Mosquitto ACL (config/mosquitto/acl) on a real Mosquitto: every login reaches only its topics.

Mosquitto 2.0 refuses nothing out loud: a denied PUBLISH is acknowledged and dropped, and a SUBSCRIBE is
granted whatever the filter, read access being checked per message. So each "cannot" below is shown by
what does not happen (watched for QUIET_S after a barrier that a leak would have passed), by the stored
commands, and by Mosquitto's own "Denied PUBLISH" log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest

from broker_bridge.commands import CommandState, to_record
from broker_bridge.config import Settings
from broker_bridge.store.base import CommandQuery
from broker_bridge.store.sqlite import SqliteStore
from tests.conftest import MosquittoProcess, mosquitto_available, skip_or_fail
from tests.harness import Probe, make_settings, running_service

CONFIG = Path(__file__).resolve().parent.parent / "config" / "mosquitto"
PASSWORDS = {"devA": "pw-devA", "devB": "pw-devB", "admin": "pw-admin", "broker-bridge": "pw-bridge"}
QUIET_S = 0.5
GRANTED_QOS_1 = 1

SECURED_CONF = """\
listener {port} 127.0.0.1
# Started as root, Mosquitto would read the files below as user "mosquitto", which may not enter the
# test's private temporary directory; as anyone else this line does nothing.
user root
allow_anonymous false
password_file {passwd}
acl_file {acl}
persistence false
# The default (1000) silently dropped thousands of QoS 1 messages in a burst.
max_queued_messages 100000
max_inflight_messages 1000
set_tcp_nodelay true
# "Denied PUBLISH" lines are debug messages.
log_dest stderr
log_type all
"""


class SecuredMosquitto(MosquittoProcess):
    """A Mosquitto on a free port that needs a login and applies an ACL file."""

    def __init__(self, workdir: Path, passwd: Path, acl: Path) -> None:
        super().__init__(workdir)
        self.conf.write_text(SECURED_CONF.format(port=self.port, passwd=passwd, acl=acl))

    def denied(self, client_id: str, topic: str) -> bool:
        """Whether Mosquitto logged that it dropped this client's publish on this topic."""
        lines = self.log.read_text(errors="replace").splitlines()
        return any(f"Denied PUBLISH from {client_id} " in line and f"'{topic}'" in line for line in lines)


def mosquitto_passwd() -> str:
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(tool).exists():
        skip_or_fail("mosquitto_passwd is not installed (Debian package 'mosquitto')")
    return tool


@contextlib.contextmanager
def secured_broker(tmp_path: Path, acl: Path) -> Iterator[SecuredMosquitto]:
    """Mosquitto with this ACL and a password file for devA, devB, admin and broker-bridge."""
    if not mosquitto_available():
        skip_or_fail("mosquitto is not installed (Debian package 'mosquitto')")
    tool, passwd = mosquitto_passwd(), tmp_path / "passwd"
    for index, (user, password) in enumerate(PASSWORDS.items()):
        create = ["-c"] if index == 0 else []
        subprocess.run([tool, *create, "-b", str(passwd), user, password], check=True, capture_output=True)
    broker = SecuredMosquitto(tmp_path, passwd, acl)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[SecuredMosquitto]:
    """Mosquitto with the shipped ACL."""
    with secured_broker(tmp_path, CONFIG / "acl") as broker:
        yield broker


@dataclass(frozen=True, slots=True)
class Site:
    """The secured broker, the bridge's settings and this test's app version."""

    broker: SecuredMosquitto
    settings: Settings
    av: str

    def kp1(self, token: str, rest: str) -> str:
        return f"kp1/{self.av}/cex/{token}/{rest}"

    def admin(self, token: str, rest: str) -> str:
        return f"cex/admin/{self.av}/{token}/{rest}"


@pytest.fixture
async def site(secured: SecuredMosquitto, tmp_path: Path, app_version: str) -> AsyncIterator[Site]:
    """The bridge running on the secured Mosquitto under its own account."""
    url = f"mqtt://broker-bridge:{PASSWORDS['broker-bridge']}@127.0.0.1:{secured.port}"
    settings = make_settings(tmp_path, secured.port, broker_url=url)
    async with running_service(settings):
        yield Site(secured, settings, app_version)


@contextlib.asynccontextmanager
async def login(site: Site, user: str, *filters: str, identifier: str | None = None) -> AsyncIterator[Probe]:
    """A client logged in as user (client id: the user name unless given) that records what it receives."""
    port, password = site.broker.port, PASSWORDS[user]
    client = aiomqtt.Client("127.0.0.1", port, username=user, password=password, identifier=identifier or user)
    async with client:
        watcher = Probe(client)
        pump = asyncio.create_task(watcher._pump())
        try:
            for topic_filter in filters:
                assert await subscribe(watcher, topic_filter) == GRANTED_QOS_1
            yield watcher
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)


async def subscribe(watcher: Probe, topic_filter: str) -> int:
    """The SUBACK return code of one subscription (0x80 = refused)."""
    granted: Any = await watcher.client.subscribe(topic_filter, qos=1)
    return int(getattr(granted[0], "value", granted[0]))


async def invoke(admin: Probe, site: Site, token: str, rid: int, payload: object = None) -> dict[str, Any]:
    reply = await admin.request(site.admin(token, f"invoke/reboot/{rid}"), {"payload": payload or {"n": rid}})
    assert reply.topic.endswith("/status"), reply.payload
    record: dict[str, Any] = reply.json()
    return record


async def stored(site: Site, command_id: int) -> dict[str, Any]:
    async with SqliteStore(site.settings.db_path) as store:
        command = await store.get(command_id)
    assert command is not None
    return to_record(command)


async def test_device_flow_with_logins(site: Site) -> None:
    """Under the ACL a device gets its push, polls, reports; the operator invokes and watches events."""
    events = f"cex/events/{site.av}/#"
    async with login(site, "admin", events) as admin, login(site, "devB", site.kp1("devB", "#")) as dev_b:
        record = await invoke(admin, site, "devB", 1, {"delay": 5})
        push = await dev_b.wait_topic(site.kp1("devB", "command/reboot/status"))
        assert push.json() == [{"id": record["id"], "payload": {"delay": 5}}]
        polled = await dev_b.request(site.kp1("devB", "command/reboot/2"), {})
        assert polled.json() == [{"id": record["id"], "payload": {"delay": 5}}]
        result = {"id": record["id"], "statusCode": 200, "reasonPhrase": "OK", "payload": "done"}
        reply = await dev_b.request(site.kp1("devB", "result/reboot/3"), result)
        assert reply.topic == site.kp1("devB", "result/reboot/3/status")
        assert reply.json() == {"statusCode": 200, "reasonPhrase": "OK"}
        topic = f"cex/events/{site.av}/devB/reboot/{record['id']}"
        await admin.wait_for(lambda s: s.topic == topic and s.json()["state"] == "executed")
    assert (await stored(site, record["id"]))["state"] == "executed"


async def test_device_cannot_read_another_devices_commands(site: Site) -> None:
    """devA's subscriptions to devB's tree and to # are granted, yet deliver none of devB's messages."""
    async with login(site, "admin") as admin, login(site, "devB", site.kp1("devB", "#")) as dev_b:
        async with login(site, "devA") as dev_a:
            # Mosquitto 2.0's ACL check does not look at subscriptions: both are granted...
            assert await subscribe(dev_a, site.kp1("devB", "#")) == GRANTED_QOS_1
            assert await subscribe(dev_a, "#") == GRANTED_QOS_1
            record = await invoke(admin, site, "devB", 1)
            await dev_b.wait_topic(site.kp1("devB", "command/reboot/status"))
            await dev_b.request(site.kp1("devB", "command/reboot/2"), {})
            await asyncio.sleep(QUIET_S)
            # ... and filtered per message: not the push, not the poll, not its reply.
            assert dev_a.seen == []
        # The retained list is filtered too: a later subscriber gets devB's list only as devB.
        async with login(site, "devA", site.kp1("devB", "#"), "#") as late_a:
            async with login(site, "devB", identifier="devB-later") as late_b:
                assert await subscribe(late_b, site.kp1("devB", "command/reboot/status")) == GRANTED_QOS_1
                retained = await late_b.wait_topic(site.kp1("devB", "command/reboot/status"))
                assert (retained.retain, [c["id"] for c in retained.json()]) == (True, [record["id"]])
            await asyncio.sleep(QUIET_S)
            assert late_a.seen == []


async def test_device_cannot_answer_or_forge_for_another_device(site: Site) -> None:
    """devA's result on devB's topic and its forged push to devB are dropped; devB's command is untouched."""
    async with login(site, "admin") as admin, login(site, "devB", site.kp1("devB", "#")) as dev_b:
        record = await invoke(admin, site, "devB", 1)
        await dev_b.wait_topic(site.kp1("devB", "command/reboot/status"))
        before = await stored(site, record["id"])
        async with login(site, "devA", site.kp1("devA", "#")) as dev_a:
            steal = site.kp1("devB", "result/reboot/7")
            await dev_a.publish(steal, [{"id": record["id"], "statusCode": 200, "payload": "stolen"}])  # PUBACK'd
            forged = site.kp1("devB", "command/reboot/status")
            await dev_a.client.publish(forged, json.dumps([{"id": 999, "payload": "evil"}]), qos=1, retain=True)
            # Through its own topic the bridge hears devA, and refuses: the id is not devA's.
            mine = await dev_a.request(site.kp1("devA", "result/reboot/8"), [{"id": record["id"], "statusCode": 200}])
            assert (mine.topic.endswith("/error"), mine.json()["statusCode"]) == (True, 404)
            assert site.broker.denied("devA", steal)
            assert site.broker.denied("devA", forged)
        polled = await dev_b.request(site.kp1("devB", "command/reboot/9"), {})
        assert [c["id"] for c in polled.json()] == [record["id"]]
        await asyncio.sleep(QUIET_S)
        assert not any(b"evil" in s.payload for s in dev_b.seen)
        assert dev_b.on(site.kp1("devB", "result/reboot/7/status")) == []
        assert dev_b.on(site.kp1("devB", "result/reboot/7/error")) == []
    assert await stored(site, record["id"]) == before


async def test_device_cannot_invoke_cancel_or_watch_events(site: Site) -> None:
    """devA's admin publishes are dropped (nothing created or cancelled) and it reads no events."""
    async with login(site, "admin", f"cex/events/{site.av}/#") as admin, login(site, "devA") as dev_a:
        assert await subscribe(dev_a, "cex/events/#") == GRANTED_QOS_1
        assert await subscribe(dev_a, "cex/admin/#") == GRANTED_QOS_1
        record = await invoke(admin, site, "devB", 1)
        attempts = [
            site.admin("devA", "invoke/reboot/2"),
            site.admin("devB", "invoke/reboot/3"),
            site.admin("devB", f"cancel/reboot/{record['id']}/4"),
        ]
        for topic in attempts:
            await dev_a.publish(topic, {"payload": "from devA"} if "/invoke/" in topic else b"")
            assert site.broker.denied("devA", topic)
        second = await invoke(admin, site, "devB", 5)  # a barrier: the admin's own invoke went through
        await admin.wait_topic(f"cex/events/{site.av}/devB/reboot/{second['id']}")
        await asyncio.sleep(QUIET_S)
        assert dev_a.seen == []
    async with SqliteStore(site.settings.db_path) as store:
        created = await store.history(CommandQuery(app_version=site.av, oldest_first=True))
    assert [(c.id, c.target.endpoint_token, c.state) for c in created] == [
        (record["id"], "devB", CommandState.PENDING),
        (second["id"], "devB", CommandState.PENDING),
    ]


async def test_logins_are_required(secured: SecuredMosquitto) -> None:
    """Anonymous clients and wrong passwords are refused: CONNACK "not authorized" (return code 5)."""
    for credentials in ({}, {"username": "devA", "password": "wrong"}, {"username": "nobody", "password": "x"}):
        with pytest.raises(aiomqtt.MqttCodeError) as refused:
            async with aiomqtt.Client("127.0.0.1", secured.port, **credentials):
                pass
        assert str(refused.value.rc) == "Not authorized", credentials  # paho's name for 3.1.1 code 5


async def test_a_publish_the_broker_refuses_is_logged_counted_and_passed(tmp_path: Path, app_version: str) -> None:
    """MQTT 5: an ACL that denies the bridge its events topic gets PUBACK 0x87 for every event. The
    bridge counts and logs each refusal (it used to count them as delivered, silently) and goes on:
    replies and pushes on its other topics still flow."""
    acl = tmp_path / "acl"
    acl.write_text((CONFIG / "acl").read_text().replace("topic write cex/events/#", "# events: denied"))
    with secured_broker(tmp_path, acl) as broker:
        url = f"mqtt://broker-bridge:{PASSWORDS['broker-bridge']}@127.0.0.1:{broker.port}"
        settings = make_settings(tmp_path, broker.port, broker_url=url)
        assert settings.use_mqtt5
        async with running_service(settings):
            site = Site(broker, settings, app_version)
            async with login(site, "admin") as admin, login(site, "devB", site.kp1("devB", "#")) as dev_b:
                for rid in (1, 2):
                    record = await invoke(admin, site, "devB", rid)
                    push = [{"id": record["id"], "payload": {"n": rid}}]
                    await dev_b.wait_for(lambda seen, push=push: seen.json() == push)
                    result = {"id": record["id"], "statusCode": 200}
                    reply = await dev_b.request(site.kp1("devB", f"result/reboot/{10 + rid}"), result)
                    assert reply.json() == {"statusCode": 200, "reasonPhrase": "OK"}
            async with httpx.AsyncClient(base_url=f"http://{settings.http_listen}") as http:
                exposition = (await http.get("/metrics")).text
    counter = "broker_bridge_mqtt_publishes_refused_total"
    assert [line for line in exposition.splitlines() if line.startswith(counter)] == [f"{counter} 4.0"]  # 2 events x 2
    assert broker.denied(settings.client_id, f"cex/events/{app_version}/devB/reboot/{record['id']}")


def test_shipped_files_load(tmp_path: Path) -> None:
    """Mosquitto starts with passwd.example (no accounts) and the shipped ACL; the config documents both."""
    if not mosquitto_available():
        skip_or_fail("mosquitto is not installed (Debian package 'mosquitto')")
    broker = SecuredMosquitto(tmp_path, CONFIG / "passwd.example", CONFIG / "acl")
    broker.start()
    try:
        assert broker.proc is not None
        assert broker.proc.poll() is None
    finally:
        broker.stop()
    conf = (CONFIG / "mosquitto.conf").read_text()
    assert "acl_file" in conf
    assert "password_file" in conf
