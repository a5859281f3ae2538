"""Fleet rollouts on a running service: HTTP, MQTT and the CLI, devices answering over MQTT, and a
kill -9 in the middle of a rollout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest

from broker_bridge.config import Settings, load_settings
from tests.conftest import free_port, wait_for_port
from tests.harness import WAIT_S, make_settings, probe, running_service

KEY = "rollout-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@contextlib.asynccontextmanager
async def answering(port: int, av: str, token: str, seen: dict[str, list[int]]) -> AsyncIterator[None]:
    """A device that answers every pushed command once with 200, recording the ids it was handed."""
    push = f"kp1/{av}/cex/{token}/command/reboot/status"
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"dev-{token}") as client:
        await client.subscribe(push, qos=1)

        async def answer() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                for item in json.loads(message.payload):
                    if item["id"] not in seen.setdefault(token, []):
                        seen[token].append(item["id"])
                        result = [{"id": item["id"], "statusCode": 200}]
                        await client.publish(f"kp1/{av}/cex/{token}/result/reboot", json.dumps(result), qos=1)

        task = asyncio.create_task(answer())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def register(http: httpx.AsyncClient, av: str, n: int, site: str = "lab") -> None:
    for i in range(n):
        body = {"id": f"{site}-{i}", "app_version": av, "endpoint_token": f"{site}{i}", "labels": {"site": site}}
        assert (await http.post("/v3/devices", json=body)).status_code == 201


async def until(http: httpx.AsyncClient, rollout_id: int, state: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for _ in range(int(WAIT_S / 0.1)):
        found = (await http.get(f"/v3/rollouts/{rollout_id}")).json()["rollout"]
        if found["state"] == state:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"rollout {rollout_id} is {found.get('state')}: {found.get('counts')}")


async def test_rollout_over_http_reaches_every_device_once(tmp_path: Path, app_version: str) -> None:
    """A labels rollout with max_in_flight 2 to 6 answering devices: each gets exactly one command,
    the rollout completes with 6 succeeded, and its events follow it on cex/events/rollouts/{id}."""
    port = free_port()
    settings = make_settings(tmp_path, port, api_keys=[{"name": "fleet-ops", "key": KEY}])
    seen: dict[str, list[int]] = {}
    async with (
        running_service(settings),
        httpx.AsyncClient(base_url=f"http://{settings.http_listen}", headers=AUTH, timeout=WAIT_S) as http,
    ):
        await register(http, app_version, 6)
        await register(http, app_version, 2, site="hq")
        async with contextlib.AsyncExitStack() as devices:
            for i in range(6):
                await devices.enter_async_context(answering(port, app_version, f"lab{i}", seen))
            async with probe(port, "cex/events/rollouts/#") as monitor:
                body = {
                    "command": {"name": "reboot", "arguments": {"delay_s": 1}},
                    "target": {"labels": {"site": "lab"}},
                    "rate": {"max_in_flight": 2},
                }
                preview = await http.post("/v3/rollouts", json={**body, "dry_run": True})
                assert (preview.status_code, preview.json()["count"]) == (200, 6)
                created = await http.post("/v3/rollouts", json=body)
                assert created.status_code == 201, created.text
                record = created.json()["rollout"]
                assert (record["invoked_by"], record["total"]) == ("fleet-ops", 6)
                assert record["counts"]["sent"] == 2
                done = await until(http, record["id"], "completed")
                assert done["counts"]["succeeded"] == 6
                final = await monitor.wait_for(lambda s: s.json()["state"] == "completed")
                assert final.topic == f"cex/events/rollouts/{record['id']}"
        assert sorted(seen) == [f"lab{i}" for i in range(6)]
        assert all(len(ids) == 1 for ids in seen.values())
        members = (await http.get(f"/v3/rollouts/{record['id']}/devices", params={"state": "succeeded"})).json()
        assert members["total_count"] == 6
        assert {m["command_id"] for m in members["devices"]} == {ids[0] for ids in seen.values()}
        listed = (await http.get("/v3/rollouts")).json()
        assert [r["id"] for r in listed["rollouts"]] == [record["id"]]
        # Bad input: a clear 4xx naming the field.
        zero = await http.post("/v3/rollouts", json={**body, "rate": {"max_per_minute": 0}})
        assert zero.status_code == 422
        assert zero.json()["reasonPhrase"].startswith("rate.max_per_minute")
        nobody = await http.post("/v3/rollouts", json={**body, "target": {"labels": {"site": "moon"}}})
        assert (nobody.status_code, nobody.json()["reasonPhrase"]) == (
            422,
            "target.labels: no device carries site:moon",
        )
        assert (await http.post(f"/v3/rollouts/{record['id']}/pause")).status_code == 409
        assert (await http.get("/v3/rollouts/999999")).status_code == 404
        # Over MQTT: the same body, the reply on /status or /error.
        async with probe(port) as admin:
            reply = await admin.request("cex/admin/rollouts/create/1", {**body, "dry_run": True})
            assert (reply.topic.endswith("/status"), reply.json()["count"]) == (True, 6)
            refused = await admin.request("cex/admin/rollouts/create/2", {**body, "abort": [{"outcome": "ERROR"}]})
            assert refused.topic.endswith("/error")
            assert refused.json()["statusCode"] == 422
            assert refused.json()["reasonPhrase"].startswith("abort.0.threshold_percent")


def _serve(tmp_path: Path, port: int, http_port: int) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "broker_bridge.cli", "serve", "--db", str(tmp_path / "bridge.db")]
    argv += ["--mqtt-listen", f"127.0.0.1:{port}", "--http-listen", f"127.0.0.1:{http_port}", "--log-level", "warning"]
    env = {**os.environ, "BROKER_BRIDGE_API_KEYS": json.dumps([KEY])}
    with (tmp_path / "serve.log").open("ab") as out:
        server = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    wait_for_port(http_port)
    wait_for_port(port)
    return server


@pytest.mark.slow
async def test_kill_9_mid_rollout_sends_no_device_a_second_command(tmp_path: Path, app_version: str) -> None:
    """A rate-limited rollout to 30 devices, serve killed -9 twice while it runs, then restarted:
    it completes, every device got exactly one command, and the counters equal the device states."""
    port, http_port = free_port(), free_port()
    base = f"http://127.0.0.1:{http_port}"
    seen: dict[str, list[int]] = {}
    server = _serve(tmp_path, port, http_port)
    try:
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=WAIT_S) as http:
            await register(http, app_version, 30)
            body = {
                "command": {"name": "reboot"},
                "target": {"labels": {"site": "lab"}},
                "rate": {"max_per_minute": 600},
            }
            created = await http.post("/v3/rollouts", json=body)
            assert created.status_code == 201, created.text
            rollout_id = created.json()["rollout"]["id"]
        for _ in range(2):
            await asyncio.sleep(0.7)  # about 7 more sent
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=10)
            server = _serve(tmp_path, port, http_port)
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=WAIT_S) as http:
            async with contextlib.AsyncExitStack() as devices:
                for i in range(30):
                    await devices.enter_async_context(answering(port, app_version, f"lab{i}", seen))
                for _ in range(int(3 * WAIT_S / 0.2)):
                    found = (await http.get(f"/v3/rollouts/{rollout_id}")).json()["rollout"]
                    if found["state"] == "completed":
                        break
                    await asyncio.sleep(0.2)
                assert found["state"] == "completed", found["counts"]
            members = (await http.get(f"/v3/rollouts/{rollout_id}/devices", params={"limit": 100})).json()
            listed = (await http.get("/v3/devices/lab-0/command_executions", params={"show": "ALL"})).json()
        assert found["counts"]["succeeded"] == 30
        assert [m["attempt"] for m in members["devices"]] == [1] * 30
        assert all(len(ids) == 1 for ids in seen.values()), seen
        assert listed["total_count"] == 1  # one command for this device, across the two crashes
    finally:
        server.terminate()
        server.wait(timeout=15)


@pytest.mark.mosquitto
async def test_two_instances_drive_one_rollout_never_twice(
    tmp_path: Path, app_version: str, mosquitto: Any, pg_url: str
) -> None:
    """Two instances on one PostgreSQL database and one Mosquitto both step every active rollout;
    each step locks the rollout's row (a locked one is skipped), so 20 devices get one command each."""
    seen: dict[str, list[int]] = {}

    def instance(name: str) -> Settings:
        return load_settings(
            db=pg_url, broker_url=mosquitto.url, api_keys=[KEY], instance=name,
            http_listen=f"127.0.0.1:{free_port()}", client_id=f"bridge-{name}-{mosquitto.port}",
        )  # fmt: skip

    one, two = instance("b1"), instance("b2")
    async with running_service(one), running_service(two):
        async with httpx.AsyncClient(base_url=f"http://{one.http_listen}", headers=AUTH, timeout=WAIT_S) as http:
            await register(http, app_version, 20)
            async with contextlib.AsyncExitStack() as devices:
                for i in range(20):
                    await devices.enter_async_context(answering(mosquitto.port, app_version, f"lab{i}", seen))
                body = {
                    "command": {"name": "reboot"},
                    "target": {"labels": {"site": "lab"}},
                    "rate": {"max_per_minute": 600},
                }
                created = await http.post("/v3/rollouts", json=body)
                assert created.status_code == 201, created.text
                rollout_id = created.json()["rollout"]["id"]
                async with httpx.AsyncClient(base_url=f"http://{two.http_listen}", headers=AUTH) as other:
                    done = await until(other, rollout_id, "completed")
        assert done["counts"]["succeeded"] == 20
        assert sorted(len(ids) for ids in seen.values()) == [1] * 20


