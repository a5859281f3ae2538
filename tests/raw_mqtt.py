"""MQTT 3.1.1 packets by hand, for tests that must break the rules a client library keeps."""

from __future__ import annotations

import struct


def mqtt_string(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def packet(first_byte: int, body: bytes) -> bytes:
    """A packet with the spec's variable-length 'remaining length'."""
    size, encoded = len(body), bytearray()
    while True:
        size, digit = divmod(size, 128)
        encoded.append(digit | (0x80 if size else 0))
        if not size:
            return bytes([first_byte, *encoded]) + body


def connect(client_id: str) -> bytes:
    """CONNECT, clean session, keep-alive 60 s."""
    return packet(0x10, mqtt_string(b"MQTT") + b"\x04\x02\x00\x3c" + mqtt_string(client_id.encode()))


def publish(topic: bytes, payload: bytes) -> bytes:
    """PUBLISH at QoS 0."""
    return packet(0x30, mqtt_string(topic) + payload)
