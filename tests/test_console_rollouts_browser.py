"""The Rollouts page in a real browser (Debian's headless Chromium driven by Playwright, as in
test_console_browser): preview a rollout, create it through the form, watch its page follow it live
to the abort rule that trips, filter its devices; then pause, resume and cancel another."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from broker_bridge.keys import name_of
from broker_bridge.rollout_service import RolloutService
from broker_bridge.rollouts import RolloutState
from tests.test_console_browser import KEY, WAIT_MS, _shot, browser, console_site

__all__ = ["browser"]  # the fixture, shared with test_console_browser

pytestmark = pytest.mark.timeout(180)


async def test_operator_previews_creates_and_watches_a_rollout(browser: Any, tmp_path: Path, app_version: str) -> None:
    """The simulated device answers in 1.5 s, two registered ones never do: with a 3 s timeout and
    "abort at 50 % timeouts once 3 executed", the page shows 1 succeeded, then 2 timed out and the
    rule that tripped, without a reload."""
    async with console_site(tmp_path, app_version) as (base, service, device_id):
        for token in ("quiet1", "quiet2"):
            await service.registry.add(app_version=app_version, endpoint_token=token, device_id=token)
        rollouts = RolloutService(service)
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await page.goto(f"{base}/console/login")
        await page.get_by_label("API key").fill(KEY)
        await page.get_by_role("button", name="Sign in").click()
        await page.get_by_role("link", name="Rollouts").click()
        await page.get_by_role("heading", name="New rollout").wait_for(timeout=WAIT_MS)

        # A bad value is refused in the page, naming the field; nothing is created.
        await page.get_by_label("Command name").fill("reboot")
        await page.get_by_label("Device ids (comma-separated)").fill(f"{device_id}, quiet1, quiet2")
        await page.get_by_label("Max per minute").fill("0")
        await page.get_by_role("button", name="Create").click()
        await page.get_by_role("alert").filter(has_text="rate.max_per_minute").wait_for(timeout=WAIT_MS)
        await page.get_by_label("Max per minute").fill("")
        await page.get_by_label("Timeout per device (seconds)").fill("3")
        await page.get_by_label("Abort when").select_option("TIMEOUT")
        await page.get_by_label("reaches this share of executed devices (%)").fill("50")
        await page.get_by_label("once at least this many executed").fill("3")

        # Preview: the devices it would reach, and still nothing created.
        await page.get_by_role("button", name="Preview (dry run)").click()
        preview = page.get_by_role("status").filter(has_text="would target")
        await preview.get_by_text("3 devices").wait_for(timeout=WAIT_MS)
        assert await preview.get_by_role("list", name="Targeted devices").get_by_role("listitem").count() == 3
        assert await rollouts.page(10, 0) == ([], 0)

        # Create: to its page, which follows the rollout live (the events stream: well before the
        # 10 s refresh that would catch up without it).
        created_at = asyncio.get_running_loop().time()
        await page.get_by_role("button", name="Create").click()
        await page.get_by_role("heading", name="Rollout 1").wait_for(timeout=WAIT_MS)
        await page.evaluate("() => { window.notReloaded = true; }")
        progress = page.locator("#progress")
        await progress.get_by_test_id("count-succeeded").filter(has_text="1").wait_for(timeout=WAIT_MS)
        await progress.get_by_test_id("rollout-state").filter(has_text="aborted").wait_for(timeout=WAIT_MS)
        await progress.get_by_test_id("aborted-by").filter(has_text="TIMEOUT 2 of 3").wait_for(timeout=WAIT_MS)
        assert asyncio.get_running_loop().time() - created_at < 8, "the page followed only the 10 s refresh"
        assert any("/console/events/rollouts?rollout=1" in u for u in requested)
        assert await progress.get_by_test_id("count-timed_out").inner_text() == "2"
        assert await page.evaluate("() => window.notReloaded === true")
        chart = page.get_by_role("img", name="Device states: 1 succeeded, 2 timed_out")
        assert await chart.locator("rect[data-state]").count() == 2
        await page.get_by_role("table", name="Devices (3)").wait_for(timeout=WAIT_MS)
        await page.get_by_label("State", exact=True).select_option("timed_out")
        timed_out = page.get_by_role("table", name="Devices timed_out (2)")
        await timed_out.wait_for(timeout=WAIT_MS)
        assert await timed_out.locator("a[href^='/console/devices/']").all_inner_texts() == ["quiet1", "quiet2"]
        await page.get_by_label("State", exact=True).select_option("")
        await page.get_by_role("table", name="Devices (3)").wait_for(timeout=WAIT_MS)
        await _shot(page, tmp_path, "console-rollout.png")
        made = await rollouts.get(1)
        assert (made.state, made.invoked_by, made.spec.timeout_s) == (RolloutState.ABORTED, name_of(KEY, {}), 3)

        # Another, slow one: Pause, Resume, Cancel with the buttons, each shown only when allowed.
        await page.get_by_role("link", name="← Rollouts").click()
        await page.get_by_label("Command name").fill("reboot")
        await page.get_by_label("Device ids (comma-separated)").fill("quiet1, quiet2")
        await page.get_by_label("Max per minute").fill("1")
        await page.get_by_role("button", name="Create").click()
        await page.get_by_role("heading", name="Rollout 2").wait_for(timeout=WAIT_MS)
        await page.get_by_role("button", name="Pause").click()
        await progress.get_by_test_id("rollout-state").filter(has_text="paused").wait_for(timeout=WAIT_MS)
        assert await page.get_by_role("button", name="Pause").count() == 0
        await page.get_by_role("button", name="Resume").click()
        await progress.get_by_test_id("rollout-state").filter(has_text="in_progress").wait_for(timeout=WAIT_MS)
        await page.get_by_role("button", name="Cancel").click()  # confirmed (the dialog is accepted)
        await progress.get_by_test_id("rollout-state").filter(has_text="cancelled").wait_for(timeout=WAIT_MS)
        assert (await rollouts.get(2)).state is RolloutState.CANCELLED
        assert await page.get_by_role("button", name="Resume").count() == 0

        # The list: both, newest first; at a phone's width both pages fit (wide tables scroll in place).
        await page.get_by_role("link", name="Rollouts", exact=True).click()
        listing = page.get_by_role("table", name="Rollouts, newest first")
        await listing.get_by_role("link", name="2", exact=True).wait_for(timeout=WAIT_MS)
        assert await listing.locator("tbody tr").count() == 2
        await _shot(page, tmp_path, "console-rollouts.png")
        await page.set_viewport_size({"width": 390, "height": 844})
        for path in ("/console/rollouts", "/console/rollouts/1"):
            await page.goto(f"{base}{path}")
            overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{path} is {overflow} px wider than a phone's screen"

        outside = [u for u in requested if not u.startswith(base)]
        assert outside == [], f"the console loaded from outside the service: {outside}"
        await page.close()
