"""BufferedReads: paho's packet parser fed from one large recv per burst, through a real socket."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from broker_bridge.paho_io import BufferedReads, BufferedWrites


def publish_packet(topic: str, payload: bytes) -> bytes:
    """An MQTT QoS 0 PUBLISH, with the variable-length 'remaining length' of the spec."""
    body = len(topic).to_bytes(2, "big") + topic.encode() + payload
    n, length = len(body), bytearray()
    while True:
        n, digit = divmod(n, 128)
        length.append(digit | (0x80 if n else 0))
        if not n:
            return bytes([0x30]) + bytes(length) + body


class PahoOnSocketPair:
    """A paho client on one end of a socket pair, as if connected; the test plays the broker."""

    def __init__(self) -> None:
        self.paho = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.ours, self.broker = socket.socketpair()
        self.ours.setblocking(False)
        self.paho._sock = self.ours  # paho internal, as in the bridge

    def close(self) -> None:
        self.ours.close()
        self.broker.close()


class Rig(PahoOnSocketPair):
    def __init__(self, *, drop_replies: bool = False) -> None:
        super().__init__()
        self.received: list[tuple[str, bytes]] = []
        self.paho.on_message = lambda client, userdata, message: self.received.append((message.topic, message.payload))
        self.syscalls = 0
        raw = self.paho._sock_recv

        def counted(size: int) -> bytes:
            self.syscalls += 1
            return raw(size)

        self.paho._sock_recv = counted  # type: ignore[method-assign]
        self.writes = BufferedWrites(self.paho)
        self.counted: list[int] = []
        self.buffered = BufferedReads(
            self.paho, drop_replies=self.writes if drop_replies else None, on_dropped=self.counted.append
        )


@pytest.fixture
def rig() -> Iterator[Rig]:
    made = Rig()
    yield made
    made.close()


def test_a_burst_of_packets_is_parsed_from_one_recv(rig: Rig) -> None:
    """paho alone reads a packet with 3+ recv calls and stops after max_packets (1 when idle)."""
    big = b"x" * 300  # two bytes of remaining length
    rig.broker.sendall(publish_packet("t/1", b"one") + publish_packet("t/2", b"two") + publish_packet("t/3", big))
    assert rig.paho.loop_read() == mqtt.MQTT_ERR_SUCCESS
    assert rig.received == [("t/1", b"one"), ("t/2", b"two"), ("t/3", big)]  # none left waiting in the buffer
    assert rig.syscalls == 1
    assert rig.buffered.buffered == 0


def test_a_packet_split_across_reads_is_completed_by_the_next_one(rig: Rig) -> None:
    packet = publish_packet("t/split", b"y" * 1000)
    rig.broker.sendall(packet[:700])
    assert rig.paho.loop_read() == mqtt.MQTT_ERR_SUCCESS  # waits for the rest: socket drained
    assert rig.received == []
    rig.broker.sendall(packet[700:] + publish_packet("t/next", b"z"))
    assert rig.paho.loop_read() == mqtt.MQTT_ERR_SUCCESS
    assert rig.received == [("t/split", b"y" * 1000), ("t/next", b"z")]


def test_end_of_stream_is_a_lost_connection(rig: Rig) -> None:
    rig.broker.sendall(publish_packet("t/last", b"1"))
    rig.broker.close()
    assert rig.paho.loop_read() == mqtt.MQTT_ERR_SUCCESS  # what arrived before the end is handled
    assert rig.received == [("t/last", b"1")]
    assert rig.paho.loop_read() == mqtt.MQTT_ERR_CONN_LOST  # the socket stays readable at its end


def test_the_buffer_is_parsed_to_its_end_without_reading_the_socket_again(rig: Rig) -> None:
    """Under a steady inflow one readable event must return to the event loop: what is left over
    after paho's own read is parsed from the buffer, and a packet cut at its end waits."""
    rig.buffered.CHUNK = 16
    packets = [publish_packet(f"t/{n}", b"abcdefgh") for n in range(3)]  # 15 bytes each
    rig.broker.sendall(b"".join(packets))
    assert rig.paho.loop_read() == mqtt.MQTT_ERR_SUCCESS
    assert rig.received == [("t/0", b"abcdefgh")]  # the second packet's first byte was in the buffer
    assert rig.syscalls == 1
    while len(rig.received) < 3:  # each further readable event reads once more
        assert rig.paho.loop_read() == mqtt.MQTT_ERR_SUCCESS
    assert [topic for topic, _ in rig.received] == ["t/0", "t/1", "t/2"]
    assert rig.syscalls <= 4


