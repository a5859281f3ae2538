"""Socket I/O for paho: a burst of packets read with one ``recv`` and written with one ``send``.

paho 2.x makes several system calls per MQTT packet, each releasing and retaking the GIL that the
store's thread also wants. These wrap a paho client's socket calls (paho internals, like the manual
ack in ``bridge.MqttLink``); one pair per connection: aiomqtt makes a new paho client for each.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

DISCONNECT = 0xE0  # paho closes the socket as soon as it has "sent" this packet
PUBLISH = 0x3
REPLY_LEVELS = (b"status", b"error")  # a topic ending so is a reply or push: the bridge drops it


@dataclass(slots=True)
class Split:
    kept: bytes  # the complete packets to hand to paho
    acks: list[bytes]  # the packet ids of the QoS 1 replies dropped (each needs its PUBACK)
    end: int  # where the complete packets end (the rest is the start of one still arriving)
    dropped: int  # replies dropped, QoS 0 and 1


def split_replies(buf: bytes | bytearray, *, drop: bool = True) -> Split:
    """The complete packets at the start of ``buf``, without the PUBLISHes of replies and pushes
    (QoS 0 and 1) unless not ``drop``. A malformed length keeps everything from there on, for
    paho to refuse."""
    kept: list[bytes] = []  # runs of packets kept, each copied once
    acks: list[bytes] = []
    run, pos, n, dropped = 0, 0, len(buf), 0
    while n - pos >= 2:
        value, multiplier, i = 0, 1, pos + 1
        while True:
            if i >= n:
                return Split(b"".join([*kept, buf[run:pos]]), acks, pos, dropped)  # the length is cut off
            byte = buf[i]
            value += (byte & 0x7F) * multiplier
            i += 1
            if not byte & 0x80:
                break
            multiplier *= 128
            if multiplier > 128**3:  # not MQTT: paho's parser ends the connection
                return Split(b"".join([*kept, buf[run:]]), acks, n, dropped)
        end = i + value
        if end > n:
            break
        first = buf[pos]
        if drop and first >> 4 == PUBLISH and value >= 2:
            topic_end = i + 2 + (buf[i] << 8 | buf[i + 1])
            qos = (first >> 1) & 3
            whole = topic_end + 2 * qos <= end  # the topic, and the packet id of a QoS 1 publish
            if qos < 2 and whole and bytes(buf[i + 2 : topic_end]).rpartition(b"/")[2] in REPLY_LEVELS:
                if qos == 1:
                    acks.append(bytes(buf[topic_end : topic_end + 2]))
                kept.append(bytes(buf[run:pos]))
                run, pos, dropped = end, end, dropped + 1
                continue
        pos = end
    return Split(b"".join([*kept, buf[run:pos]]), acks, pos, dropped)


class BufferedReads:
    """Serve paho's socket reads from one large ``recv`` per burst instead of three or more per packet.

    paho 2.x reads a packet as a 1-byte ``recv`` for its type, a 1-byte ``recv`` per byte of its
    length and one for its body, and ends each burst with a ``recv`` that raises BlockingIOError:
    measured, ``_sock_recv`` was 10% of the bridge's event loop under load. This wraps the client's
    ``_sock_recv`` (a paho internal, like the manual ack) with a buffer, and its ``loop_read`` so
    that nothing buffered waits for the socket to become readable again (it would not: the kernel
    has handed it over already). One per connection: aiomqtt makes a new paho client for each.
    """

    CHUNK = 65_536

    def __init__(
        self,
        paho: mqtt.Client,
        *,
        drop_replies: BufferedWrites | None = None,
        on_dropped: Callable[[int], None] = lambda n: None,
    ) -> None:
        """``drop_replies``: PUBLISHes whose topic ends in ``/status`` or ``/error`` (the bridge's
        own replies and pushes, handed back by a shared subscription, which may not ask for MQTT 5
        "no local") are acknowledged here, through these writes, and never reach paho: the bridge
        would parse, ignore and acknowledge each (measured: 0.3 ms of CPU per command)."""
        self._paho = paho
        self._recv = paho._sock_recv
        self._loop_read = paho.loop_read
        self._data = b""
        self._pos = 0
        self._draining = False
        self._writes = drop_replies
        self._tail = bytearray()  # with drop_replies: the start of a packet not yet complete
        self._on_dropped = on_dropped
        paho._sock_recv = self.recv  # type: ignore[method-assign]
        paho.loop_read = self.loop_read  # type: ignore[method-assign]

    @property
    def buffered(self) -> int:
        return len(self._data) - self._pos

    def recv(self, bufsize: int) -> bytes:
        if self._pos >= len(self._data):
            if self._draining:  # the rest of a packet cut at the buffer's end: next readable event
                raise BlockingIOError
            data = self._refill()
            if not data:
                return data
            self._data, self._pos = data, 0
        chunk = self._data[self._pos : self._pos + bufsize]
        self._pos += len(chunk)
        return chunk

    def _refill(self) -> bytes:
        """The next bytes for paho: b"" at EOF; raises BlockingIOError when there are none yet."""
        while True:
            data = self._recv(self.CHUNK)  # raises BlockingIOError when there is nothing; b"" at EOF
            writes = self._writes
            if not data or writes is None:
                return data
            self._tail += data
            # No room for acknowledgements (the socket is backed up): paho takes these, as without us.
            split = split_replies(self._tail, drop=writes.buffered < writes.LIMIT)
            del self._tail[: split.end]
            if split.acks:
                writes.send(b"".join(b"\x40\x02" + packet_id for packet_id in split.acks))  # PUBACK, success
                self._paho._call_socket_register_write()
            if split.dropped:
                self._on_dropped(split.dropped)
            if split.kept:
                return split.kept
            # only replies, or a packet's start: read on until the socket has no more (BlockingIOError)

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """paho's, then parse what is left in the buffer without reading the socket again: under a
        steady inflow, reading on would keep this callback from ever returning to the event loop."""
        rc = self._loop_read(max_packets)
        self._draining = True
        try:
            while rc == mqtt.MQTT_ERR_SUCCESS and self.buffered:
                rc = self._loop_read(max_packets)
        finally:
            self._draining = False
        return rc


class BufferedWrites:
    """Send what paho writes in one pass over its queue with one ``send`` instead of one per packet.

    With aiomqtt, paho queues every packet and writes its whole queue when the socket is writable,
    one ``send`` per packet: under load that is a system call for each of the bridge's publishes and
    acknowledgements (8 per command), each a TCP segment for the broker to read. Here paho's
    ``_sock_send`` only collects the packets, and ``loop_write`` sends them together at its end.
    What the socket does not take stays here, in order, ahead of anything paho writes later, and
    keeps paho asking for writable events (``want_write``) until it is out. Past ``LIMIT`` bytes
    paho is told the socket would block, so it keeps the rest queued as it does for a full socket.

    For paho a packet is written once it is here: a QoS 0 publish counts as published (its
    ``on_publish``, ``wait_for_publish``) before it reaches the socket, and a connection that breaks
    before the flush loses it. The bridge relies on neither: its QoS 1 publishes wait for the
    broker's PUBACK, and an unsent PUBACK gets its message redelivered.
    """

    LIMIT = 262_144

    def __init__(self, paho: mqtt.Client) -> None:
        self._paho = paho
        self._send = paho._sock_send
        self._loop_write = paho.loop_write
        self._want_write = paho.want_write
        self._chunks: list[bytes] = []
        self._size = 0
        self.sends = 0  # system calls made, for tests
        paho._sock_send = self.send  # type: ignore[method-assign]
        paho.loop_write = self.loop_write  # type: ignore[method-assign]
        paho.want_write = self.want_write  # type: ignore[method-assign]
        paho._sock_close = self._closing(paho._sock_close)  # type: ignore[method-assign]

    @property
    def buffered(self) -> int:
        return self._size

    def send(self, buf: bytes | bytearray) -> int:
        """paho's ``_sock_send``: take the packet (all of it) to send at the end of ``loop_write``."""
        if self._size >= self.LIMIT:
            raise BlockingIOError
        if buf[:1] and buf[0] & 0xF0 == DISCONNECT:
            # paho closes the socket right after this packet: it and everything before it go now.
            self._flush()  # on a lost connection it drops the rest, and paho's own send reports the loss
            if self._size:
                raise BlockingIOError  # the rest first, on the next writable event
            self.sends += 1
            return self._send(buf)
        self._chunks.append(bytes(buf))
        self._size += len(buf)
        return len(buf)

    def want_write(self) -> bool:
        return self._size > 0 or self._want_write()

    def loop_write(self) -> MQTTErrorCode:
        rc = self._loop_write()  # hands every queued packet to send(); registers for writable events
        if rc != mqtt.MQTT_ERR_SUCCESS or not self._size:
            return rc
        if not self._flush():
            return self._paho._loop_rc_handle(mqtt.MQTT_ERR_CONN_LOST)
        if not self.want_write():
            self._paho._call_socket_unregister_write()
        return mqtt.MQTT_ERR_SUCCESS

    def _flush(self) -> bool:
        """Send what is collected, as much as the socket takes; False: the connection is lost, and
        what was collected for it with it."""
        if not self._size:
            return True
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        try:
            if (sock := self._paho._sock) is None:
                raise ConnectionError("no socket")
            self.sends += 1
            sent = sock.send(data)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            # TLS: the retry must start with these same bytes (it may be longer, never shorter or
            # reordered); CPython lets OpenSSL accept the moved, grown buffer.
            sent = 0
        except OSError:
            self._chunks, self._size = [], 0
            return False
        rest = data[sent:]
        self._chunks, self._size = ([rest], len(rest)) if rest else ([], 0)
        return True

    def _closing(self, close: Callable[[], None]) -> Callable[[], None]:
        def sock_close() -> None:
            """Whatever paho closes the socket for, what it already counts as sent goes first."""
            self._flush()
            self._chunks, self._size = [], 0
            close()

        return sock_close


class SessionWatch:
    """Whether the broker kept the session, from each CONNACK's session-present flag (paho's
    ``on_connect`` flags; aiomqtt does not pass them on). Wraps aiomqtt's own ``on_connect``."""

    def __init__(self, paho: mqtt.Client) -> None:
        self.present: bool | None = None  # None: no CONNACK yet
        self._inner: Callable[..., None] | None = paho.on_connect
        paho.on_connect = self._on_connect

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags, *rest: object) -> None:
        self.present = bool(getattr(flags, "session_present", False))
        if self._inner is not None:
            self._inner(client, userdata, flags, *rest)
