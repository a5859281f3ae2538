"""BufferedReads: paho's packet parser fed from one large recv per burst, through a real socket."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from broker_bridge.paho_io import BufferedReads


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
    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[str, bytes]] = []
        self.paho.on_message = lambda client, userdata, message: self.received.append((message.topic, message.payload))
        self.syscalls = 0
        raw = self.paho._sock_recv

        def counted(size: int) -> bytes:
            self.syscalls += 1
            return raw(size)

        self.paho._sock_recv = counted  # type: ignore[method-assign]
        self.buffered = BufferedReads(self.paho)


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
