"""The console's Rollouts pages over HTTP on a running service: list, dry run, create, progress,
pause / resume / cancel and their refusals, errors naming the field, CSRF, and the live stream."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from broker_bridge.console import session as sessions
from broker_bridge.console.live import LiveEvents
from broker_bridge.console.rollout_routes import RolloutForm, segments, view
from broker_bridge.rollout_service import RolloutService
from broker_bridge.rollouts import DeviceState, Pace, Rollout, RolloutSpec, RolloutState
from broker_bridge.service import CommandService
from tests.conftest import free_port
from tests.harness import WAIT_S, make_settings, running_service

KEY = "console-rollouts-key"
KEY_NAME = "fleet-ops"
T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)

pytestmark = pytest.mark.timeout(120)


# -- pure: the form, the bar, the live fan-out -----------------------------------------------------------
def test_form_becomes_the_api_body_and_a_local_start_is_utc() -> None:
    """Empty fields are left out (the spec's defaults apply); numbers stay text for the spec to judge."""
    form = RolloutForm(command=" reboot ", arguments='{"delay_s": 5}', device_ids="a, b\nc,", labels="site=lab",
                       max_per_minute="10", abort_outcome="TIMEOUT", abort_threshold_percent="20",
                       start_at="2026-12-05T02:00", action="preview")  # fmt: skip
    assert form.spec_body() == {
        "command": {"name": "reboot", "arguments": {"delay_s": 5}},
        "target": {"device_ids": ["a", "b", "c"], "labels": {"site": "lab"}},
        "rate": {"max_per_minute": "10"},
        "retry": {},
        "abort": [{"outcome": "TIMEOUT", "threshold_percent": "20"}],
        "start_at": "2026-12-05T02:00:00+00:00",
        "dry_run": True,
    }
    assert "abort" not in RolloutForm(command="x", device_ids="a").spec_body()


def test_the_bar_gives_each_state_its_share_in_order() -> None:
    spec = RolloutSpec.model_validate({"command": {"name": "x"}, "target": {"device_ids": ["a"]}})
    counts = {DeviceState.QUEUED: 2, DeviceState.SUCCEEDED: 1, DeviceState.FAILED: 1}
    rollout = Rollout(id=1, spec=spec, state=RolloutState.IN_PROGRESS, created_at=T0, updated_at=T0,
                      pace=Pace(per_minute=6.0, since=T0), counts=counts)  # fmt: skip
    assert segments(rollout) == [
        {"state": "succeeded", "count": 1, "x": 0, "width": 25.0},
        {"state": "failed", "count": 1, "x": 25.0, "width": 25.0},
        {"state": "queued", "count": 2, "x": 50.0, "width": 50.0},
    ]
    shown = view(rollout)
    assert (shown["done"], shown["percent"], shown["rate"]) == (2, 50, "6/min")
    assert shown["summary"] == "1 succeeded, 1 failed, 2 queued"
    assert shown["can"] == {"pause": True, "resume": False, "cancel": True}


async def test_live_events_tell_each_rollout_stream_of_its_rollout_only() -> None:
    live = LiveEvents()
    one, every = live.listen_rollouts(1), live.listen_rollouts(None)
    commands = live.listen(None)
    spec = RolloutSpec.model_validate({"command": {"name": "x"}, "target": {"device_ids": ["a"]}})
    for rollout_id in (1, 2):
        live.rollout_changed(Rollout(id=rollout_id, spec=spec, state=RolloutState.PAUSED, created_at=T0,
                                     updated_at=T0, pace=Pace(per_minute=None, since=T0)))  # fmt: skip
    assert one.queue.get_nowait() == 1
    assert one.queue.empty()
    assert [every.queue.get_nowait(), every.queue.get_nowait()] == [1, 2]
    assert commands.queue.empty()  # the command streams hear no rollouts
    live.forget_rollouts(one)
    assert one not in live.rollout_listeners


# -- over HTTP -----------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def site(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, CommandService]]:
    settings = make_settings(tmp_path, free_port(), api_keys=[{"name": KEY_NAME, "key": KEY}])
    async with (
        running_service(settings) as service,
        httpx.AsyncClient(base_url=f"http://{settings.http_listen}", timeout=WAIT_S) as client,
    ):
        yield client, service


async def sign_in(client: httpx.AsyncClient) -> str:
    """Sign in; the session's CSRF token (from the Rollouts page's form)."""
    response = await client.post("/console/login", data={"api_key": KEY})
    assert response.status_code == 303
    client.cookies.set(sessions.COOKIE, response.cookies[sessions.COOKIE])  # httpx keeps Secure cookies off https
    page = await client.get("/console/rollouts")
    assert page.status_code == 200
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert found is not None
    return found.group(1)


async def lab(service: CommandService, n: int = 3) -> None:
    """``n`` registered devices labelled site=lab (they never answer: their commands stay open), and
    one at another site."""
    for i in range(n):
        await service.registry.add(app_version="r-v1", endpoint_token=f"lab{i}", device_id=f"lab-{i}",
                                   labels={"site": "lab"})  # fmt: skip
    await service.registry.add(app_version="r-v1", endpoint_token="hq0", device_id="hq-0", labels={"site": "hq"})


async def make(client: httpx.AsyncClient, csrf: str, **fields: str) -> int:
    """Create a rollout through the form; its id (from the redirect to its page)."""
    response = await client.post("/console/rollouts", data={"csrf": csrf, "action": "create", **fields})
    assert response.status_code == 303, response.text
    found = re.fullmatch(r"/console/rollouts/(\d+)", response.headers["location"])
    assert found is not None
    return int(found.group(1))


def count(page: str, state: str) -> int:
    found = re.search(rf'data-testid="count-{state}">(\d+)<', page)
    assert found is not None, state
    return int(found.group(1))


def shown_state(page: str) -> str:
    found = re.search(r'data-testid="rollout-state">(\w+)<', page)
    assert found is not None
    return found.group(1)


async def test_rollout_pages_need_a_session_and_creating_needs_the_csrf_token(tmp_path: Path) -> None:
    async with site(tmp_path) as (client, service):
        for path in ("/console/rollouts", "/console/rollouts/1"):
            assert (await client.get(path)).status_code == 303, path
        assert (await client.get("/console/events/rollouts")).status_code == 401
        htmx = await client.get("/console/rollouts/1/progress", headers={"HX-Request": "true"})
        assert (htmx.status_code, htmx.headers["HX-Redirect"]) == (401, "/console/login")
        csrf = await sign_in(client)
        await lab(service)
        body = {"command": "reboot", "labels": "site=lab", "action": "create"}
        assert (await client.post("/console/rollouts", data=body)).status_code == 403
        assert (await client.post("/console/rollouts", data={**body, "csrf": "0" * 32})).status_code == 403
        assert (await client.post("/console/rollouts/1/pause", data={})).status_code == 403
        assert await RolloutService(service).page(10, 0) == ([], 0)
        by_header = await client.post("/console/rollouts", data=body, headers={"X-CSRF-Token": csrf, "HX-Request": "1"})
        assert (by_header.status_code, by_header.headers["HX-Redirect"]) == (201, "/console/rollouts/1")
        assert (await RolloutService(service).get(1)).invoked_by == KEY_NAME


async def test_preview_shows_the_devices_and_creates_nothing(tmp_path: Path) -> None:
    async with site(tmp_path) as (client, service):
        csrf = await sign_in(client)
        await lab(service)
        data = {"csrf": csrf, "command": "reboot", "labels": "site=lab", "device_ids": "hq-0", "action": "preview"}
        preview = await client.post("/console/rollouts", data=data)
        assert preview.status_code == 200
        assert 'data-testid="preview-count">4<' in preview.text
        assert re.findall(r"<li><code>([\w-]+)</code></li>", preview.text) == ["hq-0", "lab-0", "lab-1", "lab-2"]
        assert "Nothing was created" in preview.text
        assert await RolloutService(service).page(10, 0) == ([], 0)
        listing = await client.get("/console/rollouts")
        assert "No rollouts yet" in listing.text


async def test_created_rollout_is_listed_and_its_page_shows_the_counts(tmp_path: Path) -> None:
    """One a minute to three devices: one sent at once, two queued; the list and the page say so."""
    async with site(tmp_path) as (client, service):
        csrf = await sign_in(client)
        await lab(service)
        first = await make(client, csrf, command="reboot", labels="site=lab", max_per_minute="1")
        second = await make(client, csrf, command="reboot", device_ids="hq-0", arguments='{"delay_s": 5}',
                            abort_outcome="ANY_FAILURE", abort_threshold_percent="10", timeout_s="300")  # fmt: skip
        listing = await client.get("/console/rollouts")
        assert re.findall(r'<tr data-rollout="(\d+)">', listing.text) == [str(second), str(first)]  # newest first
        row = listing.text[listing.text.index(f'<tr data-rollout="{first}">') :].split("</tr>")[0]
        assert all(part in row for part in ("in_progress", "<code>reboot</code>", "1/min", KEY_NAME,
                                            "0 of 3 done", "1 sent, 2 queued"))  # fmt: skip
        assert re.search(r'<rect class="s-sent" x="0.0" y="0" width="33.333"', row)
        page = await client.get(f"/console/rollouts/{first}")
        assert page.status_code == 200
        assert (count(page.text, "sent"), count(page.text, "queued"), count(page.text, "total")) == (1, 2, 3)
        assert shown_state(page.text) == "in_progress"
        assert '<rect class="s-queued" x="33.333" y="0" width="66.667"' in page.text
        assert "0 of 3 devices done (0%)" in page.text
        other = await client.get(f"/console/rollouts/{second}")
        assert "ANY_FAILURE ≥ 10.0% once 1 executed" in other.text
        assert "&#34;delay_s&#34;: 5" in other.text
        later = await make(client, csrf, command="reboot", device_ids="hq-0", start_at="2999-01-01T00:00")
        scheduled = await client.get(f"/console/rollouts/{later}")
        assert shown_state(scheduled.text) == "scheduled"
        assert "2999-01-01T00:00:00" in scheduled.text
        assert ">Pause<" in scheduled.text
        assert (await client.get("/console/rollouts/999")).status_code == 404


async def test_pause_resume_cancel_work_and_wrong_moves_are_refused(tmp_path: Path) -> None:
    async with site(tmp_path) as (client, service):
        csrf = await sign_in(client)
        await lab(service)
        rid = await make(client, csrf, command="reboot", labels="site=lab", max_per_minute="1")
        rollouts = RolloutService(service)

        async def steer(action: str) -> httpx.Response:
            return await client.post(f"/console/rollouts/{rid}/{action}", data={"csrf": csrf})

        paused = await steer("pause")
        assert (paused.status_code, shown_state(paused.text)) == (200, "paused")
        assert ">Resume<" in paused.text
        assert ">Pause<" not in paused.text
        assert (await rollouts.get(rid)).state is RolloutState.PAUSED
        again = await steer("pause")
        assert again.status_code == 409
        assert "only one in progress or scheduled can pause" in again.text
        assert shown_state(again.text) == "paused"  # the progress as it is, under the refusal
        resumed = await steer("resume")
        assert (resumed.status_code, shown_state(resumed.text)) == (200, "in_progress")
        assert (await steer("resume")).status_code == 409
        cancelled = await steer("cancel")
        assert (cancelled.status_code, shown_state(cancelled.text)) == (200, "cancelled")
        assert not any(f">{b}<" in cancelled.text for b in ("Pause", "Resume", "Cancel"))
        assert "hx-trigger" not in cancelled.text  # finished: it stops refreshing
        assert (await rollouts.get(rid)).state is RolloutState.CANCELLED
        twice = await steer("cancel")
        assert (twice.status_code, "already" in twice.text) == (409, True)
        assert (await steer("resume")).status_code == 409
        missing = await client.post("/console/rollouts/999/pause", data={"csrf": csrf})
        assert missing.status_code == 404


async def test_bad_input_is_shown_naming_the_field(tmp_path: Path) -> None:
    async with site(tmp_path) as (client, service):
        csrf = await sign_in(client)
        await lab(service)
        good = {"csrf": csrf, "command": "reboot", "labels": "site=lab"}
        cases = [
            ({"max_per_minute": "0"}, 422, "rate.max_per_minute"),
            ({"max_in_flight": "many"}, 422, "rate.max_in_flight"),
            ({"abort_outcome": "ERROR", "abort_threshold_percent": "150"}, 422, "abort.0.threshold_percent"),
            ({"abort_outcome": "ERROR"}, 422, "abort.0.threshold_percent"),
            ({"abort_threshold_percent": "10"}, 422, "abort.0.outcome"),
            ({"retry_max_attempts": "0"}, 422, "retry.max_attempts"),
            ({"timeout_s": "-1"}, 422, "timeout_s"),
            ({"start_at": "soon"}, 422, "start_at"),
            ({"command": ""}, 422, "command.name"),
            ({"arguments": "{nope"}, 400, "arguments is not valid JSON"),
            ({"labels": "oops"}, 400, "key=value"),
            ({"labels": "site=mars"}, 422, "target.labels"),
            ({"labels": "", "device_ids": "lab-0, ghost"}, 422, "target.device_ids"),
            ({"labels": ""}, 422, "target"),
        ]
        for change, status, named in cases:
            for action in ("preview", "create"):
                response = await client.post("/console/rollouts", data={**good, **change, "action": action})
                assert (response.status_code, named in response.text) == (status, True), (change, response.text)
                assert 'role="alert"' in response.text
        assert await RolloutService(service).page(10, 0) == ([], 0)


async def test_devices_table_filters_by_state_and_pages(tmp_path: Path) -> None:
    async with site(tmp_path) as (client, service):
        csrf = await sign_in(client)
        await lab(service, 30)
        rid = await make(client, csrf, command="reboot", labels="site=lab", max_in_flight="2")
        devices = f"/console/rollouts/{rid}/devices"
        first = await client.get(devices)
        assert re.findall(r'<tr data-state="(\w+)">', first.text) == ["sent"] * 2 + ["queued"] * 23
        assert "30 in all" in first.text
        assert ">Next<" in first.text
        later = await client.get(devices, params={"offset": 25})
        assert len(re.findall(r'<tr data-state="queued">', later.text)) == 5
        sent = await client.get(devices, params={"state": "sent"})
        assert re.findall(r'href="/console/devices/([\w-]+)"', sent.text) == ["lab-0", "lab-1"]
        assert re.findall(r'href="/console/commands/(\d+)"', sent.text)  # each opens its command
        assert 'hx-trigger="sse:changed' in sent.text  # live while the rollout runs
        bad = await client.get(devices, params={"state": "bogus"})
        assert (bad.status_code, "unknown state" in bad.text) == (400, True)
        assert (await client.get("/console/rollouts/999/devices")).status_code == 404


async def test_events_stream_tells_of_each_change_of_the_rollout(tmp_path: Path) -> None:
    """What refreshes an open rollout page: a ``changed`` event for its own rollout, not others'."""
    async with site(tmp_path) as (client, service):
        csrf = await sign_in(client)
        await lab(service)
        rid = await make(client, csrf, command="reboot", labels="site=lab", max_per_minute="1")
        other = await make(client, csrf, command="reboot", device_ids="hq-0", max_per_minute="1")
        assert (await client.get("/console/events/rollouts", params={"rollout": 999})).status_code == 404
        heard: list[str] = []
        async with client.stream("GET", "/console/events/rollouts", params={"rollout": rid}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            assert await anext(lines) == ": connected"
            await RolloutService(service).pause(other)  # another rollout: not told
            await client.post(f"/console/rollouts/{rid}/pause", data={"csrf": csrf})
            async with asyncio.timeout(WAIT_S):
                while not any(h.startswith("data:") for h in heard):
                    heard.append(await anext(lines))
        assert [h for h in heard if h.startswith("data:")] == [f"data: {rid}"]
        assert "event: changed" in heard
