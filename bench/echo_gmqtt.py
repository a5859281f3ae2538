"""The candidate client library, measured like the baseline: the raw echo with gmqtt instead of aiomqtt.

Not used by the bridge. It answers one question the issue asks: how much of the distance between the
bridge and the raw echo is the client library's cost per packet? Same Mosquitto configuration, same
topics, body size, windows and QoS 1, MQTT 3.1.1 as the aiomqtt echo; asyncio sets TCP_NODELAY on
gmqtt's sockets itself. gmqtt has no flow control of its own: ``publish()`` raises ``OverflowError``
once the broker's receive maximum is used up, so the requester's window is the only bound here (64,
far below Mosquitto's 1000).

``python -m bench.echo_gmqtt --port P`` is the echo process; ``measure`` is the requester.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from typing import Any

import psutil  # type: ignore[import-untyped]

from bench.common import (
    PYTHON,
    BenchError,
    Children,
    cpu_share,
    cpu_snapshot,
    exit_on_sigterm,
    now,
    start_mosquitto,
    wait_for_port,
)
from bench.echo import BODY, REPLY, REQUEST
from bench.load import Phase
from bench.progress import Tracker

MQTT_V311 = 4


def available() -> bool:
    try:
        import gmqtt  # noqa: F401
    except ImportError:
        return False
    return True


def _client(name: str) -> Any:
    from gmqtt import Client

    return Client(f"{name}-{uuid.uuid4().hex[:6]}", clean_session=True)


# -- the echo process ---------------------------------------------------------------------------------
async def serve_echo(port: int) -> None:
    client = _client("bench-echo-gmqtt")

    def on_message(_client: Any, topic: str, payload: bytes, qos: int, _properties: Any) -> int:
        client.publish(REPLY + topic[len(REQUEST) :], payload, qos=qos)
        return 0  # PUBACK reason code: success

    client.on_message = on_message
    await client.connect("127.0.0.1", port, version=MQTT_V311)
    client.subscribe(f"{REQUEST}/#", qos=1)
    await asyncio.sleep(0.2)  # SUBACK; gmqtt gives no awaitable for it
    print("READY", flush=True)
    await asyncio.Event().wait()


# -- the requester (in the harness) -------------------------------------------------------------------
async def measure(children: Children, *, windows: dict[int, int], tracker: Tracker, timeout_s: float) -> dict[str, Any]:
    """Round trips/s and latency per window size, on a Mosquitto of its own."""
    if not available():
        raise BenchError("gmqtt is not installed (pip install -e '.[bench]')")
    mosquitto, port = await start_mosquitto(children)
    echo = await children.start("echo-gmqtt", [PYTHON, "-m", "bench.echo_gmqtt", "--port", str(port)])
    await echo.read_line("READY", 30.0)
    await wait_for_port(port)
    procs = {"broker": mosquitto.ps, "echo": echo.ps, "requester": psutil.Process()}
    run_id = uuid.uuid4().hex[:8]
    phase: Phase | None = None

    def on_message(_client: Any, topic: str, _payload: bytes, _qos: int, _properties: Any) -> int:
        if phase is not None:
            phase.complete(int(topic.rsplit("/", 1)[1]))
        return 0

    client = _client("bench-req-gmqtt")
    client.on_message = on_message
    await client.connect("127.0.0.1", port, version=MQTT_V311)
    client.subscribe(f"{REPLY}/{run_id}/#", qos=1)
    await asyncio.sleep(0.2)

    async def send(seq: int) -> None:
        client.publish(f"{REQUEST}/{run_id}/{seq}", BODY % seq, qos=1)

    results: dict[str, Any] = {"broker": "mosquitto", "library": "gmqtt"}
    try:
        first = 1
        for window, count in windows.items():
            warmup = max(10, count // 10)
            with tracker.step(f"echo mosquitto gmqtt window {window}", total=count + warmup) as advance:
                phase = Phase(first=first, count=count + warmup, window=window, warmup=warmup, progress=advance)
                before, started = cpu_snapshot(procs), now()
                await phase.run(send, timeout_s)
                summary = phase.summary()
                summary["cpu_cores"] = cpu_share(before, cpu_snapshot(procs), now() - started)
                results[f"window_{window}"] = summary
                first += count + warmup
    finally:
        await client.disconnect()
    if not echo.alive:
        raise BenchError(f"gmqtt echo process died: {echo.tail()}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="bench echo process (gmqtt)")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    exit_on_sigterm()
    asyncio.run(serve_echo(args.port))


if __name__ == "__main__":
    main()
