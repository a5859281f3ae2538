"""Rollout queueing at scale: 100,000 targeted devices, most offline (issue "Fleet rollouts").

The devices are written into a fresh SQLite database before ``serve`` starts (not timed: the
registry is not what is measured), then one ``POST /v3/rollouts`` targets all of them by a label
with a rate limit. Measured: the request's time (resolving 100,000 devices, writing their rows, the
first step) and serve's RSS after it; then how many commands the rate let out over ``rate_window_s``
against what the rate allows (the first one at once, then ``max_per_minute``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench.common import Broker, Children, now, rss_mb, start_serve
from bench.progress import Tracker
from broker_bridge.store.sqlite_schema import migrate

LABEL = '{"fleet":"bench"}'


def _prepare(db: Path, devices: int, app_version: str) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        migrate(conn)
        at = int(time.time() * 1_000_000)
        rows = ((f"bench-{i}", app_version, f"tok{i}", LABEL, None, at, at) for i in range(devices))
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO devices (device_id, app_version, endpoint_token, labels, manifest, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


async def measure(
    children: Children,
    *,
    devices: int,
    per_minute: float,
    rate_window_s: float,
    tracker: Tracker,
    timeout_s: float,
    log_level: str,
    broker: Broker = "embedded",
) -> dict[str, Any]:
    db = children.workdir / f"rollout-{uuid.uuid4().hex[:6]}.db"
    app_version = f"bench{uuid.uuid4().hex[:8]}-v1"
    with tracker.step(f"rollout: {devices} devices into the registry (not timed)"):
        await asyncio.to_thread(_prepare, db, devices, app_version)
    serve = await start_serve(children, broker, db=db, log_level=log_level)
    headers = {"Authorization": f"Bearer {serve.api_key}"}
    results: dict[str, Any] = {"devices": devices, "broker": broker, "rss_before_mb": rss_mb(serve.ps)}
    async with httpx.AsyncClient(base_url=serve.http, headers=headers, timeout=timeout_s) as http:
        body = {
            "command": {"name": "reboot", "arguments": {"delay_s": 1}},
            "target": {"labels": {"fleet": "bench"}},
            "rate": {"max_per_minute": per_minute},
        }
        with tracker.step(f"rollout: create one targeting {devices} devices"):
            started = now()
            response = await http.post("/v3/rollouts", json=body)
            results["create_request_s"] = round(now() - started, 3)
        if response.status_code != 201:
            results["error"] = f"{response.status_code}: {response.text[:300]}"
            return results
        rollout_id = response.json()["rollout"]["id"]
        results["rss_after_create_mb"] = rss_mb(serve.ps)
        with tracker.step(f"rollout: {per_minute:g}/min for {rate_window_s:g} s"):
            await asyncio.sleep(rate_window_s)
            record = (await http.get(f"/v3/rollouts/{rollout_id}")).json()["rollout"]
            elapsed = now() - started
        sent = record["total"] - record["counts"]["queued"] - record["counts"]["skipped"]
        allowed = int(per_minute * elapsed / 60) + 1
        results["rate"] = {
            "per_minute": per_minute,
            "window_s": round(elapsed, 2),
            "sent": sent,
            "allowed": allowed,
            "sent_vs_allowed": round(sent / allowed, 4),
        }
        results["queued"] = record["counts"]["queued"]
        results["rss_peak_mb"] = rss_mb(serve.ps)
    return results
