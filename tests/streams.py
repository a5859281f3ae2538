"""Streams of commands for fault tests: a restartable serve, simulated devices, a careful admin."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiomqtt

from broker_bridge.commands import Command, CommandState
from broker_bridge.store import CommandQuery
from broker_bridge.store.postgres import PostgresStore
from broker_bridge.store.sqlite import SqliteStore
from tests.conftest import MosquittoProcess, free_port

CLI = [sys.executable, "-m", "broker_bridge.cli"]
API_KEY = "streams-test-key"
DEVICES = 4
WINDOW = 200
RETRY_AFTER_S = 4.0
DEADLINE_S = 300.0  # below the tests' own timeouts, so a stuck run reports what it waited for
Events = defaultdict[int, list[dict[str, Any]]]


class Serve:
    """`broker-bridge serve` on an external Mosquitto, restartable; on SQLite in ``workdir``, or on
    the PostgreSQL database ``db`` as instance ``instance``."""

    def __init__(
        self, workdir: Path, broker: MosquittoProcess, *, db: str | None = None, instance: str | None = None
    ) -> None:
        self.db = workdir / "bridge.db"
        self.db_arg = db or str(self.db)
        self.args = ["--db", self.db_arg, "--broker-url", broker.url]
        if instance is not None:
            self.args += ["--instance", instance]
        self.log = workdir / f"serve-{instance or 'sqlite'}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0
        self.http_port = 0

    def tail(self) -> str:
        return self.log.read_text()[-1500:] if self.log.exists() else "(no log)"

    def start(self) -> None:
        self.http_port = free_port()
        http = ["--http-listen", f"127.0.0.1:{self.http_port}"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*CLI, "serve", *self.args, *http],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "BROKER_BRIDGE_API_KEYS": json.dumps([API_KEY])},
            )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.kills += 1

    def terminate(self) -> float:
        """SIGTERM and wait (at most 15 s); the seconds it took. Exit code must be 0."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=15) == 0, self.log.read_text()[-2000:]
        return time.monotonic() - started

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Admin:
    """Invokes with a window of unanswered requests, retrying each with its idempotency key."""

    def __init__(self, client: aiomqtt.Client, app_version: str) -> None:
        self.client = client
        self.av = app_version
        self.sent_at: dict[int, float] = {}  # seq -> last publish time, while unanswered
        self.ids: dict[int, int] = {}  # seq -> command id from the reply
        self.errors: list[dict[str, Any]] = []

    def topic(self, seq: int) -> str:
        return f"cex/admin/{self.av}/dev{seq % DEVICES}/invoke/reboot/{seq + 1}"

    async def send(self, seq: int) -> None:
        self.sent_at[seq] = time.monotonic()
        body = {"payload": {"seq": seq}, "idempotencyKey": f"seq-{seq}"}
        await self.client.publish(self.topic(seq), json.dumps(body), qos=1)

    def on_reply(self, topic: str, payload: bytes) -> None:
        seq = int(topic.split("/")[-2]) - 1
        body = json.loads(payload)
        if topic.endswith("/status"):
            self.ids[seq] = body["id"]
            self.sent_at.pop(seq, None)
        else:
            self.errors.append(body)  # e.g. 503 while restarting: the retry will try again

    async def retry_stale(self) -> None:
        now = time.monotonic()
        for seq, at in list(self.sent_at.items()):
            if now - at > RETRY_AFTER_S:
                await self.send(seq)


async def pump(client: aiomqtt.Client, admin: Admin, events: Events) -> None:
    async for message in client.messages:
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes) else b""
        if topic.startswith("cex/events/"):
            record = json.loads(payload)
            events[record["id"]].append(record)
        elif topic.endswith(("/status", "/error")):
            admin.on_reply(topic, payload)
        if message.qos > 0:
            client._client.ack(message.mid, message.qos)  # only now: see admin_session


def start_device(broker: MosquittoProcess, app_version: str, n: int) -> subprocess.Popen[bytes]:
    args = ["--broker-url", broker.url, "--app-version", app_version, "--token", f"dev{n}", "--answer", "reboot=200"]
    return subprocess.Popen([*CLI, "device", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def settle(admin: Admin, serve: Serve | Sequence[Serve], events: Events, total: int) -> None:
    """Wait until every invoke is answered and every command has an executed event."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        finals = sum(1 for records in events.values() if any(r["state"] == "executed" for r in records))
        if not admin.sent_at and len(admin.ids) == total and finals >= total:
            return
        await admin.retry_stale()
        await asyncio.sleep(0.2)
    raise AssertionError(
        f"not settled: {len(admin.ids)}/{total} answered, {len(admin.sent_at)} unanswered; "
        f"log tails: {[s.tail() for s in (serve if isinstance(serve, Sequence) else [serve])]}"
    )


async def stored_commands(serve: Serve, app_version: str, limit: int) -> list[Command]:
    """The commands of one app version in the serve's database (SQLite file or PostgreSQL)."""
    query = CommandQuery(app_version=app_version, limit=limit)
    if serve.db_arg.startswith("postgresql://"):
        async with PostgresStore(serve.db_arg) as pg:
            return await pg.history(query)
    async with SqliteStore(serve.db) as sqlite:
        return await sqlite.history(query)


async def check_exactly_once(serve: Serve, admin: Admin, events: Events, total: int) -> None:
    """Every command stored once, executed once, with one consistent final event."""
    stored = await stored_commands(serve, admin.av, total * 2)
    assert len(stored) == total, "a command was lost or created twice"
    assert sorted(c.payload["seq"] for c in stored) == list(range(total))
    assert {c.id for c in stored} == set(admin.ids.values())
    for command in stored:
        assert command.state is CommandState.EXECUTED, command
        assert [r.status_code for r in command.log] == [200], f"command {command.id} logged {command.log}"
        finals = {
            (r["statusCode"], json.dumps(r["resultPayload"])) for r in events[command.id] if r["state"] == "executed"
        }
        assert finals == {(200, json.dumps("OK"))}, f"command {command.id}: final events {finals}"


@contextlib.asynccontextmanager
async def admin_session(broker: MosquittoProcess, admin: Admin, events: Events) -> AsyncIterator[Admin]:
    """The admin's persistent session: replies and events pumped into ``admin`` and ``events``.

    Messages are acknowledged once pumped (aiomqtt internals, as the bridge does): paho would
    acknowledge on receipt, and what arrived after the pump stopped at the end of a phase was then
    gone for good although the broker had delivered it (seen: an outage test missing an executed
    event that the bridge had published and Mosquitto acknowledged). Unacknowledged, the broker
    delivers it again in the next session."""
    client = aiomqtt.Client(
        "127.0.0.1", broker.port, identifier=f"admin-{admin.av}", clean_session=False, max_inflight_messages=1000
    )
    client._client.manual_ack_set(True)  # before connecting: a persistent session delivers at once
    async with client:
        admin.client = client
        await client.subscribe(f"cex/events/{admin.av}/#", qos=1)
        await client.subscribe(f"cex/admin/{admin.av}/+/invoke/reboot/+/+", qos=1)
        pumping = asyncio.create_task(pump(client, admin, events))
        try:
            yield admin
        finally:
            pumping.cancel()
            await asyncio.gather(pumping, return_exceptions=True)


@contextlib.contextmanager
def running_devices(broker: MosquittoProcess, app_version: str) -> Iterator[None]:
    """DEVICES simulated devices answering reboot with 200, killed on exit."""
    devices = [start_device(broker, app_version, n) for n in range(DEVICES)]
    try:
        yield
    finally:
        for device in devices:
            device.kill()
            device.wait()
