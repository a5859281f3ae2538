"""BufferedWrites: what paho writes in one pass goes out in one send, in order, through a real socket."""

from __future__ import annotations

from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import MQTTErrorCode

from broker_bridge.paho_io import BufferedWrites
from tests.test_buffered_reads import PahoOnSocketPair, publish_packet


class Rig(PahoOnSocketPair):
    """Driven as aiomqtt drives paho: ``loop_write`` is called while it has asked for writable
    events (``registered``)."""

    def __init__(self) -> None:
        super().__init__()
        self.broker.settimeout(5)
        self.registered = False
        self.paho.on_socket_register_write = lambda client, userdata, sock: self._register(True)
        self.paho.on_socket_unregister_write = lambda client, userdata, sock: self._register(False)
        self.disconnects: list[object] = []
        self.paho.on_disconnect = lambda client, userdata, flags, rc, props: self.disconnects.append(rc)
        self.writes = BufferedWrites(self.paho)

    def _register(self, on: bool) -> None:
        self.registered = on

    def queue(self, *packets: bytes) -> None:
        for packet in packets:  # as QoS 1: paho calls no on_publish when it is written
            assert self.paho._packet_queue(0x30, packet, 1, 1) == mqtt.MQTT_ERR_SUCCESS

    def received(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.broker.recv(size - len(data))
            assert chunk, "the socket closed early"
            data += chunk
        return data


@pytest.fixture
def rig() -> Iterator[Rig]:
    made = Rig()
    yield made
    made.close()


def test_a_pass_over_the_queue_is_one_send(rig: Rig) -> None:
    """paho alone makes one send per packet; the packets arrive whole and in order."""
    packets = [publish_packet(f"t/{n}", bytes([n]) * 50) for n in range(5)]
    rig.queue(*packets)
    assert rig.registered
    assert rig.paho.loop_write() == mqtt.MQTT_ERR_SUCCESS
    assert rig.received(sum(map(len, packets))) == b"".join(packets)
    assert rig.writes.sends == 1
    assert rig.writes.buffered == 0
    assert not rig.paho.want_write()
    assert not rig.registered  # nothing left: no more writable events wanted


def test_what_a_full_socket_does_not_take_goes_first_later(rig: Rig) -> None:
    """A partial send keeps the rest, ahead of packets queued after it, until the socket drains."""
    big = [publish_packet(f"big/{n}", bytes([n]) * 200_000) for n in range(3)]
    rig.queue(*big)
    rig.paho.loop_write()
    assert rig.writes.buffered > 0  # a socket pair's buffer is far below 600 kB
    assert rig.paho.want_write()
    assert rig.registered
    late = publish_packet("late", b"after the big ones")
    rig.queue(late)
    expected = b"".join([*big, late])
    got = b""
    while len(got) < len(expected):
        got += rig.broker.recv(1 << 20)
        if rig.registered:
            assert rig.paho.loop_write() == mqtt.MQTT_ERR_SUCCESS
    assert got == expected
    assert not rig.paho.want_write()
    assert not rig.registered


def test_past_the_limit_paho_keeps_its_packets_queued(rig: Rig) -> None:
    """Beyond LIMIT bytes the socket 'would block' for paho: the packet stays in paho's queue."""
    rig.writes.LIMIT = 20
    packets = [publish_packet(f"t/{n}", b"abcdefgh") for n in range(3)]  # 15 bytes each
    rig.queue(*packets)
    assert rig.paho.loop_write() == mqtt.MQTT_ERR_SUCCESS
    assert rig.received(30) == packets[0] + packets[1]
    assert len(rig.paho._out_packet) == 1
    assert rig.registered  # paho still has one to write
    assert rig.paho.loop_write() == mqtt.MQTT_ERR_SUCCESS
    assert rig.received(15) == packets[2]
    assert rig.writes.sends == 2
    assert not rig.registered


def test_a_disconnect_sends_everything_before_paho_closes_the_socket(rig: Rig) -> None:
    """paho closes the socket right after 'sending' DISCONNECT: nothing queued before it is lost."""
    packet = publish_packet("t/last", b"before the end")
    rig.queue(packet)
    rig.paho.disconnect()
    rig.paho.loop_write()
    assert rig.received(len(packet) + 2) == packet + bytes([0xE0, 0x00])
    assert rig.broker.recv(10) == b""  # then closed
    assert rig.paho._sock is None


def test_a_broken_connection_is_reported_as_lost(rig: Rig) -> None:
    """A send that fails (the peer is gone) ends the connection as paho's own send would."""
    rig.broker.close()
    rig.queue(publish_packet("t/x", b"nobody reads this"))
    assert rig.paho.loop_write() == MQTTErrorCode.MQTT_ERR_CONN_LOST
    assert rig.paho._sock is None
    assert len(rig.disconnects) == 1
    assert rig.writes.buffered == 0
