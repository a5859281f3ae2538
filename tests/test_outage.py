"""The external broker goes away under load and comes back: the bridge resumes and loses nothing."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import MosquittoProcess, mosquitto_available, skip_or_fail
from tests.streams import (
    DEVICES,
    WINDOW,
    Admin,
    Events,
    Serve,
    admin_session,
    check_exactly_once,
    settle,
    start_device,
)

COMMANDS = 1500
OUTAGE_S = 3.0


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_mosquitto_outage_under_load(tmp_path: Path, app_version: str) -> None:
    """Stop Mosquitto for 3 s mid-stream: the bridge reconnects, resubscribes, republishes, loses nothing."""
    if not mosquitto_available():
        skip_or_fail("mosquitto is not installed (Debian package 'mosquitto')")
    broker = MosquittoProcess(tmp_path, persistence=True)
    broker.start()
    serve = Serve(tmp_path, broker)
    serve.start()
    devices = [start_device(broker, app_version, n) for n in range(DEVICES)]
    events: Events = defaultdict(list)
    admin = Admin(None, app_version)  # type: ignore[arg-type]  # connected below, again after the outage
    try:
        await _phase(broker, admin, events, range(COMMANDS // 3), serve)
        broker.stop()
        await asyncio.sleep(OUTAGE_S)
        broker.start()
        restarted = time.monotonic()
        resumed_s = await _phase(broker, admin, events, range(COMMANDS // 3, COMMANDS), serve, restarted)
    finally:
        for device in devices:
            device.kill()
            device.wait()
        serve.stop()
        broker.stop()
    await check_exactly_once(serve, admin, events, COMMANDS)
    attempts = serve.log.read_text().count("mqtt_disconnected")
    assert attempts >= 1, "the bridge never noticed the outage"
    print(
        f"\nbroker down {OUTAGE_S:.0f} s; bridge resumed {resumed_s:.2f} s after the broker was back; "
        f"{attempts} reconnect attempts logged; {COMMANDS} commands, none lost or duplicated"
    )


async def _phase(
    broker: MosquittoProcess,
    admin: Admin,
    events: Events,
    seqs: range,
    serve: Serve,
    restarted: float | None = None,
) -> float:
    """Connect the admin (same persistent session), stream ``seqs``; return the time to the first answer."""
    async with admin_session(broker, admin, events):
        resumed_s = 0.0
        if restarted is not None:
            await admin.send(seqs[0])  # something is sure to be waiting for an answer
            resumed_s = await _resume(admin, restarted)
            seqs = seqs[1:]
        for seq in seqs:
            while len(admin.sent_at) >= WINDOW:
                await admin.retry_stale()
                await asyncio.sleep(0.01)
            await admin.send(seq)
        if restarted is None:
            return 0.0  # leave the rest in flight: the outage comes now
        await settle(admin, serve, events, COMMANDS)
        return resumed_s


async def _resume(admin: Admin, restarted: float) -> float:
    """Retry what the outage left unanswered until the bridge answers again; seconds since restart."""
    answered = len(admin.ids)
    while len(admin.ids) == answered:
        for seq in list(admin.sent_at):
            admin.sent_at[seq] = 0.0  # stale: resend now
        await admin.retry_stale()
        await asyncio.sleep(0.05)
    return time.monotonic() - restarted