def qos1_publish_packet(topic: str, packet_id: int, payload: bytes) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic.encode() + packet_id.to_bytes(2, "big") + payload
    assert len(body) < 128
    return bytes([0x32, len(body)]) + body


@pytest.fixture
def replies() -> Iterator[Rig]:
    """The bridge's configuration without "no local": replies are dropped and acknowledged here."""
    made = Rig(drop_replies=True)
    yield made
    made.close()


def test_the_bridges_own_replies_are_acknowledged_and_never_reach_paho(replies: Rig) -> None:
    """A shared subscription hands the bridge its own pushes and replies back (no "no local"):
    each QoS 1 one is PUBACKed with its packet id, QoS 0 ones just dropped; the rest, in order."""
    burst = (
        publish_packet("kp1/a/cex/t/command/reboot", b"{}")
        + qos1_publish_packet("kp1/a/cex/t/command/reboot/status", 7, b"[]")  # our push
        + publish_packet("kp1/a/cex/t/result/reboot/3/error", b"{}")  # a QoS 0 reply
        + qos1_publish_packet("cex/admin/a/t/invoke/reboot/1/status", 258, b"{}")
        + qos1_publish_packet("kp1/a/cex/t/result/reboot/status/x", 9, b"not a reply")
        + publish_packet("kp1/a/cex/t/result/statusx", b"nor this")
    )
    replies.broker.sendall(burst)
    assert replies.paho.loop_read() == mqtt.MQTT_ERR_SUCCESS
    assert [topic for topic, _ in replies.received] == [
        "kp1/a/cex/t/command/reboot",
        "kp1/a/cex/t/result/reboot/status/x",
        "kp1/a/cex/t/result/statusx",
    ]
    assert replies.counted == [3]
    replies.paho.loop_write()
    sent = replies.broker.recv(100)
    # PUBACKs of ids 7 and 258 (ours), then paho's own for id 9 (auto-ack here; manual in the bridge)
    assert sent == b"\x40\x02\x00\x07" + b"\x40\x02\x01\x02" + b"\x40\x02\x00\x09"


def test_a_reply_cut_across_reads_is_dropped_once_whole(replies: Rig) -> None:
    reply = qos1_publish_packet("kp1/a/cex/t/command/reboot/status", 5, b"[1]")
    after = publish_packet("t/after", b"z")
    replies.broker.sendall(reply[:3])  # not even the whole topic length
    assert replies.paho.loop_read() == mqtt.MQTT_ERR_SUCCESS
    replies.broker.sendall(reply[3:10])
    assert replies.paho.loop_read() == mqtt.MQTT_ERR_SUCCESS
    assert (replies.received, sum(replies.counted)) == ([], 0)
    replies.broker.sendall(reply[10:] + after)
    assert replies.paho.loop_read() == mqtt.MQTT_ERR_SUCCESS
    assert replies.received == [("t/after", b"z")]
    assert sum(replies.counted) == 1
    assert replies.writes.buffered == 4  # its PUBACK, until the next writable event


def test_with_the_write_side_backed_up_replies_go_to_paho_as_before(replies: Rig) -> None:
    """No room to queue a PUBACK: nothing is dropped (paho's own path acknowledges later)."""
    replies.writes.send(b"\x00" * replies.writes.LIMIT)
    replies.broker.sendall(publish_packet("kp1/a/cex/t/command/reboot/status", b"[]"))
    assert replies.paho.loop_read() == mqtt.MQTT_ERR_SUCCESS
    assert replies.received == [("kp1/a/cex/t/command/reboot/status", b"[]")]
    assert sum(replies.counted) == 0
