"""Start-up refusals for files that would lose silently, an open embedded broker, and 413 for any
oversized body (issue 16's storage, zero-config and HTTP items)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker_bridge import http_server, runtime
from broker_bridge.errors import StartupError
from broker_bridge.store.sqlite import SqliteStore
from tests.conftest import free_port
from tests.harness import make_settings
from tests.test_api import MAX_PAYLOAD, Api, api

__all__ = ["api"]  # the fixture, shared with test_api


async def test_an_empty_database_file_is_refused_not_taken_as_new(tmp_path: Path) -> None:
    """A 0-byte file where the database should be was opened as a new, empty database."""
    db = tmp_path / "bridge.db"
    db.write_bytes(b"")
    with pytest.raises(StartupError, match="is empty"):
        async with SqliteStore(db):
            pass
    db.unlink()
    async with SqliteStore(db):  # a new path is a new database, as before
        pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write any file: the mode check cannot fail")
async def test_an_unwritable_shared_memory_file_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "bridge.db"
    async with SqliteStore(db):
        pass
    shm = tmp_path / "bridge.db-shm"
    shm.write_bytes(b"")
    shm.chmod(0o400)
    with pytest.raises(StartupError, match="cannot write"):
        async with SqliteStore(db):
            pass


def test_check_files_names_an_unwritable_shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same check, with access() answering as for another user (root passes every mode check)."""
    from broker_bridge.store import sqlite

    db = tmp_path / "bridge.db"
    (tmp_path / "bridge.db-shm").write_bytes(b"")
    monkeypatch.setattr(sqlite.os, "access", lambda path, mode: False)
    with pytest.raises(StartupError, match=r"bridge\.db-shm"):
        sqlite.check_files(db)


def test_an_empty_api_key_file_is_refused(tmp_path: Path) -> None:
    """It left every admin request 401 with no warning."""
    key_file = tmp_path / "bridge.db.api-key"
    key_file.write_text("\n")
    with pytest.raises(StartupError, match="is empty"):
        http_server.api_keys([], key_file)
    key_file.unlink()
    (generated,) = http_server.api_keys([], key_file)
    assert generated
    assert http_server.api_keys([], key_file) == [generated]


def test_an_open_embedded_broker_beyond_loopback_is_refused(tmp_path: Path) -> None:
    """Zero-config stays for loopback; 0.0.0.0 without logins needs allow_anonymous."""
    exposed = make_settings(tmp_path, free_port())
    exposed = exposed.model_copy(update={"mqtt_listen": f"0.0.0.0:{free_port()}"})
    with pytest.raises(StartupError, match="without logins"):
        runtime.check_topology(exposed)
    runtime.check_topology(exposed.model_copy(update={"allow_anonymous": True}))
    runtime.check_topology(make_settings(tmp_path, free_port()))  # loopback: a warning only


async def test_start_without_logins_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runtime.check_topology(make_settings(tmp_path, free_port()))
    assert "mqtt_without_logins" in capsys.readouterr().out


async def _chunks(size: int) -> AsyncIterator[bytes]:
    sent = 0
    while sent < size:
        yield b"x" * 4096
        sent += 4096


async def test_a_chunked_oversized_body_gets_413_on_every_route(api: Api) -> None:
    """A body without Content-Length was answered 400 'There was an error parsing the body' on /v3."""
    for path in ("/v3/devices", "/v3/devices/x/command_executions", api.kp1("result/reboot")):
        body = _chunks(MAX_PAYLOAD * 4)
        response = await api.client.post(path, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 413, (path, response.text)
        assert "exceeds the limit" in response.json()["reasonPhrase"]
