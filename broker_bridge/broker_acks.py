"""Embedded broker: a device's QoS 1 PUBLISH is acknowledged only once the bridge has handled it.

amqtt 0.12.1 PUBACKs a client's QoS 1 PUBLISH as soon as it has read it and queued it in memory.
For a message routed to the bridge that broke the service's promise: a SIGTERM with a backlog
dropped 3,000 of 3,000 acknowledged device results (the device, told PUBACK, never sent them
again), while the same load over Mosquitto, where the bridge acknowledges after its commit, lost 0.

Here the PUBACK is a ``DeferredAck`` with a count of holders: the client's delivery loop holds it
while amqtt checks and routes the message, the broadcast holds it until it has been handed to every
subscriber, and the bridge's in-process session holds it until the bridge has committed and
answered (``InProcessLink.ack``). The last release sends the PUBACK. A message nobody but ordinary
subscribers took is acknowledged once routed, as before; one the bridge took and never finished
(shutdown, crash) is never acknowledged, so the device still owns it and sends it again.

amqtt internals used (all version 0.12.1, checked at import): ``BrokerProtocolHandler`` and its
``_handle_qos1_message_flow``, ``_send_packet``, ``session.delivered_message_queue``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.session import INCOMING, IncomingApplicationMessage

AMQTT_VERSION = "0.12.1"
if version("amqtt") != AMQTT_VERSION:  # pragma: no cover - guards the internals named above
    raise ImportError(f"broker_bridge.broker_acks is written for amqtt {AMQTT_VERSION}, found {version('amqtt')}")

_log = logging.getLogger(__name__)


class DeferredAck:
    """One PUBACK, sent when the last holder releases it (the creator holds it first)."""

    __slots__ = ("_holders", "_send")

    def __init__(self, send: Callable[[], None]) -> None:
        self._send = send
        self._holders = 1

    def hold(self) -> None:
        self._holders += 1

    def release(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            self._send()


class AckHolder:
    """A subscriber that takes each message at once, with the publisher's pending PUBACK, which it
    holds until it has handled the message (the bridge's in-process session)."""

    def take(self, topic: str, data: bytes, qos: int, ack: DeferredAck | None, sender: str | None = None) -> None:
        """``sender``: the publisher's username, if it logged in with one."""
        raise NotImplementedError


class AckedMessage(IncomingApplicationMessage):  # type: ignore[misc]  # amqtt ships no type information
    """An incoming QoS 1 message whose PUBACK waits for ``ack``."""

    __slots__ = ("ack",)


def deferred_ack(message: Any) -> DeferredAck | None:
    """The pending PUBACK of a message amqtt decoded, if it has one."""
    return message.ack if isinstance(message, AckedMessage) else None


class AckWhenHandled(BrokerProtocolHandler):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt's broker-side handler, except that an incoming QoS 1 PUBLISH is acknowledged when its
    ``DeferredAck`` is released instead of at once. Installed on each client connection by
    ``GuardedBroker`` (``adopt``); amqtt builds its handlers itself, so the class is swapped."""

    _puback_tasks: set[asyncio.Task[None]]
    _acks_held: Callable[[], bool]

    @classmethod
    def adopt(cls, handler: Any, acks_held: Callable[[], bool] = lambda: False) -> None:
        """``acks_held``: while true, no PUBACK is sent at all (the broker is stopping: what it still
        reads would be acknowledged and then dropped)."""
        if type(handler) is BrokerProtocolHandler:
            handler.__class__ = cls
            handler._puback_tasks = set()
            handler._acks_held = acks_held

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        if app_message.direction != INCOMING or app_message.puback_packet or self.session is None:
            await super()._handle_qos1_message_flow(app_message)  # amqtt's checks and errors
            return
        packet_id = app_message.packet_id
        acked = AckedMessage(packet_id, app_message.topic, app_message.qos, app_message.data, app_message.retain)
        acked.publish_packet = app_message.publish_packet
        acked.ack = DeferredAck(lambda: self._puback_soon(packet_id))
        await self.session.delivered_message_queue.put(acked)

    def _puback_soon(self, packet_id: int) -> None:
        if self._acks_held():  # stopping: the client sends the message again to the next run
            return
        # Released from synchronous code (the bridge's ack); the write itself is async.
        task = asyncio.get_running_loop().create_task(self._puback(packet_id), name=f"puback-{packet_id}")
        self._puback_tasks.add(task)
        task.add_done_callback(self._puback_tasks.discard)

    async def _puback(self, packet_id: int) -> None:
        if self.session is None or self.writer is None:
            return  # the connection is gone: the client sends the message again
        try:
            await self._send_packet(PubackPacket.build(packet_id))
        except Exception as exc:  # a vanished client must not hurt the broker
            _log.debug("puback not sent: %r", exc)
