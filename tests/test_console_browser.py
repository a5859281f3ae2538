"""The console in a real browser (Debian's headless Chromium driven by Playwright): sign in, run a
command on a device the simulator serves and watch it go from Pending to Executed without a reload,
open it, re-run it, cancel a pending one, refuse a body that is not JSON, and load nothing from
anywhere but the service. Also /docs renders offline."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker_bridge.config import BrokerAddress
from broker_bridge.device import Answer, DeviceSimulator
from broker_bridge.service import CommandService
from tests.conftest import free_port, skip_or_fail
from tests.harness import make_settings, running_service

KEY = "console-test-key"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()
SCREENSHOTS_ENV = "BROKER_BRIDGE_SCREENSHOT_DIR"  # also save the screenshots there (README's pictures)
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 15_000

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        skip_or_fail("Playwright for Python is not installed (pip install playwright)")
    if not HAVE_CHROMIUM:
        skip_or_fail("no Chromium (Debian package 'chromium')")
    async with async_playwright() as driver:
        launched = await driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield launched
        finally:
            await launched.close()


@contextlib.asynccontextmanager
async def console_site(tmp_path: Path, app_version: str) -> AsyncIterator[tuple[str, CommandService, str]]:
    """The service (embedded broker) and a simulated device answering reboot after 1.5 s."""
    port = free_port()
    settings = make_settings(tmp_path, port, api_keys=[KEY], sweep_interval_s=0.2)
    async with running_service(settings) as service:
        simulator = DeviceSimulator(
            address=BrokerAddress(host="127.0.0.1", port=port),
            app_version=app_version,
            token="lamp1",
            answers={"reboot": Answer(status_code=200, delay_s=1.5)},
            out=io.StringIO(),
        )
        running = asyncio.create_task(simulator.run())
        try:
            device = None
            for _ in range(200):  # the simulator's first poll registers it (open registry)
                device = await service.store.device_for(app_version, "lamp1")
                if device is not None:
                    break
                await asyncio.sleep(0.05)
            assert device is not None, "the simulated device never polled"
            yield f"http://{settings.http_listen}", service, device.device_id
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)


async def _shot(page: Any, tmp_path: Path, name: str) -> None:
    await page.screenshot(path=str(tmp_path / name), full_page=True)
    target = os.environ.get(SCREENSHOTS_ENV)
    if target:
        shutil.copy(tmp_path / name, Path(target) / name)


async def test_operator_runs_watches_reruns_and_cancels_in_the_console(
    browser: Any, tmp_path: Path, app_version: str
) -> None:
    async with console_site(tmp_path, app_version) as (base, service, device_id):
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))

        await page.goto(f"{base}/")  # not signed in: the sign-in form
        await page.get_by_label("API key").fill("wrong")
        await page.get_by_role("button", name="Sign in").click()
        await page.get_by_role("alert").filter(has_text="not valid").wait_for(timeout=WAIT_MS)
        await page.get_by_label("API key").fill(KEY)
        await page.get_by_role("button", name="Sign in").click()
        await page.get_by_role("link", name=device_id).click()
        await page.get_by_role("heading", name="Command execution").wait_for(timeout=WAIT_MS)

        # A body that is not JSON is refused in the page; nothing is stored.
        await page.get_by_label("Command type").fill("reboot")
        await page.get_by_label("Command body").fill("{not json")
        await page.get_by_role("button", name="Run", exact=True).click()
        await page.get_by_role("alert").filter(has_text="not valid JSON").wait_for(timeout=WAIT_MS)
        assert await service.history(_all()) == []

        # Run: pending at once, executed 1.5 s later, without a reload.
        await page.get_by_label("Command body").fill('{"delay": 1}')
        await page.get_by_label("Maximum command retention for delivery").fill("120")
        await page.get_by_role("button", name="Run", exact=True).click()
        history = page.get_by_role("table", name="Commands history")
        row = history.locator("tbody tr").first
        await row.get_by_text("Pending").wait_for(timeout=WAIT_MS)
        await row.get_by_text("Executed").wait_for(timeout=WAIT_MS)
        await _shot(page, tmp_path, "console-device.png")
        first = (await service.history(_all()))[0]

        # Open it: both payloads and the log.
        await history.get_by_role("link", name=str(first.id)).click()
        detail = page.get_by_role("article", name=f"Command {first.id}")
        await detail.get_by_label("Request payload").filter(has_text='"delay": 1').wait_for(timeout=WAIT_MS)
        await detail.get_by_label("Result payload").filter(has_text="OK").wait_for(timeout=WAIT_MS)
        await detail.get_by_label("Log").filter(has_text="200").wait_for(timeout=WAIT_MS)

        # Re-run it: a second command that executes too.
        await detail.get_by_role("button", name="Re-run").click()
        rerun = page.get_by_role("article", name=f"Command {first.id + 1}")
        await rerun.get_by_text("re-run of").wait_for(timeout=WAIT_MS)
        rerun_row = history.locator("tbody tr").filter(has=page.get_by_role("link", name=str(first.id + 1), exact=True))
        await rerun_row.get_by_text("Executed").wait_for(timeout=WAIT_MS)
        again = await service.get(first.id + 1)
        assert (again.rerun_of, again.payload, again.status_code) == (first.id, {"delay": 1}, 200)

        # Cancel a pending one (a type the device does not answer).
        await page.get_by_label("Command type").fill("paint")
        await page.get_by_label("Command body").fill("")
        await page.get_by_role("button", name="Run", exact=True).click()
        created = page.get_by_role("status").filter(has_text="paint")
        await created.get_by_role("link", name=str(first.id + 2)).click()
        pending = page.get_by_role("article", name=f"Command {first.id + 2}")
        await pending.get_by_role("button", name="Cancel").click()
        await page.get_by_role("article", name=f"Command {first.id + 2}").get_by_text("cancelled").first.wait_for(
            timeout=WAIT_MS
        )
        assert (await service.get(first.id + 2)).state.value == "cancelled"
        await _shot(page, tmp_path, "console-history.png")

        # At a phone's width the page still fits and the widgets stay usable.
        await page.set_viewport_size({"width": 390, "height": 844})
        await page.get_by_role("button", name="Run", exact=True).scroll_into_view_if_needed()
        assert await page.get_by_role("button", name="Run", exact=True).is_visible()
        overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow} px wider than a phone's screen"
        await _shot(page, tmp_path, "console-phone.png")
        await page.set_viewport_size({"width": 1280, "height": 900})

        # The fleet view, and the API docs offline.
        await page.get_by_role("link", name="Executions").click()
        await page.get_by_role("table", name="Commands history").get_by_text("paint").wait_for(timeout=WAIT_MS)
        await page.goto(f"{base}/docs")
        await page.get_by_text("broker-bridge").first.wait_for(timeout=WAIT_MS)
        await page.locator(".swagger-ui .opblock").first.wait_for(timeout=WAIT_MS)

        outside = [u for u in requested if not u.startswith(base)]
        assert outside == [], f"the console loaded from outside the service: {outside}"
        await page.close()


async def test_signed_out_pages_refuse_and_sign_out_ends_the_session(
    browser: Any, tmp_path: Path, app_version: str
) -> None:
    async with console_site(tmp_path, app_version) as (base, _service, device_id):
        page = await browser.new_page()
        await page.goto(f"{base}/console/devices/{device_id}")
        await page.get_by_label("API key").wait_for(timeout=WAIT_MS)  # sent to the sign-in form
        await page.get_by_label("API key").fill(KEY)
        await page.get_by_role("button", name="Sign in").click()
        await page.get_by_role("heading", name="Devices").wait_for(timeout=WAIT_MS)
        cookies = {c["name"]: c for c in await page.context.cookies()}
        session = cookies["bb_session"]
        assert (session["httpOnly"], session["secure"], session["sameSite"]) == (True, True, "Strict")
        await page.get_by_role("button", name="Sign out").click()
        await page.get_by_label("API key").wait_for(timeout=WAIT_MS)
        await page.goto(f"{base}/console/executions")
        await page.get_by_label("API key").wait_for(timeout=WAIT_MS)
        await page.close()


def _all() -> Any:
    from broker_bridge.store import CommandQuery

    return CommandQuery(limit=100)


async def test_manifest_commands_get_a_generated_form_and_dangerous_ones_a_confirmation(
    browser: Any, tmp_path: Path, app_version: str
) -> None:
    """With a manifest, Command type is a choice, the arguments are typed fields (the payload is
    built from them), and a command marked dangerous runs only after the operator confirms."""
    async with console_site(tmp_path, app_version) as (base, service, device_id):
        manifest = {
            "commands": {
                "reboot": {"arguments": {"delay": {"type": "integer", "max": 60, "required": True},
                                         "mode": {"type": "string", "enum": ["soft", "hard"]}}},
                "wipe": {"dangerous": True, "description": "Factory reset"},
            }
        }  # fmt: skip
        await service.registry.update(device_id, manifest=manifest)
        page = await browser.new_page()
        answers: list[bool] = [False, True]  # dismiss the first confirmation, accept the second
        asked: list[str] = []

        async def answer(dialog: Any) -> None:
            asked.append(dialog.message)
            await (dialog.accept() if answers.pop(0) else dialog.dismiss())

        page.on("dialog", lambda dialog: asyncio.ensure_future(answer(dialog)))
        await page.goto(f"{base}/console/login")
        await page.get_by_label("API key").fill(KEY)
        await page.get_by_role("button", name="Sign in").click()
        await page.goto(f"{base}/console/devices/{device_id}")
        # Choosing a type fetches its fields (htmx) and replaces the ones shown: fill them only once
        # that is done, or the values typed go into fields about to be replaced (a flaky run did).
        settled = "new Promise(done => document.body.addEventListener('htmx:afterSettle', "
        settled += "event => event.detail.target.id === 'arguments' && done(true)))"
        await page.evaluate(f"() => {{ window.argumentsSettled = {settled}; }}")
        await page.get_by_label("Command type").select_option("reboot")
        await page.evaluate("() => window.argumentsSettled")
        await page.get_by_label("delay (required)").fill("5")
        await page.get_by_label("mode").select_option("hard")
        await page.get_by_role("button", name="Run", exact=True).click()
        await page.get_by_role("status").filter(has_text="reboot").wait_for(timeout=WAIT_MS)
        (first,) = await service.history(_all())
        assert first.payload == {"delay": 5, "mode": "hard"}

        await page.get_by_label("Command type").select_option("wipe")
        await page.get_by_text("Marked dangerous").wait_for(timeout=WAIT_MS)
        await page.get_by_role("button", name="Run", exact=True).click()  # dismissed: nothing is sent
        await asyncio.sleep(0.5)
        assert len(await service.history(_all())) == 1
        await page.get_by_role("button", name="Run", exact=True).click()  # confirmed
        await page.get_by_role("status").filter(has_text="wipe").wait_for(timeout=WAIT_MS)
        assert [c.target.command_type for c in await service.history(_all())] == ["wipe", "reboot"]
        assert asked == ["wipe is marked dangerous in the manifest. Run it?"] * 2
        await page.close()
