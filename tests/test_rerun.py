"""Re-run on every path: the service, HTTP /v3 and Kaa REST, the CLI and the MQTT admin tree."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from broker_bridge.cli import main
from broker_bridge.commands import CommandState
from broker_bridge.devices import Device, parse_manifest
from broker_bridge.errors import CommandNotFound, Unprocessable
from broker_bridge.service import CommandService
from broker_bridge.store.memory import MemoryStore
from broker_bridge.topics import Target
from tests.conftest import free_port
from tests.harness import probe
from tests.test_api import DEVICE, Api, api, create_execution, get_execution, register

__all__ = ["api"]  # the fixture, shared with test_api

REBOOT = Target(app_version="app-v1", endpoint_token="dev1", command_type="reboot")


async def test_rerun_repeats_device_type_payload_and_ttl_and_leaves_the_original() -> None:
    """A new pending command, same target and payload, the original's TTL, rerunOf set."""
    service = CommandService(MemoryStore())
    original = await service.invoke(REBOOT, {"delay": 5}, 120)
    again = await service.rerun(original.id)
    assert again.id > original.id
    assert (again.target, again.payload, again.rerun_of) == (original.target, {"delay": 5}, original.id)
    assert again.state is CommandState.PENDING
    assert again.expires_at - again.created_at == timedelta(seconds=120)
    assert await service.get(original.id) == original  # nothing recorded on the original
    shorter = await service.rerun(original.id, 10)
    assert shorter.expires_at - shorter.created_at == timedelta(seconds=10)


async def test_rerun_of_another_target_or_an_unknown_id_is_not_found() -> None:
    """Like a cancel, a re-run names the command's own endpoint and type, or finds nothing."""
    service = CommandService(MemoryStore())
    original = await service.invoke(REBOOT, None)
    other = Target(app_version="app-v1", endpoint_token="dev2", command_type="reboot")
    with pytest.raises(CommandNotFound):
        await service.rerun(original.id, target=other)
    with pytest.raises(CommandNotFound):
        await service.rerun(original.id + 100)


async def test_rerun_is_checked_against_todays_manifest_and_keeps_the_alias() -> None:
    """The manifest applies as to any invoke: an alias stays the name used; a command the manifest
    no longer has is refused."""
    store = MemoryStore()
    service = CommandService(store)
    manifest = parse_manifest({"commands": {"reboot": {"aliases": ["restart"], "arguments": {}}}})
    device = await service.registry.add(app_version="app-v1", endpoint_token="dev1", manifest=manifest.model_dump())
    aliased = Target(app_version="app-v1", endpoint_token="dev1", command_type="restart")
    original = await service.invoke(aliased, {})
    again = await service.rerun(original.id)
    assert (again.target.command_type, again.request_name) == ("reboot", "restart")
    await service.registry.update(device.device_id, manifest={"commands": {"zero": {}}})
    with pytest.raises(Unprocessable):
        await service.rerun(original.id)
    assert isinstance(device, Device)


async def test_http_v3_rerun(api: Api) -> None:
    """POST .../command_executions/{id}/rerun: a new execution; ?wait= returns it once final."""
    await register(api)
    first = await create_execution(api, {"name": "reboot"})
    response = await api.client.post(f"/v3/devices/{DEVICE}/command_executions/{first}/rerun")
    assert response.status_code == 200, response.text
    second = response.json()["execution_id"]
    assert int(second) > int(first)
    execution = await get_execution(api, second)
    assert execution["rerun_of"] == first
    assert execution["request"]["name"] == "reboot"
    assert "rerun_of" not in await get_execution(api, first)
    response = await api.client.post(
        f"/v3/devices/{DEVICE}/command_executions/{first}/rerun", params={"wait": 0.2}, json={"ttl": 30}
    )
    assert response.status_code == 200, response.text
    assert response.json()["execution"]["state"] == "NEW"  # nobody answered within 0.2 s
    missing = await api.client.post(f"/v3/devices/{DEVICE}/command_executions/999999/rerun")
    assert missing.status_code == 404
    bad = await api.client.post(f"/v3/devices/{DEVICE}/command_executions/{first}/rerun", json={"ttl": -1})
    assert bad.status_code in (400, 422)


