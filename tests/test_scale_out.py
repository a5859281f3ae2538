"""Several instances on one PostgreSQL database and one Mosquitto, killed -9 and restarted.

Afterwards every acknowledged invoke is exactly one command with exactly one final result, the
commands a careful operator invoked one after another for one device reached it in that order, and
no retained outstanding list on the broker is older than the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import httpx
import pytest

from tests import pg
from tests.conftest import MosquittoProcess, free_port, skip_or_fail
from tests.streams import (
    API_KEY,
    CLI,
    DEVICES,
    WINDOW,
    Admin,
    Events,
    Serve,
    admin_session,
    check_exactly_once,
    running_devices,
    settle,
)

COMMANDS = int(os.environ.get("BROKER_BRIDGE_SCALE_COMMANDS", "10000"))
INSTANCES = 3
KILLS = 5
DOWN_S = 1.0  # a killed instance stays down this long: the broker keeps assigning it its share
ORDERED = 40  # commands invoked one after another (each after the previous reply) for one device


@pytest.mark.slow
@pytest.mark.mosquitto
@pytest.mark.timeout(1200)
async def test_three_instances_killed_9_lose_double_and_reorder_nothing(
    tmp_path: Path, app_version: str, mosquitto: MosquittoProcess, pg_url: str
) -> None:
    """10,000 commands over three instances; five kill -9s, each instance at least once."""
    fleet = [Serve(tmp_path, mosquitto, db=pg_url, instance=f"b{i}") for i in range(INSTANCES)]
    for serve in fleet:
        serve.start()
    events: Events = defaultdict(list)
    admin = Admin(None, app_version)  # type: ignore[arg-type]  # connected by admin_session
    ordered_av = f"{app_version}o"
    device_log = tmp_path / "ordered-device.jsonl"
    started = time.monotonic()
    try:
        with running_devices(mosquitto, app_version), _device(mosquitto, ordered_av, device_log):
            async with admin_session(mosquitto, admin, events):
                in_order = asyncio.create_task(_invoke_one_after_another(mosquitto, ordered_av))
                await _stream(admin, fleet)
                await settle(admin, fleet, events, COMMANDS)
                replied = await in_order
            # Pushes follow their commits asynchronously (the last ones after an instance's restart
            # republishes its retained targets): wait for the broker to settle, then a list that is
            # still not the database's is wrong, not late.
            for _ in range(5):
                retained = await _retained_lists(mosquitto, app_version, ordered_av)
                if not retained:
                    break
    finally:
        for serve in fleet:
            serve.stop()
    elapsed = time.monotonic() - started
    kills = [serve.kills for serve in fleet]
    assert sum(kills) == KILLS
    assert all(k >= 1 for k in kills), kills
    await check_exactly_once(fleet[0], admin, events, COMMANDS)
    received = [e["id"] for e in map(json.loads, device_log.read_text().splitlines()) if e.get("event") == "command"]
    assert replied == sorted(replied), "ids must follow invoke order"
    assert received == replied, "the device got the commands out of order (or not all of them)"
    assert retained == {}, f"retained lists that are not the (empty) outstanding lists: {retained}"
    print(f"\n{COMMANDS} commands on {INSTANCES} instances, kills {kills}, {len(admin.errors)} error replies, "
          f"{elapsed:.1f} s")


async def _stream(admin: Admin, fleet: list[Serve]) -> None:
    """Send every invoke, windowed; at five points kill -9 one instance, restart it DOWN_S later."""
    loop = asyncio.get_running_loop()
    kill_at = {COMMANDS * (k + 1) // (KILLS + 1): k % len(fleet) for k in range(KILLS)}
    for seq in range(COMMANDS):
        while len(admin.sent_at) >= WINDOW:
            await admin.retry_stale()
            await asyncio.sleep(0.01)
        if seq in kill_at:
            victim = fleet[kill_at[seq]]
            victim.kill9()
            loop.call_later(DOWN_S, victim.start)
        await admin.send(seq)


async def _invoke_one_after_another(broker: MosquittoProcess, app_version: str) -> list[int]:
    """Invoke ORDERED commands for one device, each only after the previous one's reply (retrying
    with its idempotency key, as a careful client does across an instance's death); their ids."""
    replies: asyncio.Queue[tuple[int, dict[str, object]]] = asyncio.Queue()
    ids: list[int] = []
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.subscribe(f"cex/admin/{app_version}/ordered/invoke/reboot/+/status", qos=1)

        async def pump() -> None:
            async for message in client.messages:
                rid = int(message.topic.value.split("/")[-2])
                replies.put_nowait((rid, json.loads(message.payload)))  # type: ignore[arg-type]

        pumping = asyncio.create_task(pump())
        try:
            for n in range(ORDERED):
                body = json.dumps({"payload": {"n": n}, "idempotencyKey": f"ordered-{n}"})
                while True:
                    await client.publish(f"cex/admin/{app_version}/ordered/invoke/reboot/{n + 1}", body, qos=1)
                    with contextlib.suppress(TimeoutError):
                        reply = await asyncio.wait_for(_reply_for(replies, n + 1), 4.0)
                        break
                ids.append(int(reply["id"]))  # type: ignore[call-overload]
                await asyncio.sleep(0.2)  # spread over the kills
        finally:
            pumping.cancel()
            await asyncio.gather(pumping, return_exceptions=True)
    return ids


async def _reply_for(replies: asyncio.Queue[tuple[int, dict[str, object]]], rid: int) -> dict[str, object]:
    while True:
        got, body = await replies.get()
        if got == rid:
            return body


