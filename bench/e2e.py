"""Scenarios 2 and 4: the bridge end to end (``broker-bridge serve`` in its own process) and fan-out.

The admin client (in the harness) invokes over ``cex/admin/{av}/{token}/invoke/{type}/{rid}`` with
``rid`` = the request's sequence number and ``{"payload": {"seq": rid}}``; it watches
``cex/events/{av}/#`` and counts a command done when its ``executed`` event arrives (published after
the commit). That event's ``resultPayload.rx`` is the device's receipt time (see bench/devices.py), so
one event gives both invoke -> device receipt and invoke -> executed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import psutil  # type: ignore[import-untyped]

from bench.common import (
    PYTHON,
    BenchError,
    Broker,
    Child,
    Children,
    Serve,
    cpu_share,
    cpu_snapshot,
    mqtt_client,
    now,
    ratio,
    start_mosquitto,
    start_serve,
)
from bench.load import Phase
from bench.ports import free_port
from bench.progress import Tracker

COMMAND_TYPE = "bench"
INVOKE_BODY = b'{"payload":{"seq":%d},"ttl":600}'
EXECUTED = b'"state":"executed"'


class Admin:
    """The operator side: invokes, reads the replies and the event stream."""

    def __init__(self, client: aiomqtt.Client, app_version: str, tokens: list[str]) -> None:
        self.client = client
        self.app_version = app_version
        self.tokens = tokens
        self.phase: Phase | None = None
        self.events_prefix = f"cex/events/{app_version}/"

    async def subscribe(self) -> None:
        await self.client.subscribe(
            [(f"{self.events_prefix}#", 1), (f"cex/admin/{self.app_version}/+/invoke/+/+/+", 1)]
        )

    async def pump(self) -> None:
        async for message in self.client.messages:
            phase = self.phase
            if phase is None:
                continue
            topic = message.topic.value
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if topic.startswith(self.events_prefix):
                if EXECUTED in payload:
                    record = json.loads(payload)
                    seq = record["payload"]["seq"]
                    phase.mark("receipt", seq, record["resultPayload"]["rx"])
                    phase.complete(seq)
            elif topic.endswith("/status"):
                phase.mark("reply", int(topic.rsplit("/", 2)[1]), now())
            elif topic.endswith("/error"):
                phase.fail(int(topic.rsplit("/", 2)[1]), payload.decode(errors="replace"))

    async def send(self, seq: int) -> None:
        token = self.tokens[seq % len(self.tokens)]
        topic = f"cex/admin/{self.app_version}/{token}/invoke/{COMMAND_TYPE}/{seq}"
        await self.client.publish(topic, INVOKE_BODY % seq, qos=1)


@dataclass
class Rig:
    """A broker, a serve process and device processes, ready for load."""

    broker: Broker
    port: int
    serve: Serve
    devices: list[Child]
    app_version: str
    tokens: list[str]
    connect_s: float
    procs: dict[str, psutil.Process]


async def build_rig(
    children: Children,
    broker: Broker,
    *,
    endpoints: int,
    device_procs: int,
    log_level: str,
    profile: tuple[str, Path, int] | None = None,
    connect_timeout_s: float = 120.0,
) -> Rig:
    procs: dict[str, psutil.Process] = {}
    if broker == "mosquitto":
        mosquitto, port = await start_mosquitto(children)
        procs["mosquitto"] = mosquitto.ps
    else:
        port = free_port()
    db = children.workdir / f"bridge-{broker}-{uuid.uuid4().hex[:6]}.db"
    serve = await start_serve(children, broker, db=db, port=port, log_level=log_level, profile=profile)
    procs["serve" if broker == "mosquitto" else "serve+amqtt"] = serve.ps
    app_version = f"bench{uuid.uuid4().hex[:8]}-v1"
    tokens = [f"dev{i}" for i in range(endpoints)]
    per_proc = -(-endpoints // device_procs)
    started = now()
    devices = []
    for index, start in enumerate(range(0, endpoints, per_proc)):
        argv = [
            PYTHON,
            "-m",
            "bench.devices",
            "--port",
            str(port),
            "--app-version",
            app_version,
            "--prefix",
            "dev",
            "--start",
            str(start),
            "--count",
            str(min(per_proc, endpoints - start)),
        ]
        devices.append(await children.start(f"devices-{index}", argv))
    await asyncio.gather(*(d.read_line("READY", connect_timeout_s) for d in devices))
    connect_s = now() - started
    for index, device in enumerate(devices):
        procs[f"devices-{index}" if len(devices) > 1 else "devices"] = device.ps
    procs["harness"] = psutil.Process()
    return Rig(broker, port, serve, devices, app_version, tokens, connect_s, procs)


async def device_stats(rig: Rig) -> dict[str, int]:
    """Stop the device processes and add up what they counted."""
    total: dict[str, int] = {}
    for device in rig.devices:
        with contextlib.suppress(ProcessLookupError):
            device.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(BenchError):
            line = await device.read_line("STATS", 10.0)
            for key, value in json.loads(line.split(" ", 1)[1]).items():
                total[key] = total.get(key, 0) + value
    return total


def peak_rss_mb(ps: psutil.Process) -> float | None:
    """VmHWM: the largest resident set the process ever had."""
    try:
        for line in Path(f"/proc/{ps.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


async def load_phase(
    rig: Rig,
    admin: Admin,
    *,
    first: int,
    count: int,
    window: int,
    warmup: int,
    rate: float | None,
    tracker: Tracker,
    label: str,
    timeout_s: float,
) -> dict[str, Any]:
    with tracker.step(label, total=count) as advance:
        phase = Phase(first=first, count=count, window=window, warmup=warmup, rate=rate, progress=advance)
        admin.phase = phase
        before, started = cpu_snapshot(rig.procs), now()
        try:
            await phase.run(admin.send, timeout_s)
        finally:
            admin.phase = None
        summary = phase.summary()
        summary["cpu_cores"] = cpu_share(before, cpu_snapshot(rig.procs), now() - started)
        if not rig.serve.child.alive:
            raise BenchError(f"serve died: {rig.serve.child.tail()}")
        return summary


async def measure_e2e(
    children: Children,
    broker: Broker,
    *,
    endpoints: int,
    count: int,
    window: int,
    light_s: float,
    tracker: Tracker,
    timeout_s: float,
    log_level: str,
    profile: tuple[str, Path, int] | None = None,
) -> dict[str, Any]:
    """Executed commands/s at full load (window), then latency at 10% of that rate (open loop)."""
    rig = await build_rig(children, broker, endpoints=endpoints, device_procs=1, log_level=log_level, profile=profile)
    results: dict[str, Any] = {
        "broker": broker,
        "endpoints": endpoints,
        "serve_log_level": log_level,
        "devices_connect_s": round(rig.connect_s, 3),
    }
    async with mqtt_client(rig.port, f"bench-admin-{uuid.uuid4().hex[:6]}") as client:
        admin = Admin(client, rig.app_version, rig.tokens)
        await admin.subscribe()
        reader = asyncio.create_task(admin.pump())
        try:
            warmup = max(10, count // 10)
            full = await load_phase(
                rig,
                admin,
                first=1,
                count=count + warmup,
                window=window,
                warmup=warmup,
                rate=None,
                tracker=tracker,
                label=f"e2e {broker} full load{' (profiled)' if profile else ''}",
                timeout_s=timeout_s,
            )
            results["full"] = full
            if light_s > 0 and full.get("per_s"):
                rate = full["per_s"] * 0.1
                light_count = max(30, int(rate * light_s))
                light_warmup = max(3, light_count // 10)
                results["light"] = await load_phase(
                    rig,
                    admin,
                    first=count + warmup + 1,
                    count=light_count + light_warmup,
                    window=1000,
                    warmup=light_warmup,
                    rate=rate,
                    tracker=tracker,
                    label=f"e2e {broker} 10% load",
                    timeout_s=timeout_s,
                )
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    results["serve_rss_mb"] = {
        "peak": peak_rss_mb(rig.serve.ps),
        "end": round(rig.serve.ps.memory_info().rss / 2**20, 1),
    }
    results["devices"] = await device_stats(rig)
    return results


async def measure_fanout(
    children: Children,
    *,
    devices: int,
    device_procs: int,
    window: int,
    tracker: Tracker,
    timeout_s: float,
    log_level: str,
) -> dict[str, Any]:
    """One command to each of ``devices`` connected devices on Mosquitto: until all received/executed."""
    with tracker.step(f"fan-out: connect {devices} devices ({device_procs} processes)"):
        rig = await build_rig(
            children,
            "mosquitto",
            endpoints=devices,
            device_procs=device_procs,
            log_level=log_level,
            connect_timeout_s=timeout_s,
        )
    results: dict[str, Any] = {
        "broker": "mosquitto",
        "devices": devices,
        "device_processes": device_procs,
        "connections": devices,
        "device_model": "one MQTT connection (aiomqtt client) per device, 2 subscriptions each, "
        f"spread over {device_procs} processes",
        "connect_all_s": round(rig.connect_s, 3),
        "window": window,
    }
    async with mqtt_client(rig.port, f"bench-admin-{uuid.uuid4().hex[:6]}") as client:
        admin = Admin(client, rig.app_version, rig.tokens)
        await admin.subscribe()
        reader = asyncio.create_task(admin.pump())
        try:
            with tracker.step(f"fan-out: one command to each of {devices} devices", total=devices) as advance:
                phase = Phase(first=1, count=devices, window=window, progress=advance)
                admin.phase = phase
                before, started = cpu_snapshot(rig.procs), now()
                await phase.run(admin.send, timeout_s)
                results["cpu_cores"] = cpu_share(before, cpu_snapshot(rig.procs), now() - started)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    # The same fan-out as one rollout, on the same devices, before device_stats stops them.
    with tracker.step(f"fan-out: the same as one rollout to {devices} devices", total=devices) as advance:
        rollout = await _rollout_to_all(rig, devices, advance, timeout_s)
    t0 = min(phase.sent.values())
    receipts = phase.marks.get("receipt", {})
    results["all_sent_s"] = round(max(phase.sent.values()) - t0, 3)
    results["all_received_s"] = round(max(receipts.values()) - t0, 3) if receipts else None
    results["all_executed_s"] = round(max(phase.done.values()) - t0, 3)
    results["executed_per_s"] = round(devices / results["all_executed_s"], 1) if results["all_executed_s"] else None
    results["received"] = len(receipts)
    results["executed"] = len(phase.done) - len(phase.errors)
    results["errors"] = len(phase.errors)
    results["summary"] = phase.summary()
    results["serve_rss_mb"] = {"peak": peak_rss_mb(rig.serve.ps)}
    results["devices_counted"] = await device_stats(rig)
    results["received_vs_executed"] = ratio(results["all_received_s"], results["all_executed_s"])
    results["rollout"] = rollout
    if results["rollout"].get("all_executed_s") and results["all_executed_s"]:
        results["rollout"]["speedup_vs_invokes"] = round(
            results["all_executed_s"] / results["rollout"]["all_executed_s"], 2
        )
    return results


async def _rollout_to_all(rig: Rig, devices: int, advance: Any, timeout_s: float) -> dict[str, Any]:
    """``POST /v3/rollouts`` to every device of the rig (by a label, no rate limit), timed from the
    request to the last executed event of its commands; the devices were registered by the invokes
    before."""
    headers = {"Authorization": f"Bearer {rig.serve.api_key}"}
    async with httpx.AsyncClient(base_url=rig.serve.http, headers=headers, timeout=timeout_s) as http:
        ids: list[str] = []
        while True:
            page = (await http.get("/v3/devices", params={"limit": 1000, "offset": len(ids)})).json()["devices"]
            ids += [d["id"] for d in page if d["app_version"] == rig.app_version]
            if len(page) < 1000:
                break
        # Labelled first (not timed): 10,000 ids would not fit one request body (max_payload_bytes).
        slots = asyncio.Semaphore(64)

        async def label(device_id: str) -> None:
            async with slots:
                await http.patch(f"/v3/devices/{device_id}", json={"labels": {"rollout": rig.app_version}})

        await asyncio.gather(*(label(i) for i in ids))
        executed: set[int] = set()
        finished = asyncio.Event()
        async with mqtt_client(rig.port, f"bench-rollout-{uuid.uuid4().hex[:6]}") as client:
            await client.subscribe(f"cex/events/{rig.app_version}/#", qos=1)

            async def count() -> None:
                async for message in client.messages:
                    payload = message.payload if isinstance(message.payload, bytes) else b""
                    if EXECUTED in payload and b'"rollout:' in payload:
                        executed.add(json.loads(payload)["id"])
                        advance(1)
                        if len(executed) >= devices:
                            finished.set()

            counter = asyncio.create_task(count())
            try:
                before, started = cpu_snapshot(rig.procs), now()
                body = {
                    "command": {"name": COMMAND_TYPE, "arguments": {"seq": -1}, "ttl": 600},
                    "target": {"labels": {"rollout": rig.app_version}},
                }
                response = await http.post("/v3/rollouts", json=body)
                created_s = now() - started
                if response.status_code != 201:
                    raise BenchError(f"rollout refused: {response.status_code} {response.text[:300]}")
                with contextlib.suppress(TimeoutError):  # reported as not all executed
                    await asyncio.wait_for(finished.wait(), timeout_s)
                elapsed = now() - started
                cpu = cpu_share(before, cpu_snapshot(rig.procs), elapsed)
            finally:
                counter.cancel()
                await asyncio.gather(counter, return_exceptions=True)
        rollout = (await http.get(f"/v3/rollouts/{response.json()['rollout']['id']}")).json()["rollout"]
    return {
        "devices": len(ids),
        "create_request_s": round(created_s, 3),
        "all_executed_s": round(elapsed, 3) if len(executed) >= devices else None,
        "executed": len(executed),
        "state": rollout["state"],
        "counts": {k: v for k, v in rollout["counts"].items() if v},
        "cpu_cores": cpu,
    }
