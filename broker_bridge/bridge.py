"""The MQTT side: connect, subscribe, dispatch device and admin requests, publish, reconnect.

Unexpected input is answered with a KP1 error body where a request ID allows it and is otherwise
logged and dropped; nothing a client sends can end the loop.
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import aiomqtt
import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from broker_bridge import cep, protocol
from broker_bridge.commands import to_record
from broker_bridge.config import BrokerAddress
from broker_bridge.delivery import MAX_PUSH_BYTES, first_message
from broker_bridge.errors import BridgeError, PayloadTooLarge, StoreUnavailable
from broker_bridge.outbox import Outbox, Publication, log_left_out
from broker_bridge.paho_io import BufferedReads, BufferedWrites, SessionWatch
from broker_bridge.rollout_service import Preview, RolloutService, parse_spec
from broker_bridge.rollouts import to_record as rollout_record
from broker_bridge.service import CommandService
from broker_bridge.topics import (
    AdminAction,
    AdminRequest,
    Codec,
    DeviceRequest,
    Resource,
    TopicError,
    TopicScheme,
    error_topic,
    status_topic,
)

log = structlog.get_logger(__name__)

NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # QoS 1 round trips stall ~40 ms without it
BACKOFF_S = (0.2, 30.0)
SESSION_EXPIRY_S = 7 * 86_400  # MQTT 5: how long the broker keeps our session while we are away
FINAL_FLUSH_S = 2.0
PENDING_CALLS_WARN = 100_000


@dataclass(frozen=True, slots=True)
class Delivered:
    """A message the broker handed the bridge; ``mid`` is the MQTT packet id to acknowledge (0: none),
    ``release`` the embedded broker's pending PUBACK to the publisher (None: none)."""

    topic: str
    payload: bytes
    qos: int
    mid: int = 0
    release: Callable[[], None] | None = None
    # Who published it: the MQTT username the embedded broker logged it in as, or on an external
    # broker the MQTT 5 user property ``invoked-by`` the publisher declared (None: not known).
    sender: str | None = None


@dataclass(frozen=True, slots=True)
class Receipt:
    """Whom to tell that a message handing commands to a device reached one of its sessions
    (``sent``) and that the device acknowledged it (``delivered``). Only the embedded broker can
    tell; an external broker says nothing about who received a publish."""

    sent: Callable[[], None]
    delivered: Callable[[], None]


class Link(Protocol):
    """The bridge's session with a broker: an MQTT connection (``MqttLink``), or in-process with
    the embedded broker (``broker.InProcessLink``). Failures are ``aiomqtt.MqttError``s."""

    async def subscribe(self, filters: list[str]) -> None: ...

    def messages(self) -> AsyncIterator[Delivered]: ...

    def send(
        self, topic: str, payload: bytes, *, qos: int, retain: bool = False, receipt: Receipt | None = None
    ) -> asyncio.Future[None]:
        """Publish; the future resolves once the broker has the message (see ``send`` below).
        ``receipt`` is told of the message's deliveries, where the broker can tell."""
        ...

    def ack(self, message: Delivered) -> None:
        """The message is handled (committed and answered): the broker may forget it."""
        ...


def client_options(address: BrokerAddress, client_id: str | None) -> dict[str, Any]:
    """How every aiomqtt client of broker-bridge reaches a broker: the bridge's session, the CLI's
    flush of its changes and the device simulator (login and TLS from the broker URL; client id
    None: a random one)."""
    return {
        "hostname": address.host,
        "port": address.port,
        "username": address.username,
        "password": address.password,
        "identifier": client_id,
        "socket_options": [NODELAY],
        "tls_context": ssl.create_default_context() if address.tls else None,
    }


