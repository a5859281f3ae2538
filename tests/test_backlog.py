"""SIGTERM with a backlog on the embedded broker: no result the broker acknowledged is lost.

Shaped like the attack that found the defect: a raw MQTT client pipelines 3,000 QoS 1 results without
flow control, serve gets SIGTERM while they are still being worked through, and every result the
broker PUBACKed must be in the database after the restart.
"""

from __future__ import annotations

import asyncio
import json
import signal
import struct
from pathlib import Path

import pytest

from broker_bridge.commands import CommandState
from broker_bridge.service import CommandService
from broker_bridge.store import CommandQuery
from broker_bridge.store.sqlite import SqliteStore
from broker_bridge.topics import Target
from tests import raw_mqtt
from tests.test_process import ServeProcess, serve  # noqa: F401 - the fixture

TOTAL = 3000
WAIT_S = 30.0
PUBACK, PUBLISH = 0x40, 0x30


def publish_qos1(topic: str, payload: bytes, packet_id: int, *, dup: bool = False) -> bytes:
    return raw_mqtt.packet(
        0x32 | (0x08 if dup else 0), raw_mqtt.mqtt_string(topic.encode()) + struct.pack("!H", packet_id) + payload
    )


class RawDevice:
    """A device on a raw socket: publishes QoS 1 as fast as TCP takes them, records each PUBACK."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.acked: set[int] = set()

    @classmethod
    async def connect(cls, port: int, client_id: str) -> RawDevice:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw_mqtt.connect(client_id))
        connack = await asyncio.wait_for(reader.readexactly(4), WAIT_S)
        assert connack == b"\x20\x02\x00\x00", connack
        return cls(reader, writer)

    async def read_until_closed(self) -> None:
        """Record PUBACKs; acknowledge what the broker hands us (the bridge's replies)."""
        try:
            while True:
                head = await self.reader.readexactly(1)
                length, shift = 0, 0
                while (digit := (await self.reader.readexactly(1))[0]) & 0x80:
                    length, shift = length | (digit & 0x7F) << shift, shift + 7
                body = await self.reader.readexactly(length | digit << shift)
                if head[0] & 0xF0 == PUBACK:
                    self.acked.add(struct.unpack("!H", body[:2])[0])
                elif head[0] & 0xF0 == PUBLISH and head[0] & 0x06:
                    topic_length = struct.unpack("!H", body[:2])[0]
                    packet_id = body[2 + topic_length : 4 + topic_length]
                    self.writer.write(raw_mqtt.packet(PUBACK, packet_id))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writer.close()


ENDPOINTS = 4  # each stays under max_outstanding_per_endpoint


async def pending_commands(db: Path, app_version: str, count: int) -> list[tuple[int, str]]:
    """Commands spread over the endpoints: (id, the topic its result goes to)."""
    async with SqliteStore(db) as store:
        service = CommandService(store)
        made = []
        for n in range(count):
            target = Target(app_version=app_version, endpoint_token=f"dev{n % ENDPOINTS}", command_type="reboot")
            command = await service.invoke(target, {"n": n}, ttl_s=3600)
            made.append((command.id, f"kp1/{app_version}/cex/{target.endpoint_token}/result/reboot"))
        return made


async def states(db: Path, ids: list[int]) -> dict[int, CommandState]:
    async with SqliteStore(db) as store:
        stored = await store.history(CommandQuery(limit=2 * TOTAL))
    return {c.id: c.state for c in stored if c.id in ids}


def result_body(command_id: int) -> bytes:
    return json.dumps({"id": command_id, "statusCode": 200, "reasonPhrase": "OK"}).encode()


@pytest.mark.slow
async def test_sigterm_with_a_backlog_loses_no_acknowledged_result(
    serve: ServeProcess,  # noqa: F811 - the fixture imported above
    app_version: str,
) -> None:
    """3,000 pipelined results, SIGTERM mid-backlog: every PUBACKed result is executed after the restart,
    and the device's resend of the rest (what MQTT asks of it) completes all 3,000."""
    made = await pending_commands(serve.db, app_version, TOTAL)
    ids = [cid for cid, _ in made]
    serve.start()
    device = await RawDevice.connect(serve.port, "backlog-dev")
    reading = asyncio.create_task(device.read_until_closed())
    device.writer.write(b"".join(publish_qos1(topic, result_body(cid), n + 1) for n, (cid, topic) in enumerate(made)))
    await device.writer.drain()
    while not device.acked:  # noqa: ASYNC110 - the bridge is working through the backlog
        await asyncio.sleep(0.005)
    code = await asyncio.to_thread(serve.signal, signal.SIGTERM)
    await asyncio.wait_for(reading, WAIT_S)
    await device.writer.wait_closed()
    assert code == 0, serve.log.read_text()[-2000:]
    acked_ids = [ids[packet_id - 1] for packet_id in device.acked]
    unacked = [n + 1 for n in range(TOTAL) if n + 1 not in device.acked]
    print(f"SIGTERM with a backlog: {len(acked_ids)} of {TOTAL} PUBACKed before the stop")

    after_restart = await states(serve.db, acked_ids)
    lost = [cid for cid in acked_ids if after_restart.get(cid) is not CommandState.EXECUTED]
    assert lost == [], f"{len(lost)} of {len(acked_ids)} acknowledged results lost"

    serve.start()
    device = await RawDevice.connect(serve.port, "backlog-dev")
    reading = asyncio.create_task(device.read_until_closed())
    resend = (publish_qos1(made[n - 1][1], result_body(made[n - 1][0]), n, dup=True) for n in unacked)
    device.writer.write(b"".join(resend))
    await device.writer.drain()
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while len(device.acked) < len(unacked) and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    assert device.acked == set(unacked)
    device.writer.close()
    await reading
    await device.writer.wait_closed()
    final = await states(serve.db, ids)
    assert [cid for cid in ids if final[cid] is not CommandState.EXECUTED] == []