async def test_http_v3_rerun_of_another_devices_execution_is_not_found(api: Api) -> None:
    await register(api)
    await register(api, device_id="dev-2", token="tok2", manifest=None)
    first = await create_execution(api, {"name": "reboot"})
    response = await api.client.post(f"/v3/devices/dev-2/command_executions/{first}/rerun")
    assert response.status_code == 404


async def test_kaa_rest_rerun(api: Api) -> None:
    """POST /api/v1/endpoints/{id}/commands/{type}/{commandId}/rerun: 202 with the new command."""
    await register(api, manifest=None)
    invoked = await api.client.post(f"/api/v1/endpoints/{DEVICE}/commands/reboot", json={"delay": 1})
    assert invoked.status_code == 202, invoked.text
    original = invoked.json()
    response = await api.client.post(f"/api/v1/endpoints/{DEVICE}/commands/reboot/{original['id']}/rerun")
    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["rerunOf"], body["payload"], body["state"]) == (original["id"], {"delay": 1}, "Pending")
    assert response.headers["Location"].endswith(f"/commands/reboot/{body['id']}")
    wrong_type = await api.client.post(f"/api/v1/endpoints/{DEVICE}/commands/zero/{original['id']}/rerun")
    assert wrong_type.status_code == 404


async def test_mqtt_admin_rerun(api: Api) -> None:
    """cex/admin/{av}/{token}/rerun/{type}/{id}/{rid}: the reply is the new command's record, and
    the device gets it pushed."""
    async with probe(api.mqtt_port, api.topic("command/reboot/status")) as client:
        invoked = await client.request(api.admin_topic("invoke/reboot/1"), {"payload": {"n": 1}})
        original = invoked.json()
        reply = await client.request(api.admin_topic(f"rerun/reboot/{original['id']}/2"), b"")
        assert reply.topic.endswith("/status"), reply.payload
        record = reply.json()
        assert (record["rerunOf"], record["payload"], record["state"]) == (original["id"], {"n": 1}, "pending")
        pushed = await client.wait_for(
            lambda s: s.topic == api.topic("command/reboot/status") and record["id"] in [i["id"] for i in s.json()]
        )
        assert pushed.json()[-1] == {"id": record["id"], "payload": {"n": 1}}
        refused = await client.request(api.admin_topic(f"rerun/zero/{original['id']}/3"), b"")
        assert refused.topic.endswith("/error")
        assert refused.json()["statusCode"] == 404
        bad = await client.request(api.admin_topic(f"rerun/reboot/{original['id']}/4"), {"ttl": "soon"})
        assert bad.json()["statusCode"] == 400


def test_cli_rerun(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """broker-bridge rerun ID [--ttl S] [--json]; an unknown id exits 1 naming it."""
    db = tmp_path / "b.db"

    def cli(*args: str) -> tuple[int, str, str]:
        code = main([*args, "--db", str(db), "--mqtt-listen", f"127.0.0.1:{free_port()}"])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = cli("invoke", "a-v1", "t1", "reboot", "--payload", '{"x": 1}', "--ttl", "60", "--json")
    assert code == 0, err
    original = json.loads(out)
    code, out, err = cli("rerun", str(original["id"]), "--json")
    assert code == 0, err
    again = json.loads(out)
    assert (again["rerunOf"], again["payload"], again["commandType"]) == (original["id"], {"x": 1}, "reboot")
    code, out, err = cli("rerun", str(original["id"]), "--ttl", "5", "--json")
    assert code == 0, err
    assert json.loads(out)["id"] == again["id"] + 1
    code, _, err = cli("rerun", "999")
    assert code == 1
    assert "no command 999" in err