def _cli(db: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "broker_bridge.cli",
        *args,
        "--db",
        str(db),
        "--mqtt-listen",
        f"127.0.0.1:{free_port()}",
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, input=stdin)


def test_rollout_from_the_cli(tmp_path: Path, app_version: str) -> None:
    """create (dry run and real, from a file or stdin), list, show, devices and cancel; a bad spec
    is one line naming the field."""
    db = tmp_path / "cli.db"
    for i in range(3):
        added = _cli(
            db,
            "devices",
            "add",
            "--app-version",
            app_version,
            "--token",
            f"t{i}",
            "--id",
            f"d{i}",
            "--label",
            "site=lab",
        )
        assert added.returncode == 0, added.stderr
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {"command": {"name": "reboot"}, "target": {"labels": {"site": "lab"}}, "rate": {"max_per_minute": 1}}
        )
    )
    preview = _cli(db, "rollout", "create", str(spec), "--dry-run", "--json")
    assert preview.returncode == 0, preview.stderr
    assert json.loads(preview.stdout)["count"] == 3
    made = _cli(db, "rollout", "create", "-", "--json", stdin=spec.read_text())
    assert made.returncode == 0, made.stderr
    record = json.loads(made.stdout)
    assert (record["state"], record["counts"]["sent"], record["counts"]["queued"]) == ("in_progress", 1, 2)
    assert record["invoked_by"].startswith("cli:")
    listed = _cli(db, "rollout", "list", "--json")
    assert [r["id"] for r in json.loads(listed.stdout)] == [record["id"]]
    shown = _cli(db, "rollout", "show", str(record["id"]))
    assert shown.returncode == 0
    assert f"rollout {record['id']}: in_progress" in shown.stdout
    assert "1/3" not in shown.stdout  # nothing is done yet
    members = _cli(db, "rollout", "devices", str(record["id"]), "--state", "queued", "--json")
    assert [m["device_id"] for m in json.loads(members.stdout)] == ["d1", "d2"]
    cancelled = _cli(db, "rollout", "cancel", str(record["id"]), "--json")
    assert json.loads(cancelled.stdout)["counts"]["cancelled"] == 3
    spec.write_text(json.dumps({"command": {"name": "reboot"}, "target": {}}))
    bad = _cli(db, "rollout", "create", str(spec))
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == ["broker-bridge: error 422: target: give device_ids, labels or both"]
