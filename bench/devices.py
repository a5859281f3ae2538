"""Many simulated KP1 devices in one process: ``python -m bench.devices --port P --app-version AV ...``.

Each endpoint ``{prefix}{i}`` (i in ``start .. start+count-1``) gets its own MQTT connection (aiomqtt,
TCP_NODELAY) unless ``--tokens-per-client`` groups several endpoints on one connection. An endpoint
subscribes to its push topic and its result replies only (``kp1/{av}/cex/{token}/command/{type}/status``
and ``.../result/{type}/+/+``), as a device must on a standard broker; it never polls, so it costs the
bridge nothing until a command arrives. Every new command id in a pushed list is answered at once with
one final result (200) with a request ID; the result payload carries the device's receipt time
(``{"rx": CLOCK_MONOTONIC seconds}``), so the harness reads invoke -> receipt latency from the
``executed`` event without any side channel.

Prints ``READY <endpoints> <connect seconds>`` once every connection is subscribed, and
``STATS {...}`` when told to stop (SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import aiomqtt

from bench.common import exit_on_sigterm, mqtt_client

COUNTS = {"connections": 0, "pushes": 0, "commands": 0, "results_sent": 0, "confirmed": 0, "refused": 0}


@dataclass
class Connection:
    client: aiomqtt.Client
    app_version: str
    command_type: str
    seen: dict[str, set[int]] = field(default_factory=dict)  # token -> command ids already executed
    request_id: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def subscribe(self, tokens: list[str]) -> None:
        filters: list[tuple[str, int]] = []
        for token in tokens:
            base = f"kp1/{self.app_version}/cex/{token}"
            filters += [
                (f"{base}/command/{self.command_type}/status", 1),
                (f"{base}/result/{self.command_type}/+/+", 1),
            ]
            self.seen[token] = set()
        for start in range(0, len(filters), 100):  # one SUBSCRIBE per 50 endpoints
            await self.client.subscribe(filters[start : start + 100])

    async def serve(self) -> None:
        async for message in self.client.messages:
            levels = message.topic.value.split("/")
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if levels[4] == "command":
                self._on_push(levels[3], payload)
            elif levels[-1] == "status":
                COUNTS["confirmed"] += 1
            else:
                COUNTS["refused"] += 1

    def _on_push(self, token: str, payload: bytes) -> None:
        COUNTS["pushes"] += 1
        seen = self.seen.get(token)
        if seen is None or not payload:
            return
        for item in json.loads(payload):
            command_id = item["id"]
            if command_id in seen:
                continue
            seen.add(command_id)
            received = time.monotonic()
            COUNTS["commands"] += 1
            self.request_id += 1
            topic = f"kp1/{self.app_version}/cex/{token}/result/{self.command_type}/{self.request_id}"
            body = json.dumps(
                [{"id": command_id, "statusCode": 200, "reasonPhrase": "OK", "payload": {"rx": received}}]
            )
            task = asyncio.create_task(self._send(topic, body.encode()))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _send(self, topic: str, body: bytes) -> None:
        await self.client.publish(topic, body, qos=1)
        COUNTS["results_sent"] += 1


async def run(args: argparse.Namespace) -> None:
    tokens = [f"{args.prefix}{i}" for i in range(args.start, args.start + args.count)]
    groups = [tokens[i : i + args.tokens_per_client] for i in range(0, len(tokens), args.tokens_per_client)]
    started = time.monotonic()
    slots = asyncio.Semaphore(args.connect_concurrency)
    async with AsyncExitStack() as stack:

        async def connect(index: int, group: list[str]) -> Connection:
            async with slots:
                client = mqtt_client(args.port, f"{args.app_version}-{args.start}-{index}", keepalive=300)
                await stack.enter_async_context(client)
                connection = Connection(client, args.app_version, args.command_type)
                await connection.subscribe(group)
                COUNTS["connections"] += 1
                return connection

        connections = await asyncio.gather(*(connect(i, g) for i, g in enumerate(groups)))
        print(f"READY {len(tokens)} {time.monotonic() - started:.3f}", flush=True)
        async with asyncio.TaskGroup() as tasks:
            for connection in connections:
                tasks.create_task(connection.serve())


def main() -> None:
    parser = argparse.ArgumentParser(description="bench multi-endpoint device process")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--app-version", required=True)
    parser.add_argument("--command-type", default="bench")
    parser.add_argument("--prefix", default="dev")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--tokens-per-client", type=int, default=1)
    parser.add_argument("--connect-concurrency", type=int, default=32)
    args = parser.parse_args()
    exit_on_sigterm(lambda: print("STATS " + json.dumps(COUNTS), flush=True))
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