class MqttLink:
    """A ``Link`` over an aiomqtt client: QoS 1 messages are acknowledged only once handled."""

    def __init__(
        self,
        client: aiomqtt.Client,
        *,
        mqtt5: bool,
        on_refused: Callable[[], None] = lambda: None,
        share_group: str | None = None,
        on_ignored: Callable[[int], None] = lambda n: None,
    ) -> None:
        """``on_ignored``: how many of the bridge's own replies and pushes came back and were dropped
        before parsing (without "no local": shared subscriptions and MQTT 3.1.1)."""
        self.client = client
        self.mqtt5 = mqtt5
        self.share_group = share_group
        self.on_refused = on_refused
        # aiomqtt 2.5 internal: its paho client. A QoS 1 message is acknowledged only once handled
        # (committed and answered), so the broker redelivers what a crash interrupted.
        client._client.manual_ack_set(True)
        writes = BufferedWrites(client._client)
        echoes = share_group is not None or not mqtt5  # what "no local" does not spare us
        BufferedReads(client._client, drop_replies=writes if echoes else None, on_dropped=on_ignored)
        on_publish = client._client.on_publish  # aiomqtt's: resolves the publish's waiter
        assert on_publish is not None
        self._on_publish: Callable[..., None] = on_publish
        client._client.on_publish = self._published

    def _published(self, paho: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any) -> None:
        """MQTT 5 brokers answer a refused publish (ACL: 0x87 Not authorized) with a failure code in
        its PUBACK; aiomqtt ignores the code. Retrying cannot help (the broker's configuration must
        change) and must not stall what follows, so the publish counts as done, loudly."""
        try:
            if reason.is_failure:
                pending = self.client._pending_publishes.get(mid)
                topic = pending.topic if isinstance(pending, _Ack) else None  # None: it timed out already
                log.error("publish_refused", topic=topic, mid=mid, reason=str(reason), hint="check the bridge's ACL")
                self.on_refused()
        finally:  # whatever happened above, the publish's waiter is resolved
            self._on_publish(paho, userdata, mid, reason, properties)

    async def subscribe(self, filters: list[str]) -> None:
        # MQTT 5 "no local": the broker does not hand the bridge its own pushes and replies back.
        # A shared subscription may not ask for it (MQTT 5, 3.8.3.1): a member is then handed some
        # of the instances' own publishes, and drops them as it drops foreign topics.
        for topic_filter in filters:
            if self.share_group is not None:
                await self.client.subscribe(f"$share/{self.share_group}/{topic_filter}", qos=1)
            elif self.mqtt5:
                await self.client.subscribe(topic_filter, options=SubscribeOptions(qos=1, noLocal=True))
            else:
                await self.client.subscribe(topic_filter, qos=1)

    async def messages(self) -> AsyncIterator[Delivered]:
        async for message in self.client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload or "").encode()
            yield Delivered(message.topic.value, payload, message.qos, message.mid, sender=_declared_sender(message))

    def send(
        self, topic: str, payload: bytes, *, qos: int, retain: bool = False, receipt: Receipt | None = None
    ) -> asyncio.Future[None]:
        return send(self.client, topic, payload, qos=qos, retain=retain)  # an external broker tells nothing

    def ack(self, message: Delivered) -> None:
        if message.qos > 0:
            self.client._client.ack(message.mid, message.qos)