@contextlib.contextmanager
def _device(broker: MosquittoProcess, app_version: str, log: Path) -> Iterator[None]:
    """The simulated device of the ordered invokes; it writes each command id as it first sees it."""
    args = ["--broker-url", broker.url, "--app-version", app_version, "--token", "ordered", "--answer", "reboot=200"]
    with log.open("wb") as out:
        device = subprocess.Popen([*CLI, "device", *args], stdout=out, stderr=subprocess.DEVNULL)
        try:
            yield
        finally:
            device.kill()
            device.wait()


async def _retained_lists(broker: MosquittoProcess, app_version: str, ordered_av: str) -> dict[str, object]:
    """The non-empty outstanding lists retained on the broker (every command is executed by now)."""
    topics = [f"kp1/{app_version}/cex/dev{n}/command/reboot/status" for n in range(DEVICES)]
    topics.append(f"kp1/{ordered_av}/cex/ordered/command/reboot/status")
    found: dict[str, object] = {}
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        for topic in topics:
            await client.subscribe(topic, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):  # retained messages arrive right after SUBACK
                async for message in client.messages:
                    body = json.loads(message.payload) if message.payload else []  # type: ignore[arg-type]
                    if body:
                        found[message.topic.value] = body
                    else:  # a push that came after the retained one: the list is empty now
                        found.pop(message.topic.value, None)
    return found


RESTART_COMMANDS = 1500
PG_DOWN_S = 3.0


@pytest.mark.slow
@pytest.mark.mosquitto
@pytest.mark.timeout(900)
async def test_postgres_restarted_under_load_loses_nothing(
    tmp_path: Path, app_version: str, mosquitto: MosquittoProcess
) -> None:
    """PostgreSQL (a server of this test's own) stopped for 3 s under load: the instances answer 503
    meanwhile and log it, reconnect by themselves, and every command still executes exactly once."""
    try:
        server = pg.OwnPostgres()
        server.init()
        server.start()
        server.wait_ready()
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
        skip_or_fail(f"cannot start a PostgreSQL of this test's own: {exc}")
    try:
        url = pg.create_database(server.admin_url)
        fleet = [Serve(tmp_path, mosquitto, db=url, instance=f"r{i}") for i in range(2)]
        for serve in fleet:
            serve.start()
        events: Events = defaultdict(list)
        admin = Admin(None, app_version)  # type: ignore[arg-type]  # connected by admin_session
        try:
            with running_devices(mosquitto, app_version):
                async with admin_session(mosquitto, admin, events):
                    outage = await _stream_with_outage(admin, fleet, server)
                    await settle(admin, fleet, events, RESTART_COMMANDS)
        finally:
            for serve in fleet:
                serve.stop()
        await check_exactly_once(fleet[0], admin, events, RESTART_COMMANDS)
    finally:
        server.remove()
    for serve, (ready, api) in zip(fleet, outage, strict=True):
        assert ready == 503, "readyz must say the store is unavailable"
        assert api == 503, "an API request during the outage must get 503"
        log = serve.log.read_text()
        assert "database unavailable" in log or "store_batch_failed" in log, serve.tail()
    print(f"\nPostgreSQL down {PG_DOWN_S:.0f} s under load: {len(admin.errors)} error replies meanwhile, "
          f"{RESTART_COMMANDS} commands, none lost or duplicated")


async def _stream_with_outage(admin: Admin, fleet: list[Serve], server: pg.OwnPostgres) -> list[tuple[int, int]]:
    """The stream, with PostgreSQL stopped a third of the way in; what each instance's /readyz and
    /v3/devices answered while it was down."""
    answers: list[tuple[int, int]] = []
    for seq in range(RESTART_COMMANDS):
        while len(admin.sent_at) >= WINDOW:
            await admin.retry_stale()
            await asyncio.sleep(0.01)
        if seq == RESTART_COMMANDS // 3:
            await asyncio.to_thread(server.stop, "fast")
            async with httpx.AsyncClient(timeout=10) as http:
                for serve in fleet:
                    assert serve.proc is not None
                    assert serve.proc.poll() is None, f"an instance exited when PostgreSQL stopped: {serve.tail()}"
                    base = f"http://127.0.0.1:{serve.http_port}"
                    ready = await http.get(f"{base}/readyz")
                    api = await http.get(f"{base}/v3/devices", headers={"X-Enapter-Auth-Token": API_KEY})
                    answers.append((ready.status_code, api.status_code))
            await asyncio.sleep(PG_DOWN_S)
            await asyncio.to_thread(server.start)
        await admin.send(seq)
    return answers


@pytest.mark.mosquitto
def test_second_instance_with_a_running_name_is_refused(
    tmp_path: Path, mosquitto: MosquittoProcess, pg_url: str
) -> None:
    """`serve --instance b1` twice on one database: the second exits at once naming the clash; the
    first goes on; another name starts."""
    first = Serve(tmp_path, mosquitto, db=pg_url, instance="b1")
    first.start()
    try:
        deadline = time.monotonic() + 20
        while "service_ready" not in first.tail() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "service_ready" in first.tail()
        argv = [*CLI, "serve", "--db", pg_url, "--broker-url", mosquitto.url, "--instance", "b1"]
        argv += ["--http-listen", f"127.0.0.1:{free_port()}"]
        second = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert second.returncode == 2
        assert "an instance named 'b1' is already running" in second.stderr
        assert "--instance" in second.stderr
        assert first.proc is not None
        assert first.proc.poll() is None
    finally:
        first.stop()
