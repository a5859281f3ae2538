"""Scenario 1, raw echo: the baseline every bridge figure is divided by.

``python -m bench.echo --port P [--embedded]`` is the echo process: it answers every QoS 1 message on
``bench/req/...`` on ``bench/rep/...``, one task per message behind a 512-slot semaphore, exactly as
the bridge dispatches (``Bridge._receive``). With ``--embedded`` it also runs the embedded amqtt broker
(``broker_bridge.broker.EmbeddedBroker``) in the same process and event loop, as ``serve`` does.

``measure`` is the requester, run by the harness: a window of in-flight round trips.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from contextlib import AsyncExitStack
from typing import Any, Protocol

import aiomqtt
import psutil  # type: ignore[import-untyped]

from bench.common import (
    PYTHON,
    BenchError,
    Broker,
    Children,
    cpu_share,
    cpu_snapshot,
    exit_on_sigterm,
    mqtt_client,
    now,
    start_mosquitto,
    wait_for_port,
)
from bench.load import Phase
from bench.ports import free_port
from bench.progress import Tracker

REQUEST = "bench/req"
REPLY = "bench/rep"
BODY = b'{"payload":{"seq":%d},"ttl":600}'  # the size of an invoke body


# -- the echo process ---------------------------------------------------------------------------------
async def _ignore(app_version: str, endpoint_token: str) -> None:
    return None


async def _echo(client: aiomqtt.Client, message: aiomqtt.Message) -> None:
    payload = message.payload if isinstance(message.payload, bytes) else b""
    await client.publish(REPLY + message.topic.value[len(REQUEST) :], payload, qos=message.qos)


async def serve_echo(port: int, embedded: bool) -> None:
    async with AsyncExitStack() as stack:
        if embedded:
            from broker_bridge.broker import EmbeddedBroker

            broker = EmbeddedBroker(
                host="127.0.0.1", port=port, bridge_client_id="bench-echo", on_endpoint_seen=_ignore
            )
            await stack.enter_async_context(broker)
        client = await stack.enter_async_context(mqtt_client(port, f"bench-echo-{uuid.uuid4().hex[:6]}"))
        await client.subscribe(f"{REQUEST}/#", qos=1)
        print("READY", flush=True)
        slots = asyncio.Semaphore(512)
        async with asyncio.TaskGroup() as tasks:
            async for message in client.messages:
                await slots.acquire()
                task = tasks.create_task(_echo(client, message))
                task.add_done_callback(lambda _: slots.release())


# -- the requester (in the harness) -------------------------------------------------------------------
class Windowed(Protocol):
    """A requester: sends request ``seq``; its reader completes ``phase`` when the reply arrives."""

    phase: Phase | None

    async def send(self, seq: int) -> None: ...


async def run_windows(
    label: str,
    windows: dict[int, int],
    requester: Windowed,
    procs: dict[str, psutil.Process],
    tracker: Tracker,
    timeout_s: float,
) -> dict[str, Any]:
    """One closed-loop phase per window size: ``{"window_<w>": summary with CPU}``."""
    results: dict[str, Any] = {}
    first = 1
    for window, count in windows.items():
        warmup = max(10, count // 10)
        with tracker.step(f"echo {label} window {window}", total=count + warmup) as advance:
            phase = Phase(first=first, count=count + warmup, window=window, warmup=warmup, progress=advance)
            requester.phase = phase
            before, started = cpu_snapshot(procs), now()
            await phase.run(requester.send, timeout_s)
            summary = phase.summary()
            summary["cpu_cores"] = cpu_share(before, cpu_snapshot(procs), now() - started)
            results[f"window_{window}"] = summary
            first += count + warmup
    return results


class Requester:
    def __init__(self, client: aiomqtt.Client, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.phase: Phase | None = None

    async def pump(self) -> None:
        async for message in self.client.messages:
            if self.phase is not None:
                self.phase.complete(int(message.topic.value.rsplit("/", 1)[1]))

    async def send(self, seq: int) -> None:
        await self.client.publish(f"{REQUEST}/{self.run_id}/{seq}", BODY % seq, qos=1)


async def measure(
    children: Children, broker: Broker, *, windows: dict[int, int], tracker: Tracker, timeout_s: float
) -> dict[str, Any]:
    """Round trips/s and latency per window size (``windows``: window -> number of round trips)."""
    if broker == "mosquitto":
        mosquitto, port = await start_mosquitto(children)
        echo = await children.start("echo", [PYTHON, "-m", "bench.echo", "--port", str(port)])
        procs = {"broker": mosquitto.ps, "echo": echo.ps}
    else:
        port = free_port()
        echo = await children.start("echo", [PYTHON, "-m", "bench.echo", "--port", str(port), "--embedded"])
        procs = {"broker+echo": echo.ps}
    await echo.read_line("READY", 30.0)
    await wait_for_port(port)
    procs["requester"] = psutil.Process()
    results: dict[str, Any] = {"broker": broker}
    run_id = uuid.uuid4().hex[:8]
    async with mqtt_client(port, f"bench-req-{run_id}") as client:
        requester = Requester(client, run_id)
        await client.subscribe(f"{REPLY}/{run_id}/#", qos=1)
        reader = asyncio.create_task(requester.pump())
        try:
            results.update(await run_windows(broker, windows, requester, procs, tracker, timeout_s))
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    if not echo.alive:
        raise BenchError(f"echo process died: {echo.tail()}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="bench echo process")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--embedded", action="store_true", help="run the embedded amqtt broker on --port too")
    args = parser.parse_args()
    exit_on_sigterm()
    asyncio.run(serve_echo(args.port, args.embedded))


if __name__ == "__main__":
    main()