class Bridge:
    """Runs the service's MQTT session until cancelled: over MQTT, reconnecting with backoff, or
    in-process with the embedded broker (``local``), where there is no connection to lose."""

    def __init__(
        self,
        service: CommandService,
        outbox: Outbox,
        *,
        address: BrokerAddress,
        scheme: TopicScheme,
        client_id: str,
        persistent_session: bool,
        max_payload_bytes: int,
        max_push_bytes: int = MAX_PUSH_BYTES,
        max_in_flight: int = 512,
        on_reconnect: Callable[[], None] = lambda: None,
        on_received: Callable[[str], None] = lambda kind: None,
        on_refused: Callable[[], None] = lambda: None,
        mqtt5: bool = False,
        local: Link | None = None,
        share_group: str | None = None,
    ) -> None:
        """``share_group``: subscribe as a member of this MQTT 5 shared-subscription group, so each
        inbound message reaches one of the instances. ``max_push_bytes``: a poll's reply carries
        the oldest commands that fit a message of that size (the device polls again for the rest)."""
        self.service = service
        self.share_group = share_group
        self.outbox = outbox
        self.address = address
        self.scheme = scheme
        self.client_id = client_id
        self.persistent_session = persistent_session
        self.max_payload_bytes = max_payload_bytes
        self.max_push_bytes = max_push_bytes
        self.max_in_flight = max_in_flight
        self.on_reconnect = on_reconnect
        self.on_received = on_received
        self.on_refused = on_refused
        self.mqtt5 = mqtt5
        self.local = local
        self.connected = asyncio.Event()
        self.reconnects = 0
        self._attempt = 0  # failed connection attempts since the last good session
        self._session: SessionWatch | None = None
        self._had_session = False  # this process held a persistent session with the broker before

    # -- connection ---------------------------------------------------------------------------
    def _client(self) -> aiomqtt.Client:
        client = aiomqtt.Client(
            **client_options(self.address, self.client_id),
            **self._session_options(),
            keepalive=30,
            timeout=10,
            max_inflight_messages=1000,
        )
        # aiomqtt warns on every call once more than 10 are pending; under load that is a log line
        # per publish (measured: 4.5% of the bridge's CPU). Hundreds in flight are normal here.
        client.pending_calls_threshold = PENDING_CALLS_WARN
        self._session = SessionWatch(client._client)  # aiomqtt internal: its paho client
        return client

    def _session_options(self) -> dict[str, Any]:
        """MQTT 3.1.1 clean_session, or MQTT 5 clean start plus a session expiry interval."""
        if not self.mqtt5:
            return {"clean_session": not self.persistent_session}
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = SESSION_EXPIRY_S if self.persistent_session else 0
        return {
            "protocol": aiomqtt.ProtocolVersion.V5,
            "clean_start": not self.persistent_session,
            "properties": properties,
        }

    async def run(self) -> None:
        while True:
            try:
                if self.local is not None:  # nothing to connect; a failed publish still restarts the session
                    await self._serve(self.local)
                else:
                    async with self._client() as client:
                        link = MqttLink(
                            client,
                            mqtt5=self.mqtt5,
                            on_refused=self.on_refused,
                            share_group=self.share_group,
                            on_ignored=self._ignored,
                        )
                        await self._serve(link)
            except* aiomqtt.MqttError as group:  # also raised from inside the session's TaskGroup
                error = str(group.exceptions[0])
            self.connected.clear()
            self._attempt += 1
            self.reconnects += 1
            self.on_reconnect()
            delay = min(BACKOFF_S[1], BACKOFF_S[0] * 2**self._attempt) * random.uniform(0.5, 1.0)
            log.warning("mqtt_disconnected", error=error, attempt=self._attempt, retry_in_s=round(delay, 2))
            await asyncio.sleep(delay)

    def _ignored(self, count: int) -> None:
        for _ in range(count):
            self.on_received("ignored")

    async def _serve(self, link: Link) -> None:
        # The embedded broker knows its sessions; an external one is told by the devices themselves.
        await link.subscribe(self.scheme.bridge_filters(presence=self.local is None))
        if self.local is None:
            present = self._session.present if self._session is not None else None
            log.info(
                "mqtt_connected",
                host=self.address.host,
                port=self.address.port,
                client_id=self.client_id,
                share_group=self.share_group,
                session_present=present,
            )
            if self.persistent_session and self._had_session and present is False:
                # The broker lost what it held for us while we were away (a broker restarted
                # without its persistence file): devices' messages queued for the bridge are gone.
                log.warning(
                    "broker_session_lost",
                    client_id=self.client_id,
                    hint="messages queued for the bridge while it was away were lost by the broker; "
                    "check the broker's persistence (Mosquitto: persistence true, autosave_interval)",
                )
            self._had_session = self.persistent_session
        else:
            log.info("broker_attached", mode="in-process", client_id=self.client_id)
        self._attempt = 0
        await self.outbox.recover()
        if self.outbox.retain:
            await self._republish_retained()
        self.connected.set()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.outbox.run(lambda p: self._publish(link, p)), name="mqtt-outbox")
                await self._receive(link, tasks)
        except asyncio.CancelledError:
            await self._final_flush(link)
            raise

    async def _final_flush(self, link: Link) -> None:
        """On shutdown, publish what is committed but not yet announced, for a bounded time."""
        try:
            await asyncio.wait_for(self.outbox.flush(lambda p: self._publish(link, p)), FINAL_FLUSH_S)
        except (TimeoutError, aiomqtt.MqttError) as exc:
            log.warning("shutdown_flush_incomplete", pending=self.outbox.pending, error=str(exc) or "timeout")

    async def _republish_retained(self) -> None:
        """Bring every retained list up to date: it may be stale after a crash or an outage."""
        now = self.service.clock()
        targets = {*await self.service.store.retained_targets(), *await self.service.store.all_open_targets(now)}
        self.outbox.republish(sorted(targets, key=lambda t: (t.app_version, t.endpoint_token, t.command_type)))

    def _publish(self, link: Link, publication: Publication) -> asyncio.Future[None]:
        return self._send(link, publication, qos=1)

    def _send(self, link: Link, publication: Publication, *, qos: int) -> asyncio.Future[None]:
        """Every message that hands commands to a device passes here, naming them in
        ``publication.command_ids``: the outbox's pushes and the replies to polls. Where the broker
        tells (embedded), their sentAt and deliveredAt follow from its deliveries."""
        receipt = None
        if ids := publication.command_ids:
            receipt = Receipt(
                sent=lambda: self.service.handed(ids), delivered=lambda: self.service.handed(ids, received=True)
            )
        return link.send(publication.topic, publication.payload, qos=qos, retain=publication.retain, receipt=receipt)

    async def _receive(self, link: Link, tasks: asyncio.TaskGroup) -> None:
        slots = asyncio.Semaphore(self.max_in_flight)  # back-pressure: stop reading when busy
        async for message in link.messages():
            await slots.acquire()
            task = tasks.create_task(self._handle(link, message))
            task.add_done_callback(lambda _: slots.release())

    # -- dispatch -----------------------------------------------------------------------------
    async def _handle(self, link: Link, message: Delivered) -> None:
        topic = message.topic
        try:
            await self._dispatch(link, topic, message.payload, message.qos, message.sender)
        except TopicError as exc:
            log.info("request_refused", topic=topic, reason=exc.reason)
            if exc.reply_topic is not None:
                await self._reply_error(link, exc.reply_topic, exc, exc.codec, message.qos)
        except aiomqtt.MqttError as exc:
            log.warning("reply_not_sent", topic=topic, error=str(exc))
        except Exception:  # a bug must cost one message, never the loop
            log.exception("message_handler_failed", topic=topic)
        link.ack(message)

    async def _dispatch(self, link: Link, topic: str, payload: bytes, qos: int, sender: str | None = None) -> None:
        if self.local is None and (endpoint := self.scheme.parse_presence(topic)) is not None:
            self.on_received("device")
            self._presence(topic, endpoint, payload)
        elif (rollout := self.scheme.parse_rollout_create(topic))[0]:
            self.on_received("admin")
            await self._create_rollout(link, topic, rollout[1], payload, qos, f"mqtt:{sender}" if sender else "mqtt")
        elif (device := self.scheme.parse_device(topic)) is not None:
            self.on_received("device")
            await self._device(link, device, payload, qos)
        elif (admin := self.scheme.parse_admin(topic)) is not None:
            self.on_received("admin")
            await self._admin(link, admin, payload, qos, f"mqtt:{sender}" if sender else "mqtt")
        else:
            self.on_received("ignored")  # replies (our own, without MQTT 5 no-local) and foreign topics

    async def _create_rollout(
        self, link: Link, topic: str, request_id: int | None, payload: bytes, qos: int, invoked_by: str
    ) -> None:
        try:
            self._check_size(payload)
            made = await RolloutService(self.service).create(
                parse_spec(protocol.decode(payload, Codec.JSON)), invoked_by=invoked_by
            )
        except BridgeError as exc:
            self._log_refusal(topic, exc)
            if request_id is not None:
                await self._reply_error(link, error_topic(topic), exc, Codec.JSON, qos)
            return
        if request_id is not None:
            body = made.record() if isinstance(made, Preview) else rollout_record(made)
            await self._reply(link, status_topic(topic), body, Codec.JSON, qos)

    def _presence(self, topic: str, endpoint: tuple[str, str], payload: bytes) -> None:
        try:
            connected = protocol.parse_presence(payload)
        except BridgeError as exc:  # a Last Will has nobody to answer: said in the log only
            self._log_refusal(topic, exc)
            return
        self.service.presence(*endpoint, connected)

    def _check_size(self, payload: bytes) -> None:
        if len(payload) > self.max_payload_bytes:
            raise PayloadTooLarge(f"body of {len(payload)} bytes exceeds the limit of {self.max_payload_bytes}")

    async def _device(self, link: Link, req: DeviceRequest, payload: bytes, qos: int) -> None:
        codec = req.format.codec
        try:
            self._check_size(payload)
            if req.resource is Resource.COMMAND:
                await self._poll(link, req, payload, qos)
            else:
                await self._results(link, req, payload, qos)
        except BridgeError as exc:
            self._log_refusal(req.topic, exc)
            if req.request_id is not None:
                await self._reply_error(link, error_topic(req.topic), exc, codec, qos)

    async def _poll(self, link: Link, req: DeviceRequest, payload: bytes, qos: int) -> None:
        commands = await cep.poll_commands(self.service, req.target, req.format, payload)
        reply = first_message(commands, req.format.codec, self.max_push_bytes)
        log_left_out(req.target, reply, self.max_push_bytes)
        chunk = reply.chunks[0]
        # Also without a request ID: KP1 devices poll on connect and read the answer like a push.
        answer = Publication(topic=status_topic(req.topic), payload=chunk.payload, command_ids=chunk.command_ids)
        await self._send(link, answer, qos=qos)
        # The device is there (it just asked): handing the reply to the broker hands it to the device.
        self.service.handed(chunk.command_ids)

    async def _results(self, link: Link, req: DeviceRequest, payload: bytes, qos: int) -> None:
        reply = await cep.results(self.service, req.target, req.format, payload)
        if req.request_id is not None:
            topic = status_topic(req.topic) if reply["statusCode"] == 200 else error_topic(req.topic)
            await self._reply(link, topic, reply, req.format.codec, qos)

    async def _admin(self, link: Link, req: AdminRequest, payload: bytes, qos: int, invoked_by: str) -> None:
        try:
            self._check_size(payload)
            if req.action is AdminAction.INVOKE:
                body = protocol.parse_invoke(payload)
                command = await self.service.invoke(
                    req.target, body.payload, body.ttl, idempotency_key=body.idempotency_key, invoked_by=invoked_by
                )
            elif req.action is AdminAction.RERUN:
                assert req.command_id is not None
                rerun = protocol.parse_rerun(payload)
                command = await self.service.rerun(req.command_id, rerun.ttl, target=req.target, invoked_by=invoked_by)
            else:
                assert req.command_id is not None
                command = await self.service.cancel(req.command_id, req.target)
        except BridgeError as exc:
            self._log_refusal(req.topic, exc)
            if req.request_id is not None:
                await self._reply_error(link, error_topic(req.topic), exc, Codec.JSON, qos)
            return
        if req.request_id is not None:
            await self._reply(link, status_topic(req.topic), to_record(command), Codec.JSON, qos)

    @staticmethod
    def _log_refusal(topic: str, exc: BridgeError) -> None:
        event = "store_unavailable" if isinstance(exc, StoreUnavailable) else "request_refused"
        log.info(event, topic=topic, status=exc.status_code, reason=exc.reason)

    async def _reply_error(self, link: Link, topic: str, exc: BridgeError, codec: Codec, qos: int) -> None:
        await self._reply(link, topic, protocol.error_body(exc.status_code, exc.reason), codec, qos)

    @staticmethod
    async def _reply(link: Link, topic: str, body: Any, codec: Codec, qos: int) -> None:
        await link.send(topic, protocol.encode(body, codec), qos=qos)


