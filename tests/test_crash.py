"""kill -9 of serve, five times, during a stream of commands answered by simulated devices.

Afterwards every command reaches a final state exactly once, in the store and in the event stream's
final record; none is lost, none is created twice, none has two different final results. The
admin retries unanswered invokes with an idempotency key, as a careful operator's client would.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import MosquittoProcess
from tests.streams import WINDOW, Admin, Events, Serve, admin_session, check_exactly_once, running_devices, settle

COMMANDS = int(os.environ.get("BROKER_BRIDGE_CRASH_COMMANDS", "10000"))
KILLS = 5


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_five_kill_9_during_a_stream_lose_and_duplicate_nothing(
    tmp_path: Path, app_version: str, mosquitto: MosquittoProcess
) -> None:
    """10,000 commands, serve killed with SIGKILL five times: each command final exactly once, store and events."""
    serve = Serve(tmp_path, mosquitto)
    serve.start()
    events: Events = defaultdict(list)
    admin = Admin(None, app_version)  # type: ignore[arg-type]  # connected by admin_session
    started = time.monotonic()
    try:
        with running_devices(mosquitto, app_version):
            async with admin_session(mosquitto, admin, events):
                await _stream(admin, serve)
                await settle(admin, serve, events, COMMANDS)
    finally:
        serve.stop()
    elapsed = time.monotonic() - started
    assert serve.kills == KILLS
    await check_exactly_once(serve, admin, events, COMMANDS)
    print(f"\n{COMMANDS} commands, {serve.kills} kill -9, {len(admin.errors)} error replies, {elapsed:.1f} s")


async def _stream(admin: Admin, serve: Serve) -> None:
    """Send every invoke, windowed; kill -9 and restart serve at five points along the way."""
    kill_at = {COMMANDS * (k + 1) // (KILLS + 1) for k in range(KILLS)}
    for seq in range(COMMANDS):
        while len(admin.sent_at) >= WINDOW:
            await admin.retry_stale()
            await asyncio.sleep(0.01)
        if seq in kill_at:
            serve.kill9()
            serve.start()
        await admin.send(seq)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_sigterm_under_load_is_prompt_and_clean(
    tmp_path: Path, app_version: str, mosquitto: MosquittoProcess
) -> None:
    """SIGTERM mid-stream: serve exits 0 within seconds, the database is intact, and nothing is lost."""
    total = 2000
    serve = Serve(tmp_path, mosquitto)
    serve.start()
    events: Events = defaultdict(list)
    admin = Admin(None, app_version)  # type: ignore[arg-type]  # connected by admin_session
    try:
        with running_devices(mosquitto, app_version):
            async with admin_session(mosquitto, admin, events):
                for seq in range(total):
                    while len(admin.sent_at) >= WINDOW:
                        await admin.retry_stale()
                        await asyncio.sleep(0.01)
                    if seq == total // 2:
                        stopped_in_s = await asyncio.to_thread(serve.terminate)
                        _assert_intact(serve.db)
                        serve.start()
                    await admin.send(seq)
                await settle(admin, serve, events, total)
    finally:
        serve.stop()
    await check_exactly_once(serve, admin, events, total)
    print(f"\nSIGTERM under load: serve stopped in {stopped_in_s:.2f} s")


def _assert_intact(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
