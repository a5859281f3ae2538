"""The embedded MQTT broker: amqtt plus the KP1 delivery rules Kaa devices rely on.

Kaa devices never SUBSCRIBE; they publish requests and expect replies on the matching
``.../status`` and ``.../error`` topics anyway. The plugin below remembers which endpoint
each connection speaks for and hands such replies straight to it.

Given Mosquitto's password and ACL files, the broker also refuses unknown clients and keeps each one to
its own topics, on every path a message can take: see broker_auth.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from amqtt.adapters import StreamWriterAdapter
from amqtt.contexts import BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import BrokerError
from amqtt.mqtt.publish import PublishPacket
from amqtt.plugins.base import BasePlugin
from amqtt.session import IncomingApplicationMessage, Session

from broker_bridge.bridge import Delivered, Receipt
from broker_bridge.broker_acks import AckHolder, DeferredAck
from broker_bridge.broker_auth import (
    PRINCIPAL,
    RECEIPT,
    Access,
    AccessControl,
    GuardedBroker,
    LoginPlugin,
    Principal,
    TopicAclPlugin,
    note_delivery,
    principal_of,
    screen,
)
from broker_bridge.errors import StartupError
from broker_bridge.routing import Subscriptions

EndpointSeen = Callable[[str, str], Awaitable[None]]  # (app_version, endpoint_token)
Presence = Callable[[str, str, bool], None]  # (app_version, endpoint_token, connected)
_Endpoint = tuple[str, str]

_log = logging.getLogger(__name__)

_REPLY_LEVELS = ("status", "error")
_MIN_LEVELS = 5  # prefix/av/extension/token/<resource>
_QOS_1 = 1
_LISTENER = "default"  # amqtt requires a listener of this name


@dataclass
class _Link:
    """What one live connection has said about itself: which endpoints it speaks for."""

    session: Any
    handler: Any
    endpoints: set[_Endpoint] = field(default_factory=set)  # published as these: replies delivered directly
    announced: set[_Endpoint] = field(default_factory=set)  # on_endpoint_seen already called for these


class _Kp1DeliveryPlugin(BasePlugin):  # type: ignore[misc]  # amqtt ships no type information
    """Associates connections with KP1 endpoints and delivers replies to unsubscribed devices."""

    @dataclass
    class Config:
        bridge_client_id: str
        kp1_prefix: str
        extension: str
        # Typed Any because dacite, which amqtt uses to build this, cannot check a callable.
        on_endpoint_seen: Any
        access: Any = None  # AccessControl, or None when anyone may read anything
        on_presence: Any = None  # Presence, or None: nobody wants to know

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._settings: _Kp1DeliveryPlugin.Config = context.config
        self._links: dict[str, _Link] = {}
        self._by_endpoint: dict[_Endpoint, set[str]] = {}  # endpoint -> client ids whose link delivers it
        self._present: dict[_Endpoint, set[str]] = {}  # endpoint -> client ids of live links that spoke for it
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    async def on_broker_message_broadcast(self, *, client_id: str, message: Any) -> None:
        levels = message.topic.split("/")
        if self._is_reply(levels):
            self._deliver_reply(levels, message.topic, bytes(message.data))
        elif client_id != self._settings.bridge_client_id and self._is_request(levels):
            self._associate(client_id, (levels[1], levels[3]), deliver=True)

    async def on_broker_client_subscribed(self, *, client_id: str, topic: str, qos: int) -> None:
        levels = topic.split("/")
        # A filter with a wildcard endpoint is a monitor, not a device: it names no endpoint.
        literal = self._is_ours(levels) and all(lvl not in ("", "+", "#") for lvl in (levels[1], levels[3]))
        if literal and client_id != self._settings.bridge_client_id:
            # A subscriber gets what it subscribed to and nothing more: a mosquitto_sub watching one
            # reply topic must not be handed pushes. Its subscription still earns a fresh push.
            self._associate(client_id, (levels[1], levels[3]), deliver=False)

    async def on_broker_client_disconnected(self, *, client_id: str, client_session: Any) -> None:
        link = self._links.get(client_id)
        # A half-open connection replaced by a reconnect disconnects late; keep the new one's links.
        if link is not None and link.session is client_session:
            self._forget(client_id)

    async def on_broker_pre_shutdown(self) -> None:
        await self.close()

    async def close(self) -> None:
        self._closing = True
        self._links.clear()
        self._by_endpoint.clear()
        self._present.clear()  # the store is told at the next start (EmbeddedBroker.presence_reset)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _is_ours(self, levels: list[str]) -> bool:
        s = self._settings
        return len(levels) >= _MIN_LEVELS and levels[0] == s.kp1_prefix and levels[2] == s.extension

    def _is_reply(self, levels: list[str]) -> bool:
        return self._is_ours(levels) and levels[-1] in _REPLY_LEVELS

    def _is_request(self, levels: list[str]) -> bool:
        # Any extension counts: a device publishing dcx data is still the device cex replies go to.
        well_formed = len(levels) >= _MIN_LEVELS and bool(levels[1]) and bool(levels[3])
        return well_formed and levels[0] == self._settings.kp1_prefix and levels[-1] not in _REPLY_LEVELS

    def _associate(self, client_id: str, endpoint: _Endpoint, *, deliver: bool) -> None:
        """Note what a connection said about itself; the first word about an endpoint earns a push."""
        connection = self._connection(client_id)
        if connection is None:
            return
        link = self._links.get(client_id)
        if link is None or link.handler is not connection[1]:
            self._forget(client_id)
            link = self._links[client_id] = _Link(*connection)
        if deliver and endpoint not in link.endpoints:
            link.endpoints.add(endpoint)
            self._by_endpoint.setdefault(endpoint, set()).add(client_id)
        if endpoint not in link.announced:
            link.announced.add(endpoint)
            present = self._present.setdefault(endpoint, set())
            present.add(client_id)
            if len(present) == 1:
                self._presence(endpoint, True)
            self._spawn(self._notify(endpoint))

    def _forget(self, client_id: str) -> None:
        link = self._links.pop(client_id, None)
        for endpoint in link.endpoints if link is not None else ():
            delivered_to = self._by_endpoint[endpoint]
            delivered_to.discard(client_id)
            if not delivered_to:
                del self._by_endpoint[endpoint]
        for endpoint in link.announced if link is not None else ():
            present = self._present.get(endpoint, set())
            present.discard(client_id)
            if not present:
                self._present.pop(endpoint, None)
                self._presence(endpoint, False)

    def _presence(self, endpoint: _Endpoint, connected: bool) -> None:
        """The first live connection to speak for an endpoint came, or the last one went."""
        on_presence: Presence | None = self._settings.on_presence
        if on_presence is None or self._closing:
            return
        try:
            on_presence(*endpoint, connected)
        except Exception:  # the broker must not fail a client for it
            _log.exception("on_presence failed for %s/%s", *endpoint)

    def _connection(self, client_id: str) -> tuple[Any, Any] | None:
        # amqtt 0.12.1 internal: BrokerContext lists sessions but not their protocol handlers, and only
        # a handler can publish to one client; Broker.sessions maps client_id -> (Session, handler).
        found: tuple[Any, Any] | None = self.context._broker_instance.sessions.get(client_id)
        return found

    def _deliver_reply(self, levels: list[str], topic: str, data: bytes) -> None:
        receipt = RECEIPT.get()  # a poll's reply of the bridge's: it hands the device commands
        for client_id in list(self._by_endpoint.get((levels[1], levels[3]), ())):
            link = self._links[client_id]
            if not self._subscribed(client_id, topic) and self._may_read(link, topic):
                sending = self._spawn(self._send(link.handler, topic, data))
                if receipt is not None and sending is not None:
                    note_delivery(receipt, sending, _QOS_1)

    def _may_read(self, link: _Link, topic: str) -> bool:
        # This delivery bypasses amqtt's routing and so its ACL check; links are keyed by client id, and a
        # client taking over another's id inherits its link, so the check is of this very session.
        access: AccessControl | None = self._settings.access
        return access is None or access.permits(principal_of(link.session), Access.RECEIVE, topic)

    def _subscribed(self, client_id: str, topic: str) -> bool:
        subscriptions: Subscriptions = self.context.subscriptions  # GuardedBroker's indexed table
        return any(
            held.client_id == client_id
            for topic_filter in subscriptions.matching(topic)
            for held, _ in subscriptions.get(topic_filter, ())
        )

    def _spawn(self, coro: Coroutine[Any, Any, bool | None]) -> asyncio.Task[Any] | None:
        # The broker waits for its own plugin event tasks on shutdown; a slow callback must not stall it,
        # so these run in tasks we own and cancel in close().
        if self._closing:
            coro.close()
            return None
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _notify(self, endpoint: _Endpoint) -> None:
        try:
            await self._settings.on_endpoint_seen(*endpoint)
        except Exception:
            _log.exception("on_endpoint_seen failed for %s/%s", *endpoint)

    @staticmethod
    async def _send(handler: Any, topic: str, data: bytes) -> bool:
        """Deliver and wait for the PUBACK; False if the client did not take it."""
        try:
            # amqtt 0.12.1 internal: BrokerProtocolHandler.mqtt_publish, the call the broker's own routing
            # makes; it waits for the PUBACK, which is why it runs in a task of its own.
            await handler.mqtt_publish(topic, data, _QOS_1, retain=False)
        except Exception as exc:  # a vanished or silent client must not hurt the broker
            _log.warning("direct reply delivery failed: %r", exc)
            return False
        return True


class LinkClosed(aiomqtt.MqttError):
    """The in-process session is gone: the embedded broker is shutting down."""


class _Sink(AckHolder):
    """What amqtt's routing calls on a session's protocol handler (amqtt 0.12.1 internal contract:
    session cleanup and takeover call ``stop`` and ``handle_connection_closed``; retained messages
    come through ``mqtt_publish``), for the in-process bridge session. Live messages come through
    ``take`` (GuardedBroker's routing), with the publisher's PUBACK held until the bridge acks."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[Delivered | None] = asyncio.Queue()
        self.closed = False

    def take(self, topic: str, data: bytes, qos: int, ack: DeferredAck | None, sender: str | None = None) -> None:
        # Called in routing order, so the inbox keeps the order the broker routed messages in (per
        # publisher: the order they were sent). Replies are what the bridge itself publishes (MQTT 5
        # "no local", as on external brokers); they are not the bridge's to hold.
        if topic.rsplit("/", 1)[-1] in _REPLY_LEVELS:
            return
        if self.closed:
            # The bridge's session is gone (a stop): no PUBACK, so the device sends it again. Letting
            # the routing's release send one PUBACKed what the broker read after the stop and
            # dropped: seen under load, 2,636 of 2,638 acknowledged results lost on SIGTERM.
            if ack is not None:
                ack.hold()
            return
        if ack is None:
            self.inbox.put_nowait(Delivered(topic, data, qos, sender=sender))
            return
        ack.hold()
        self.inbox.put_nowait(Delivered(topic, data, qos, release=ack.release, sender=sender))

    async def mqtt_publish(
        self, topic: str, data: bytes | bytearray, qos: int | None, retain: bool, ack_timeout: Any = None
    ) -> None:
        self.take(topic, bytes(data), qos or 0, None)

    async def stop(self) -> None:
        self.close()

    async def handle_connection_closed(self) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.inbox.put_nowait(None)


class InProcessLink:
    """The bridge's session with the embedded broker, without a socket: a ``bridge.Link``.

    It publishes through the path amqtt takes for a client's PUBLISH once decoded
    (``Broker._handle_message_delivery``: plugin events, the ACL check, routing, retained storage),
    so subscribers, retained lists and the KP1 reply delivery see the same as from a TCP client; and
    it receives through a session whose protocol handler is a queue. Measured: the bridge's own TCP
    session cost the process 32 of about 46 MQTT packet encodings and decodings per command.

    ``ack`` sends the device's PUBACK (broker_acks): a device's QoS 1 message is acknowledged only
    once the bridge has committed and answered it, as on an external broker. What is queued here at
    a crash or stop was never acknowledged, so the device sends it again; what the bridge committed
    is republished on start.
    """

    def __init__(self, broker: GuardedBroker, client_id: str, principal: Principal) -> None:
        self._broker = broker
        self._session = Session()
        self._session.client_id = client_id
        self._session.clean_session = True
        self._session.attributes[PRINCIPAL] = principal  # the ACL plugin lets the bridge do anything
        self._session.transitions.connect()
        self._sink = _Sink()
        self._outgoing: deque[tuple[IncomingApplicationMessage, asyncio.Future[None], Receipt | None]] = deque()
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        broker._sessions[client_id] = (self._session, self._sink)  # amqtt internal: client_id -> (Session, handler)

    @property
    def queued(self) -> int:
        """Messages routed to the bridge that it has not taken yet."""
        return self._sink.inbox.qsize()

    def start(self) -> None:
        self._worker = asyncio.create_task(self._deliver(), name="in-process-link")

    async def subscribe(self, filters: list[str]) -> None:
        for topic_filter in filters:
            granted = await self._broker.add_subscription((topic_filter, _QOS_1), self._session)
            if granted not in (0, 1, 2):
                raise StartupError(f"the embedded broker refused the bridge's subscription to {topic_filter!r}")

    async def messages(self) -> AsyncIterator[Delivered]:
        while (message := await self._sink.inbox.get()) is not None:
            yield message
        self._sink.inbox.put_nowait(None)  # for any other reader
        raise LinkClosed("the embedded broker closed the bridge's session")

    def send(
        self, topic: str, payload: bytes, *, qos: int, retain: bool = False, receipt: Receipt | None = None
    ) -> asyncio.Future[None]:
        """Queue a publish; it is routed in call order and the future resolves once it is.
        ``receipt``: told as the broker hands it to a device's session and the device acknowledges."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._sink.closed or self._worker is None:
            future.set_exception(LinkClosed("the embedded broker closed the bridge's session"))
            return future
        message = IncomingApplicationMessage(None, topic, qos, payload, retain)
        # amqtt reads the retain flag from the packet the message came in.
        message.publish_packet = PublishPacket.build(topic, payload, None, False, qos, retain)
        self._outgoing.append((message, future, receipt))
        self._wake.set()
        return future

    def ack(self, message: Delivered) -> None:
        if message.release is not None:
            message.release()

    async def _deliver(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outgoing:
                message, future, receipt = self._outgoing[0]
                decoded = loop.create_future()  # what amqtt's client loop hands over: the decoded message
                decoded.set_result(message)
                try:
                    # amqtt 0.12.1 internal: what Broker._client_message_loop calls for a client's PUBLISH.
                    token = RECEIPT.set(receipt)
                    try:
                        routed = await self._broker._handle_message_delivery(self._session, self._sink, decoded)
                    finally:
                        RECEIPT.reset(token)
                except Exception as exc:  # a failing plugin must cost this publish only
                    routed = False
                    _log.warning("in-process publish to %s failed: %r", message.topic, exc)
                self._outgoing.popleft()  # only now: a cancelled delivery leaves its future to close()
                if future.done():
                    continue
                if routed:
                    future.set_result(None)
                else:
                    refused = f"the embedded broker refused a publish to {message.topic!r}"
                    future.set_exception(aiomqtt.MqttError(refused))

    async def close(self) -> None:
        """Detach from the broker; publishes not yet routed fail with LinkClosed. From now on the
        broker acknowledges no client's QoS 1 publish: the broker may still read a device's backlog
        until its connections close, and a PUBACK for what nobody stores loses it (measured under
        load: 2,636 of 2,638 PUBACKed results lost on SIGTERM)."""
        self._broker.acks_held = True
        self._sink.close()
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        while self._outgoing:
            _, future, _ = self._outgoing.popleft()
            if not future.done():
                future.set_exception(LinkClosed("the embedded broker closed the bridge's session"))
        client_id = self._session.client_id
        if self._broker._sessions.get(client_id, (None,))[0] is self._session:
            del self._broker._sessions[client_id]
            await self._broker._del_all_subscriptions(self._session)


def _listen_error(host: str, port: int, exc: OSError) -> StartupError:
    reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
    return StartupError(
        f"cannot listen on {host}:{port}: {reason}; pass --mqtt-listen HOST:PORT to use another port, "
        "or --broker-url mqtt://host:port to use an external broker instead"
    )


class EmbeddedBroker:
    """An amqtt broker on host:port that also serves Kaa devices which never subscribe."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        bridge_client_id: str,
        on_endpoint_seen: EndpointSeen,
        on_presence: Presence | None = None,
        kp1_prefix: str = "kp1",
        extension: str = "cex",
        bridge_password: str = "",
        password_file: Path | None = None,
        acl_file: Path | None = None,
        in_process_bridge: bool = False,
    ) -> None:
        self._host = host
        self._in_process_bridge = in_process_bridge
        self._link: InProcessLink | None = None
        self._port = port
        self._bridge_password = bridge_password
        self._password_file = password_file
        self._acl_file = acl_file
        self._bridge_client_id = bridge_client_id
        self._plugin_config = {
            "bridge_client_id": bridge_client_id,
            "kp1_prefix": kp1_prefix,
            "extension": extension,
            "on_endpoint_seen": on_endpoint_seen,
            "on_presence": on_presence,
        }
        self._access: AccessControl | None = None
        self._broker: GuardedBroker | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> EmbeddedBroker:
        self._access = AccessControl.from_files(
            bridge_client_id=self._bridge_client_id,
            # In-process, the bridge never logs in: without a secret nobody can use its id.
            bridge_password=None if self._in_process_bridge else self._bridge_password,
            password_file=self._password_file,
            acl_file=self._acl_file,
        )
        try:
            await self._start()
        except BaseException:
            self._close_access()
            raise
        return self

    async def _start(self) -> None:
        # We own the listening socket (amqtt's "external" listener) so that a taken port is a plain
        # OSError here, not a logged amqtt traceback, and so shutdown can close every connection.
        try:
            server = await asyncio.start_server(self._serve, self._host, self._port, start_serving=False)
        except OSError as exc:
            raise _listen_error(self._host, self._port, exc) from exc
        broker = GuardedBroker(self._config())
        try:
            await broker.start()
        except BrokerError as exc:
            server.close()
            raise StartupError(f"the embedded MQTT broker cannot start: {exc}") from exc
        self._broker, self._server = broker, server
        if self._in_process_bridge:
            # Before any client can connect: the bridge's subscriptions are then in place before
            # amqtt routes its first message, and no connection can claim the bridge's client id.
            principal = Principal(self._bridge_client_id, self._bridge_client_id, bridge=True)
            self._link = InProcessLink(broker, self._bridge_client_id, principal)
            self._link.start()
        await server.start_serving()

    @property
    def link(self) -> InProcessLink:
        """The bridge's in-process session (``in_process_bridge=True``)."""
        if self._link is None:
            raise RuntimeError("the embedded broker was not started with in_process_bridge=True")
        return self._link

    def _close_access(self) -> None:
        if self._access is not None:
            self._access.close()
            self._access = None

    async def __aexit__(self, *exc: object) -> None:
        broker, server = self._broker, self._server
        if broker is None or server is None:
            return
        server.close()
        try:
            if self._link is not None:
                await self._link.close()
            await broker.shutdown()
        finally:
            self._broker = self._server = self._link = None
            await self._drop_connections()
            await server.wait_closed()
            self._close_access()

    async def _drop_connections(self) -> None:
        # Connections that never finished their CONNECT are no session, so amqtt leaves them open.
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, so the connection task is ours to cancel: Python 3.11's start_server logs
        # its own connection tasks as failed when they are cancelled.
        if self._broker is None:
            writer.close()
            return
        reserved = self._bridge_client_id if self._link is not None else None
        task = asyncio.create_task(self._connection(self._broker, self._access, reserved, reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    @staticmethod
    async def _connection(
        broker: GuardedBroker,
        access: AccessControl | None,
        reserved: str | None,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        try:
            source = await screen(reader, writer, access=access, sessions=broker.sessions, reserved=reserved)
            if source is not None:
                await broker.external_connected(source, StreamWriterAdapter(writer), listener_name=_LISTENER)
        finally:
            if access is not None:
                access.forget(writer)
            writer.close()

    def _config(self) -> BrokerConfig:
        # Listing plugins explicitly leaves out amqtt's defaults: $SYS, packet logging, persistence.
        # An auth plugin decides every CONNECT and topic plugins every publish, subscribe and delivery; with
        # no ACL there is no topic plugin at all, which keeps amqtt's per-delivery check free.
        listener = ListenerConfig(type=ListenerType.EXTERNAL, bind=f"{self._host}:{self._port}")
        access = self._access
        plugins: dict[str, Any] = {}
        if access is None:
            plugins["amqtt.plugins.authentication.AnonymousAuthPlugin"] = {"allow_anonymous": True}
        else:
            plugins[_path(LoginPlugin)] = {"access": access}
            if access.acl is not None:
                plugins[_path(TopicAclPlugin)] = {"access": access}
        plugins[_path(_Kp1DeliveryPlugin)] = {**self._plugin_config, "access": access}
        return BrokerConfig(listeners={_LISTENER: listener}, plugins=plugins)


def _path(plugin: type) -> str:
    return f"{plugin.__module__}.{plugin.__qualname__}"
