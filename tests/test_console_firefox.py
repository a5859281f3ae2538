"""The console in Firefox: Debian's firefox-esr, driven over Marionette (Firefox's own remote
protocol, no geckodriver; Playwright's Firefox needs its own patched build, and its WebDriver BiDi
mode needs commands ESR 153 does not have). The Chromium tests cover the whole walk; this one
checks that the same pages work in Firefox: the session cookie is kept, htmx and the live history
run, the page's own JSON check speaks, and the page fits a phone's width."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, skip_or_fail
from tests.test_console_browser import KEY, _all, console_site

FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox")
WAIT_S = 15.0

pytestmark = [
    pytest.mark.timeout(180),
    # marionette-driver 3.7's port probe (raise_for_port) leaves its socket to the garbage collector.
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@contextlib.contextmanager
def firefox(tmp_path: Path) -> Iterator[Any]:
    """A headless Firefox of this test's own (profile, Marionette port), closed after."""
    try:
        from marionette_driver.marionette import Marionette
    except ImportError:
        skip_or_fail("marionette-driver is not installed (pip install marionette-driver)")
    if FIREFOX is None:
        skip_or_fail("no Firefox (Debian package 'firefox-esr')")
    client = Marionette(
        bin=FIREFOX, headless=True, port=free_port(), gecko_log=str(tmp_path / "gecko.log"), startup_timeout=60
    )
    try:
        client.start_session()
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.delete_session()
        client.cleanup()  # the browser and its profile


def wait(client: Any, condition: Callable[[Any], Any], what: str) -> Any:
    from marionette_driver import Wait
    from marionette_driver.errors import NoSuchElementException, StaleElementException

    return Wait(client, timeout=WAIT_S, ignored_exceptions=[NoSuchElementException, StaleElementException]).until(
        condition, message=what
    )


def labelled(client: Any, text: str) -> Any:
    """The control a <label> with this text names (what a screen reader would announce)."""
    from marionette_driver import By

    label = client.find_element(By.XPATH, f"//label[normalize-space()='{text}']")
    return client.find_element(By.ID, label.get_attribute("for"))


def button(client: Any, text: str) -> Any:
    from marionette_driver import By

    return client.find_element(By.XPATH, f"//button[normalize-space()='{text}']")


def with_role(client: Any, role: str, text: str) -> Any:
    from marionette_driver import By

    found = client.find_element(By.XPATH, f"//*[@role='{role}' and contains(normalize-space(), '{text}')]")
    return found if found.is_displayed() else None


def walk(client: Any, base: str, device_id: str, shots: Path) -> dict[str, Any]:
    """The operator's steps, synchronously (Marionette blocks; the service runs on the loop)."""
    from marionette_driver import By

    seen: dict[str, Any] = {"browser": client.session_capabilities.get("browserVersion")}
    client.set_window_rect(width=1280, height=900)
    client.navigate(f"{base}/")  # not signed in: the sign-in form
    labelled(client, "API key").send_keys("wrong")
    button(client, "Sign in").click()
    wait(client, lambda c: with_role(c, "alert", "not valid"), "a refused key is said so")
    labelled(client, "API key").send_keys(KEY)
    button(client, "Sign in").click()
    wait(client, lambda c: c.find_element(By.LINK_TEXT, device_id), "the device list").click()
    wait(client, lambda c: c.find_element(By.XPATH, "//h2[normalize-space()='Command execution']"), "the device page")

    labelled(client, "Command type").send_keys("reboot")
    labelled(client, "Command body").send_keys("{not json")
    button(client, "Run").click()
    wait(client, lambda c: with_role(c, "alert", "not valid JSON"), "the page refuses a body that is not JSON")

    body = labelled(client, "Command body")
    body.clear()
    body.send_keys('{"delay": 1}')
    button(client, "Run").click()
    first_row = "//table[@aria-label='Commands history']/tbody/tr[1]"
    wait(client, lambda c: c.find_element(By.XPATH, f"{first_row}[contains(., 'Pending')]"), "Pending, live")
    wait(client, lambda c: c.find_element(By.XPATH, f"{first_row}[contains(., 'Executed')]"), "Executed, live")
    seen["url_after_run"] = client.get_url()  # no reload, no navigation: still the device page
    client.find_element(By.XPATH, f"{first_row}//a").click()
    detail = wait(client, lambda c: c.find_element(By.XPATH, "//article[starts-with(@aria-label, 'Command ')]"), "open")
    seen["detail"] = detail.text
    (shots / "firefox-device.png").write_bytes(client.screenshot(format="binary"))

    client.set_window_rect(width=390, height=844)  # a phone's width
    seen["overflow_px"] = client.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    (shots / "firefox-phone.png").write_bytes(client.screenshot(format="binary"))
    return seen


async def test_the_console_works_in_firefox(tmp_path: Path, app_version: str) -> None:
    async with console_site(tmp_path, app_version) as (base, service, device_id):
        with firefox(tmp_path) as client:
            seen = await asyncio.to_thread(walk, client, base, device_id, tmp_path)
        assert seen["url_after_run"] == f"{base}/console/devices/{device_id}"
        assert '"delay": 1' in seen["detail"]
        assert "200" in seen["detail"]
        assert seen["overflow_px"] <= 0, f"the page is {seen['overflow_px']} px wider than a phone's screen"
        (command,) = await service.history(_all())
        assert (command.payload, command.state.value, command.status_code) == ({"delay": 1}, "executed", 200)
