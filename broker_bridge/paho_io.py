"""Socket I/O for paho: a burst of packets read with one ``recv`` and written with one ``send``.

paho 2.x makes several system calls per MQTT packet, each releasing and retaking the GIL that the
store's thread also wants. These wrap a paho client's socket calls (paho internals, like the manual
ack in ``bridge.MqttLink``); one pair per connection: aiomqtt makes a new paho client for each.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

DISCONNECT = 0xE0  # paho closes the socket as soon as it has "sent" this packet


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

    def __init__(self, paho: mqtt.Client) -> None:
        self._recv = paho._sock_recv
        self._loop_read = paho.loop_read
        self._data = b""
        self._pos = 0
        self._draining = False
        paho._sock_recv = self.recv  # type: ignore[method-assign]
        paho.loop_read = self.loop_read  # type: ignore[method-assign]

    @property
    def buffered(self) -> int:
        return len(self._data) - self._pos

    def recv(self, bufsize: int) -> bytes:
        if self._pos >= len(self._data):
            if self._draining:  # the rest of a packet cut at the buffer's end: next readable event
                raise BlockingIOError
            data = self._recv(self.CHUNK)  # raises BlockingIOError when there is nothing; b"" at EOF
            if not data:
                return data
            self._data, self._pos = data, 0
        chunk = self._data[self._pos : self._pos + bufsize]
        self._pos += len(chunk)
        return chunk

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
