"""The bridge survives its broker going away and coming back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker_bridge import bridge as bridge_module
from tests.conftest import MosquittoProcess
from tests.harness import make_settings, probe, running_service


async def test_bridge_reconnects_after_mosquitto_restart(
    tmp_path: Path, app_version: str, mosquitto: MosquittoProcess
) -> None:
    """Stop the external broker, start it again: the bridge resubscribes and serves requests."""
    settings = make_settings(tmp_path, mosquitto.port, broker_url=mosquitto.url)
    topic = f"cex/admin/{app_version}/dev/invoke/reboot"
    async with running_service(settings):
        async with probe(mosquitto.port) as admin:
            before = await admin.request(f"{topic}/1", {"payload": 1})
        mosquitto.stop()
        mosquitto.start()
        async with probe(mosquitto.port) as admin:
            for rid in range(2, 200):  # requests sent before the bridge resubscribed are not answered
                await admin.subscribe(f"{topic}/{rid}/+")
                await admin.publish(f"{topic}/{rid}", {"payload": rid})
                try:
                    after = await admin.wait_for(lambda s, r=rid: s.topic == f"{topic}/{r}/status", within_s=0.25)
                    break
                except TimeoutError:
                    continue
            else:
                raise AssertionError("the bridge never came back")
    assert after.json()["id"] > before.json()["id"]


class Recorder:
    """Stands in for ``broker_bridge.bridge.log`` (structlog's loggers are cached once configured,
    so structlog.testing.capture_logs does not see them after another test set logging up)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        def record(event: str, *args: Any, **kw: Any) -> None:
            self.events.append({"event": event, "log_level": level, **kw})

        return record


async def test_a_lost_broker_session_is_logged(
    tmp_path: Path, app_version: str, mosquitto: MosquittoProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mosquitto without persistence restarted: the bridge's persistent session is gone, and the
    bridge says so when it reconnects (messages the broker queued for it were lost)."""
    recorder = Recorder()
    monkeypatch.setattr(bridge_module, "log", recorder)
    logged = recorder.events
    settings = make_settings(tmp_path, mosquitto.port, broker_url=mosquitto.url)
    async with running_service(settings):
        mosquitto.stop()
        mosquitto.start()
        for _ in range(100):
            if any(e["event"] == "broker_session_lost" for e in logged):
                break
            await asyncio.sleep(0.1)
    connects = [e for e in logged if e["event"] == "mqtt_connected"]
    assert [e["session_present"] for e in connects[:2]] == [False, False]
    (lost,) = [e for e in logged if e["event"] == "broker_session_lost"]
    assert lost["log_level"] == "warning"
    assert "persistence" in lost["hint"]
