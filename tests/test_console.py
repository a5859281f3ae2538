"""The console's HTTP side: sign-in and sessions, CSRF, refusals shown verbatim, live events."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from broker_bridge.commands import rfc3339
from broker_bridge.console import session as sessions
from broker_bridge.service import CommandService
from broker_bridge.topics import Target
from tests.conftest import free_port
from tests.harness import WAIT_S, make_settings, running_service

KEY = "console-key"
MANIFEST = '{"commands": {"reboot": {"arguments": {"delay": {"type": "integer", "max": 60}}}}}'


# -- sessions (pure) ---------------------------------------------------------------------------------
def test_session_cookie_round_trip_and_refusals() -> None:
    keys = ("k1", "k2")
    cookie = sessions.open_session(keys, "k2", now=1000.0)
    found = sessions.read_session(keys, cookie, now=1001.0)
    assert found is not None
    assert sessions.csrf_ok(found, found.csrf)
    assert not sessions.csrf_ok(found, "0" * 32)
    assert not sessions.csrf_ok(found, None)
    assert sessions.read_session(keys, cookie, now=1000.0 + sessions.SESSION_S + 1) is None  # expired
    assert sessions.read_session(("k1",), cookie, now=1001.0) is None  # its key was removed
    tampered = cookie.replace(cookie.split(".")[2], str(10**12))  # a later expiry, same signature
    assert sessions.read_session(keys, tampered, now=1001.0) is None
    assert sessions.read_session(keys, "garbage", now=1001.0) is None
    assert sessions.read_session((), cookie, now=1001.0) is None


# -- over HTTP ---------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def site(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, CommandService]]:
    settings = make_settings(tmp_path, free_port(), api_keys=[KEY])
    async with (
        running_service(settings) as service,
        httpx.AsyncClient(base_url=f"http://{settings.http_listen}", timeout=WAIT_S) as client,
    ):
        yield client, service


async def sign_in(client: httpx.AsyncClient) -> str:
    """Sign in; the CSRF token of the session (from a page)."""
    response = await client.post("/console/login", data={"api_key": KEY})
    assert response.status_code == 303
    client.cookies.set(sessions.COOKIE, response.cookies[sessions.COOKIE])  # httpx keeps Secure cookies off https
    page = await client.get("/console/devices")
    assert page.status_code == 200
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert found is not None
    return found.group(1)


async def test_everything_needs_a_session(tmp_path: Path) -> None:
    async with site(tmp_path) as (client, _):
        for path in ("/", "/console/devices", "/console/executions", "/console/devices/x", "/console/commands/1"):
            response = await client.get(path)
            assert response.status_code == 303, path
            assert response.headers["location"].endswith(("/console/login", "/console/devices"))
        htmx = await client.get("/console/devices/x/history", headers={"HX-Request": "true"})
        assert (htmx.status_code, htmx.headers["HX-Redirect"]) == (401, "/console/login")
        assert (await client.get("/console/events")).status_code == 401
        assert (await client.post("/console/devices/x/run", data={"command_type": "reboot"})).status_code == 303
        client.cookies.set(sessions.COOKIE, "forged.cookie.1.0")
        assert (await client.get("/console/devices")).status_code == 303


async def test_sign_in_sets_a_strict_cookie_and_sign_out_clears_it(tmp_path: Path) -> None:
    async with site(tmp_path) as (client, _):
        refused = await client.post("/console/login", data={"api_key": "nope"})
        assert refused.status_code == 401
        assert "not valid" in refused.text
        assert sessions.COOKIE not in refused.cookies
        accepted = await client.post("/console/login", data={"api_key": KEY})
        cookie = accepted.headers["set-cookie"].lower()
        assert all(flag in cookie for flag in ("httponly", "secure", "samesite=strict"))
        csrf = await sign_in(client)
        page = await client.get("/console/devices")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert (await client.post("/console/logout")).status_code == 403  # no CSRF token
        out = await client.post("/console/logout", data={"csrf": csrf})
        assert out.status_code == 303
        assert 'bb_session=""' in out.headers["set-cookie"] or "max-age=0" in out.headers["set-cookie"].lower()


async def test_actions_need_the_sessions_csrf_token(tmp_path: Path) -> None:
    async with site(tmp_path) as (client, service):
        csrf = await sign_in(client)
        device = await service.registry.add(app_version="c-v1", endpoint_token="t1")
        run = f"/console/devices/{device.device_id}/run"
        assert (await client.post(run, data={"command_type": "reboot"})).status_code == 403
        assert (await client.post(run, data={"command_type": "reboot", "csrf": "0" * 32})).status_code == 403
        assert await service.history(_all()) == []
        by_header = await client.post(run, data={"command_type": "reboot"}, headers={"X-CSRF-Token": csrf})
        assert by_header.status_code == 201
        assert "is pending" in by_header.text


async def test_refusals_are_shown_with_the_servers_reason(tmp_path: Path) -> None:
    async with site(tmp_path) as (client, service):
        csrf = await sign_in(client)
        created = await client.post(
            "/console/devices",
            data={"app_version": "c-v1", "endpoint_token": "t1", "device_id": "lamp", "labels": "site=lab",
                  "manifest": MANIFEST, "csrf": csrf},
        )  # fmt: skip
        assert created.status_code == 303
        device = await service.registry.get("lamp")
        assert device.labels == {"site": "lab"}
        run = "/console/devices/lamp/run"

        async def refused(data: dict[str, str]) -> tuple[int, str]:
            response = await client.post(run, data={"csrf": csrf, **data})
            return response.status_code, response.text

        code, text = await refused({"command_type": "reboot", "body": "{nope"})
        assert (code, "Command body is not valid JSON" in text) == (400, True)
        code, text = await refused({"command_type": "reboot", "body": '{"delay": 99}'})
        assert code == 422
        assert "delay" in text
        code, text = await refused({"command_type": "paint"})
        assert code == 422
        code, text = await refused({"command_type": "reboot", "ttl": "soon"})
        assert (code, "Maximum command retention for delivery" in text) == (400, True)
        unknown = await client.post("/console/devices/none/run", data={"csrf": csrf, "command_type": "x"})
        assert unknown.status_code == 404
        bad_labels = await client.post("/console/devices/lamp/edit", data={"csrf": csrf, "labels": "oops"})
        assert (bad_labels.status_code, "key=value" in bad_labels.text) == (400, True)
        assert await service.history(_all()) == []
        ok = await refused({"command_type": "reboot", "body": '{"delay": 5}', "ttl": "30"})
        assert ok[0] == 201
        (command,) = await service.history(_all())
        assert (command.payload, (command.expires_at - command.created_at).total_seconds()) == ({"delay": 5}, 30)
        detail = await client.get(f"/console/commands/{command.id}")
        assert "&#34;delay&#34;: 5" in detail.text
        again = await client.post(f"/console/commands/{command.id}/rerun", data={"csrf": csrf})
        assert (again.status_code, "re-run of" in again.text) == (201, True)
        cancelled = await client.post(f"/console/commands/{command.id}/cancel", data={"csrf": csrf})
        assert cancelled.status_code == 200
        twice = await client.post(f"/console/commands/{command.id}/cancel", data={"csrf": csrf})
        assert (twice.status_code, "already cancelled" in twice.text) == (409, True)
        gone = await client.post("/console/devices/lamp/delete", data={"csrf": csrf})
        assert gone.status_code == 303
        assert (await client.get("/console/devices/lamp")).status_code == 404


async def test_history_filters_and_pages(tmp_path: Path) -> None:
    async with site(tmp_path) as (client, service):
        await sign_in(client)
        device = await service.registry.add(app_version="c-v1", endpoint_token="t1")
        target = Target(app_version="c-v1", endpoint_token="t1", command_type="reboot")
        made = [await service.invoke(target, {"n": n}) for n in range(30)]
        await service.cancel(made[0].id)
        page = await client.get(f"/console/devices/{device.device_id}/history")
        ids = [int(i) for i in re.findall(r'href="/console/commands/(\d+)"', page.text)]
        assert ids == [c.id for c in reversed(made)][:25]  # newest first, one page
        older = await client.get(f"/console/devices/{device.device_id}/history", params={"offset": 25})
        older_ids = [int(i) for i in re.findall(r'href="/console/commands/(\d+)"', older.text)]
        assert older_ids == [c.id for c in reversed(made[:5])]
        cancelled = await client.get(f"/console/devices/{device.device_id}/history", params={"state": "cancelled"})
        assert re.findall(r'href="/console/commands/(\d+)"', cancelled.text) == [str(made[0].id)]
        bad = await client.get(f"/console/devices/{device.device_id}/history", params={"state": "bogus"})
        assert bad.status_code == 400
        fleet = await client.get("/console/executions", params={"partial": 1, "type": "reboot"})
        assert "30 in all" in fleet.text


async def test_device_list_shows_when_each_device_was_last_seen(tmp_path: Path) -> None:
    """A device that has sent nothing says so; one that polled shows the time of its poll (written
    by the once-a-second flush)."""
    async with site(tmp_path) as (client, service):
        await sign_in(client)
        quiet = await service.registry.add(app_version="c-v1", endpoint_token="quiet")
        await service.registry.add(app_version="c-v1", endpoint_token="talks")
        await service.poll(Target(app_version="c-v1", endpoint_token="talks", command_type="reboot"), None)
        page = await client.get("/console/devices")
        for _ in range(int(WAIT_S * 10)):
            if "<time" in page.text:
                break
            await asyncio.sleep(0.1)
            page = await client.get("/console/devices")
        assert "<th>Last seen</th>" in page.text
        stored = await service.store.device_for("c-v1", "talks")
        assert stored is not None
        assert stored.last_seen_at is not None
        assert f'<time datetime="{rfc3339(stored.last_seen_at)}">' in page.text
        row = page.text[page.text.index(quiet.device_id) :].split("</tr>")[0]
        assert "not yet" in row


async def test_events_stream_tells_of_each_change_of_the_device(tmp_path: Path) -> None:
    async with site(tmp_path) as (client, service):
        await sign_in(client)
        device = await service.registry.add(app_version="c-v1", endpoint_token="t1")
        await service.registry.add(app_version="c-v1", endpoint_token="t2")
        mine = Target(app_version="c-v1", endpoint_token="t1", command_type="reboot")
        other = Target(app_version="c-v1", endpoint_token="t2", command_type="reboot")
        heard: list[str] = []
        async with client.stream("GET", "/console/events", params={"device": device.device_id}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            assert await anext(lines) == ": connected"
            await service.invoke(other, None)  # another device: not told
            command = await service.invoke(mine, None)
            await service.cancel(command.id)
            async with asyncio.timeout(WAIT_S):
                while len([h for h in heard if h.startswith("data:")]) < 2:
                    heard.append(await anext(lines))
        assert [h for h in heard if h.startswith("data:")] == [f"data: {command.id}"] * 2
        assert "event: changed" in heard


def _all() -> object:
    from broker_bridge.store import CommandQuery

    return CommandQuery(limit=100)


pytestmark = pytest.mark.timeout(120)


async def test_generated_arguments_are_typed_and_dangerous_commands_need_the_confirmation(tmp_path: Path) -> None:
    async with site(tmp_path) as (client, service):
        csrf = await sign_in(client)
        manifest = {
            "commands": {
                "reboot": {"arguments": {"delay": {"type": "integer", "max": 60}, "fast": {"type": "boolean"},
                                         "level": {"type": "integer", "enum": [1, 2]}}},
                "wipe": {"dangerous": True},
            }
        }  # fmt: skip
        await service.registry.add(app_version="c-v1", endpoint_token="t1", device_id="lamp", manifest=manifest)
        form = await client.get("/console/devices/lamp/arguments", params={"command_type": "reboot"})
        assert 'name="arg:delay"' in form.text
        assert 'max="60"' in form.text
        run = "/console/devices/lamp/run"
        typed = {"csrf": csrf, "command_type": "reboot", "arg:delay": "7", "arg:fast": "true", "arg:level": "2"}
        assert (await client.post(run, data=typed)).status_code == 201
        (command,) = await service.history(_all())
        assert command.payload == {"delay": 7, "fast": True, "level": 2}
        bad = await client.post(run, data={**typed, "arg:delay": "seven"})
        assert (bad.status_code, "delay: expected integer" in bad.text) == (400, True)
        over = await client.post(run, data={**typed, "arg:delay": "99"})
        assert over.status_code == 422  # the manifest's own bound, as on every path
        unconfirmed = await client.post(run, data={"csrf": csrf, "command_type": "wipe"})
        assert (unconfirmed.status_code, "confirm" in unconfirmed.text) == (409, True)
        confirmed = await client.post(run, data={"csrf": csrf, "command_type": "wipe", "confirmed": "yes"})
        assert confirmed.status_code == 201
        assert len(await service.history(_all())) == 2
