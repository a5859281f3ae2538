"""Database trouble: a full disk, another writer holding the lock, a read-only database.

Each fault must give a clear StoreUnavailable (503 over HTTP and MQTT), change nothing, not spin,
and heal by itself once the cause is gone.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker_bridge import runtime
from broker_bridge.api import ops
from broker_bridge.commands import NewCommand
from broker_bridge.errors import StoreUnavailable
from broker_bridge.store import CommandQuery
from broker_bridge.store.sqlite import SqliteStore
from broker_bridge.topics import Target
from tests.conftest import free_port
from tests.harness import make_settings, probe, running_service

T0 = datetime(2026, 1, 1, tzinfo=UTC)
REBOOT = Target(app_version="app-v1", endpoint_token="dev1", command_type="reboot")


def new() -> NewCommand:
    return NewCommand(target=REBOOT, payload=None, created_at=T0, expires_at=T0 + timedelta(hours=1))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """A SQLite store with a short busy timeout, so a held lock fails fast."""
    async with SqliteStore(tmp_path / "b.db", busy_timeout_ms=200) as opened:
        yield opened


async def pragma(store: SqliteStore, sql: str) -> list[tuple[Any, ...]]:
    """Run a PRAGMA on the store's own connection and thread (how the tests make the disk 'full' or read-only)."""
    found: list[tuple[Any, ...]] = await store._submit(lambda conn: conn.execute(sql).fetchall(), writes=False)
    return found


async def test_disk_full_refuses_writes_then_recovers(store: SqliteStore) -> None:
    """SQLITE_FULL becomes StoreUnavailable, nothing is half-written, and writing works again later."""
    kept = await store.create(new())
    pages = [row[0] for row in await pragma(store, "PRAGMA page_count")]
    await pragma(store, f"PRAGMA max_page_count = {pages[0]}")
    with pytest.raises(StoreUnavailable, match="full"):
        await asyncio.gather(
            *(
                store.create(NewCommand(target=REBOOT, payload="x" * 5000, created_at=T0, expires_at=T0))
                for _ in range(50)
            )
        )
    assert await store.get(kept.id) == kept  # reads still work
    assert await store.count(CommandQuery()) == 1
    await pragma(store, "PRAGMA max_page_count = 1073741823")
    assert (await store.create(new())).id > kept.id


async def test_locked_by_another_writer(store: SqliteStore) -> None:
    """Another process holding the write lock: writes fail after the busy timeout, then succeed."""
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.create(new())
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert (await store.create(new())).id == 1


async def test_read_only_database_refuses_writes_then_recovers(store: SqliteStore) -> None:
    """A read-only database refuses writes with a clear reason; reads work; writes resume after."""
    await store.create(new())
    await pragma(store, "PRAGMA query_only = ON")
    with pytest.raises(StoreUnavailable, match="readonly"):
        await store.create(new())
    assert await store.count(CommandQuery()) == 1
    await pragma(store, "PRAGMA query_only = OFF")
    assert (await store.create(new())).id == 2


async def test_unopenable_database_at_start_is_a_clear_error(tmp_path: Path) -> None:
    """A database path that cannot be opened stops start-up with the path and the reason."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    db = blocker / "b.db"
    with pytest.raises(StoreUnavailable, match=f"cannot open database {db}"):
        async with SqliteStore(db):
            pass


async def test_sweep_does_not_spin_when_the_store_fails() -> None:
    """A failing sweep waits its interval before trying again instead of looping hot."""
    calls = 0

    async def failing(limit: int) -> int:
        nonlocal calls
        calls += 1
        raise StoreUnavailable("database error: disk full")

    sweeper = asyncio.create_task(runtime._sweep(failing, interval_s=0.1))
    await asyncio.sleep(0.55)
    sweeper.cancel()
    await asyncio.gather(sweeper, return_exceptions=True)
    assert 3 <= calls <= 8


async def test_service_answers_503_over_mqtt_and_http_while_the_disk_is_full(tmp_path: Path, app_version: str) -> None:
    """With the store failing, requests get 503 errors, the service stays up, and heals afterwards."""
    settings = make_settings(tmp_path, free_port(), api_keys=["k"])
    headers = {"Authorization": "Bearer k"}
    async with running_service(settings) as service, probe(settings.broker_address().port) as admin:
        assert isinstance(service.store, SqliteStore)
        store = service.store
        async with httpx.AsyncClient(base_url=f"http://{settings.http_listen}", headers=headers) as http:
            ok = await admin.request(f"cex/admin/{app_version}/dev/invoke/reboot/1", {"payload": 1})
            assert ok.topic.endswith("/status")
            pages = [row[0] for row in await pragma(store, "PRAGMA page_count")]
            await pragma(store, f"PRAGMA max_page_count = {pages[0]}")
            big = {"payload": "x" * 200_000}
            failed = await admin.request(f"cex/admin/{app_version}/dev/invoke/reboot/2", big)
            assert failed.json()["statusCode"] == 503
            response = await http.post(f"/kp1/{app_version}/cex/dev/command/reboot", json={})
            assert response.status_code in (200, 503)  # a poll may not need to write
            ready = await http.get("/readyz")
            assert ready.status_code == 200  # a small write still fits: the probe's commit goes through
            await pragma(store, "PRAGMA max_page_count = 1073741823")
            healed = await admin.request(f"cex/admin/{app_version}/dev/invoke/reboot/3", big)
            assert healed.topic.endswith("/status")
            # Every write failing while reads work (it answered 200 before the write probe).
            await asyncio.sleep(ops.PROBE_S)
            await pragma(store, "PRAGMA query_only = 1")
            refused = await http.get("/readyz")
            assert refused.status_code == 503
            assert "readonly" in refused.json()["store"] or "read-only" in refused.json()["store"]
            await pragma(store, "PRAGMA query_only = 0")
            await asyncio.sleep(ops.PROBE_S)
            assert (await http.get("/readyz")).status_code == 200


async def test_database_from_a_newer_version_stops_start_up(tmp_path: Path) -> None:
    """A schema newer than this program is refused at open, with the reason, instead of being used."""
    db = tmp_path / "b.db"
    async with SqliteStore(db):
        pass
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    with pytest.raises(RuntimeError, match="newer than this broker-bridge"):
        async with SqliteStore(db):
            pass