def send(client: aiomqtt.Client, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> asyncio.Future[None]:
    """Publish now; the future resolves once the broker acknowledged (at once for QoS 0).

    Replaces ``aiomqtt.Client.publish``, which wraps each wait in ``asyncio.wait_for`` (a task per
    publish on Python 3.11) and walks every pending call twice per publish: with hundreds in flight
    that was 6.7% of the bridge's CPU. Here a publish costs a future and a timer, and a batch of them
    can be awaited with ``asyncio.gather`` without a task each (the outbox's event chunks). It
    registers what aiomqtt's ``_on_publish`` calls ``set()`` on (aiomqtt internals, as the manual ack
    in ``MqttLink``), and fails the same ways, through the future (never by raising, so a caller
    that sends several or sends from a callback sees every failure in one place): ``MqttCodeError``
    when paho refuses the message, ``MqttError`` after the client's timeout.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    info = client._client.publish(topic, payload, qos, retain)
    if info.rc != mqtt.MQTT_ERR_SUCCESS:
        future.set_exception(aiomqtt.MqttCodeError(info.rc, "Could not publish message"))
    elif qos == 0 or info.is_published():
        future.set_result(None)
    else:
        _Ack(loop, client, info.mid, future, topic)
    return future


class _Ack:
    """One QoS 1 publish awaiting its PUBACK: resolved by aiomqtt's on_publish, or failed on timeout."""

    __slots__ = ("future", "mid", "pending", "timer", "topic")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: aiomqtt.Client,
        mid: int,
        future: asyncio.Future[None],
        topic: str,
    ) -> None:
        self.future = future
        self.mid = mid
        self.topic = topic
        # Declared dict[int, asyncio.Event]; aiomqtt only ever calls set() on what it holds.
        self.pending = cast("dict[int, Any]", client._pending_publishes)
        self.pending[mid] = self
        self.timer = loop.call_later(client.timeout, self.expire)

    def set(self) -> None:  # aiomqtt has popped it from its pending publishes
        self.timer.cancel()
        if not self.future.done():
            self.future.set_result(None)

    def expire(self) -> None:
        if self.pending.get(self.mid) is self:
            del self.pending[self.mid]
        if not self.future.done():
            self.future.set_exception(aiomqtt.MqttError("Operation timed out"))


INVOKED_BY_PROPERTY = "invoked-by"  # MQTT 5 user property: who an admin publish is from (declared)
_MAX_SENDER = 64


def _declared_sender(message: aiomqtt.Message) -> str | None:
    """The ``invoked-by`` user property of an MQTT 5 message, if it carries a usable one. Declared by
    the publisher: as trustworthy as whoever the broker's ACL lets publish to the admin topics."""
    found = getattr(message.properties, "UserProperty", None) if message.properties is not None else None
    for name, value in found or ():
        if name == INVOKED_BY_PROPERTY and 0 < len(value) <= _MAX_SENDER and value.isprintable():
            return str(value)
    return None
