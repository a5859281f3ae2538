"""What the bridge publishes after a commit: command events and outstanding-list pushes.

The service announces changes synchronously (it never waits for the network); the outbox queues
them and a publisher task drains the queue in order. Pushes are coalesced per target, so a burst of
commands for one device becomes one push of its whole outstanding list (KP1 pushes are arrays).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog

from broker_bridge.commands import Command, delivery_item, to_record
from broker_bridge.protocol import encode
from broker_bridge.service import CommandService
from broker_bridge.store import Delivery
from broker_bridge.topics import Codec, Target, TopicScheme

log = structlog.get_logger(__name__)

CHUNK = 256  # publishes awaited together: enough to keep the connection's in-flight window full


@dataclass(frozen=True, slots=True, kw_only=True)
class Publication:
    topic: str
    payload: bytes
    retain: bool = False


Publish = Callable[[Publication], Awaitable[None]]


class Outbox:
    """Implements the service's Announcer; ``run`` publishes what was announced."""

    def __init__(self, service: CommandService, scheme: TopicScheme, *, retain: bool) -> None:
        self.service = service
        self.scheme = scheme
        self.retain = retain
        self._events: deque[Command] = deque()
        self._expired: deque[int] = deque()  # ids whose records are fetched for their events
        self._dirty: dict[Target, None] = {}  # an ordered set
        self._wake = asyncio.Event()  # events to publish
        self._wake_pushes = asyncio.Event()  # outstanding lists to push

    # -- Announcer ----------------------------------------------------------------------------
    def command_changed(self, command: Command) -> None:
        self._events.append(command)
        self._wake.set()

    def commands_expired(self, expired: Sequence[tuple[int, Target]]) -> None:
        self._expired.extend(command_id for command_id, _ in expired)
        self._wake.set()

    def outstanding_changed(self, target: Target, *, added: bool) -> None:
        # Without retained lists a device only needs a push when something new is there for it.
        if added or self.retain:
            self._dirty[target] = None
            self._wake_pushes.set()

    async def recover(self, page: int = 1000) -> int:
        """Queue the events of every change that was committed but never acknowledged by the broker."""
        after_id, count = 0, 0
        while found := await self.service.store.unannounced(after_id, page):
            self._events.extend(found)
            after_id, count = found[-1].id, count + len(found)
        if count:
            self._wake.set()
            log.info("events_recovered", count=count)
        return count

    def republish(self, targets: list[Target]) -> None:
        """Push these targets again (after a reconnect)."""
        for target in targets:
            self._dirty[target] = None
        self._wake_pushes.set()

    @property
    def pending(self) -> int:
        return len(self._events) + len(self._dirty) + len(self._expired)

    # -- publishing ---------------------------------------------------------------------------
    async def run(self, publish: Publish) -> None:
        """Publish until cancelled; on a publish failure, requeue and re-raise.

        Pushes and events go out in two loops: a device's push must not wait for the broker to
        acknowledge a batch of events (measured: it did, adding ~100 ms at full load)."""
        async with asyncio.TaskGroup() as loops:
            loops.create_task(self._loop(self._wake, self._flush_all_events, publish), name="outbox-events")
            loops.create_task(self._loop(self._wake_pushes, self._flush_pushes, publish), name="outbox-pushes")

    @staticmethod
    async def _loop(wake: asyncio.Event, flush: Callable[[Publish], Awaitable[None]], publish: Publish) -> None:
        while True:
            await wake.wait()
            wake.clear()
            await flush(publish)

    async def _flush_all_events(self, publish: Publish) -> None:
        while self._events or self._expired:
            await self._load_expired()
            await self._flush_events(publish)

    async def flush(self, publish: Publish) -> None:
        """Publish everything announced so far."""
        while self._events or self._dirty or self._expired:
            await self._flush_pushes(publish)
            await self._flush_all_events(publish)

    async def _load_expired(self) -> None:
        """Turn expired ids into records, a page at a time (the sweep did not decode them)."""
        if self._expired:
            ids = [self._expired.popleft() for _ in range(min(CHUNK, len(self._expired)))]
            self._events.extend(await self.service.store.get_many(ids))

    async def _flush_events(self, publish: Publish) -> None:
        while self._events:
            chunk = [self._events.popleft() for _ in range(min(CHUNK, len(self._events)))]
            try:
                await asyncio.gather(*(publish(self._event(c)) for c in chunk))
            except BaseException:
                self._events.extendleft(reversed(chunk))  # published again after reconnect: at least once
                raise
            # Only now: a crash before this line republishes these events after the restart.
            await self.service.store.mark_announced([(c.id, c.updated_at) for c in chunk])

    def _event(self, command: Command) -> Publication:
        topic = self.scheme.event_topic(command.target, command.id)
        return Publication(topic=topic, payload=encode(to_record(command), Codec.JSON))

    async def _flush_pushes(self, publish: Publish) -> None:
        while self._dirty:
            chunk = list(self._dirty)[:CHUNK]
            for target in chunk:
                del self._dirty[target]
            try:
                await asyncio.gather(*(self._push(publish, t) for t in chunk))
            except BaseException:
                self.republish(chunk)
                raise

    async def _push(self, publish: Publish, target: Target) -> None:
        delivery = await self.service.delivery(target)
        if self.retain:
            await self._push_retained(publish, delivery)
        elif delivery.observe and delivery.commands:
            await publish(self._list(delivery, retain=False))

    async def _push_retained(self, publish: Publish, delivery: Delivery) -> None:
        """Keep the broker's retained list equal to the outstanding list; mark before, clear after."""
        if delivery.observe and delivery.commands:
            if not delivery.retained:
                await self.service.store.mark_retained(delivery.target, True)
            await publish(self._list(delivery, retain=True))
        elif delivery.retained:
            # observe false: delete the retained list (empty payload) rather than push "[]".
            empty = self._list(delivery, retain=True) if delivery.observe else self._deletion(delivery)
            await publish(empty)
            await self.service.store.mark_retained(delivery.target, False)

    def _list(self, delivery: Delivery, *, retain: bool) -> Publication:
        items = [delivery_item(c) for c in delivery.commands]
        topic = self.scheme.push_topic(delivery.target, delivery.format)
        return Publication(topic=topic, payload=encode(items, delivery.format.codec), retain=retain)

    def _deletion(self, delivery: Delivery) -> Publication:
        return Publication(topic=self.scheme.push_topic(delivery.target, delivery.format), payload=b"", retain=True)
