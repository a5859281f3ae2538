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
    exit_on_sigterm,
    start_mosquitto,
    wait_for_port,
)
from bench.echo import BODY, REPLY, REQUEST, run_windows
from bench.load import Phase
from bench.progress import Tracker

MQTT_V311 = 4


def available() -> bool:
    try:
        import gmqtt  # type: ignore[import-untyped]  # noqa: F401
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
class GmqttRequester:
    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.phase: Phase | None = None
        self.client = _client("bench-req-gmqtt")
        self.client.on_message = self._on_message

    async def connect(self, port: int) -> None:
        await self.client.connect("127.0.0.1", port, version=MQTT_V311)
        self.client.subscribe(f"{REPLY}/{self.run_id}/#", qos=1)
        await asyncio.sleep(0.2)  # SUBACK; gmqtt gives no awaitable for it

    def _on_message(self, _client: Any, topic: str, _payload: bytes, _qos: int, _properties: Any) -> int:
        if self.phase is not None:
            self.phase.complete(int(topic.rsplit("/", 1)[1]))
        return 0  # PUBACK reason code: success

    async def send(self, seq: int) -> None:
        self.client.publish(f"{REQUEST}/{self.run_id}/{seq}", BODY % seq, qos=1)


async def measure(children: Children, *, windows: dict[int, int], tracker: Tracker, timeout_s: float) -> dict[str, Any]:
    """Round trips/s and latency per window size, on a Mosquitto of its own."""
    if not available():
        raise BenchError("gmqtt is not installed (pip install -e '.[bench]')")
    mosquitto, port = await start_mosquitto(children)
    echo = await children.start("echo-gmqtt", [PYTHON, "-m", "bench.echo_gmqtt", "--port", str(port)])
    await echo.read_line("READY", 30.0)
    await wait_for_port(port)
    procs = {"broker": mosquitto.ps, "echo": echo.ps, "requester": psutil.Process()}
    requester = GmqttRequester(uuid.uuid4().hex[:8])
    await requester.connect(port)
    results: dict[str, Any] = {"broker": "mosquitto", "library": "gmqtt"}
    try:
        results.update(await run_windows("mosquitto gmqtt", windows, requester, procs, tracker, timeout_s))
    finally:
        await requester.client.disconnect()
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
