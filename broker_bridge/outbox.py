"""What the bridge publishes after a commit: command events and outstanding-list pushes.

The service announces changes synchronously (it never waits for the network); the outbox queues
them and a publisher task drains the queue in order. Pushes are coalesced per target, so a burst of
commands for one device becomes one push of its whole outstanding list (KP1 pushes are arrays),
split into several messages when it is larger than ``max_push_bytes`` (``delivery.split``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import structlog

from broker_bridge.commands import Command, rfc3339, to_record
from broker_bridge.delivery import MAX_PUSH_BYTES, Split, messages
from broker_bridge.devices import PresenceChange
from broker_bridge.errors import StoreUnavailable
from broker_bridge.protocol import encode
from broker_bridge.rollouts import Rollout
from broker_bridge.rollouts import to_record as rollout_record
from broker_bridge.service import CommandService
from broker_bridge.store import Delivery
from broker_bridge.topics import Codec, Format, Target, TopicScheme

log = structlog.get_logger(__name__)

CHUNK = 256  # publishes awaited together: enough to keep the connection's in-flight window full
STORE_RETRY_S = 1.0  # after a database error, publishing waits this long before trying again
# A target another instance is pushing is tried again after this long. Not shorter: when that
# instance dies mid-push, PostgreSQL frees its lock at once, while its last publish may still be on
# the way to the broker; retried at 5 ms, a list read and published after it could land before it.
LOCKED_RETRY_S = 0.05


class TargetLocks(Protocol):
    """Locks shared by every instance (``PostgresStore``'s ``PushLocks``): a target's list is read
    and published by one instance at a time, so lists reach the broker in commit order."""

    async def acquire(self, targets: Sequence[Target]) -> list[Target]:
        """Lock what is free now; the rest are being pushed by another instance."""
        ...

    async def release(self, targets: Sequence[Target]) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Publication:
    topic: str
    payload: bytes
    retain: bool = False
    command_ids: tuple[int, ...] = ()  # the commands a push (or poll reply) hands the device


Publish = Callable[[Publication], Awaitable[None]]


class Outbox:
    """Implements the service's Announcer; ``run`` publishes what was announced."""

    def __init__(
        self,
        service: CommandService,
        scheme: TopicScheme,
        *,
        retain: bool,
        locks: TargetLocks | None = None,
        max_push_bytes: int = MAX_PUSH_BYTES,
    ) -> None:
        """``locks``: several instances push (see ``TargetLocks``); each list is then read afresh
        under its target's lock, never published straight from the change that committed it.

        ``max_push_bytes``: no push message is larger; a longer list goes out as several, in id
        order (with ``retain``: the first, oldest, retained and the rest after it, not retained)."""
        self.service = service
        self.scheme = scheme
        self.retain = retain
        self.locks = locks
        self.max_push_bytes = max_push_bytes
        self._events: deque[Command] = deque()
        self._notices: deque[Publication] = deque()  # presence events: published once, never stored
        self._expired: deque[int] = deque()  # ids whose records are fetched for their events
        self._dirty: dict[Target, None] = {}  # targets to push (their lists are read when pushed), in order
        self._wake = asyncio.Event()  # events to publish
        self._wake_pushes = asyncio.Event()  # outstanding lists to push
        self._marks: list[tuple[int, datetime]] = []  # (id, updated_at) of events the broker acknowledged
        self._wake_marks = asyncio.Event()
        self._recover_after: int | None = None  # recovery cursor: unannounced ids above this are still to load
        self._recover_page = 1000
        self._live: Publish | None = None  # while ``run`` publishes: committed lists go out at once
        self._pushing: set[Target] = set()  # targets the push loop is reading or publishing
        self._sent: set[asyncio.Future[Any]] = set()  # pushes published at once, until acknowledged
        self._clearing: set[asyncio.Future[None]] = set()  # retained marks being cleared after empty pushes

    # -- Announcer ----------------------------------------------------------------------------
    def command_changed(self, command: Command) -> None:
        self._events.append(command)
        self._wake.set()

    def commands_expired(self, expired: Sequence[tuple[int, Target]]) -> None:
        self._expired.extend(command_id for command_id, _ in expired)
        self._wake.set()

    def presence_changed(self, change: PresenceChange) -> None:
        topic = self.scheme.presence_event_topic(change.app_version, change.endpoint_token)
        body = {
            "appVersion": change.app_version,
            "endpointToken": change.endpoint_token,
            "connected": change.connected,
            "at": rfc3339(change.at),
        }
        self._notices.append(Publication(topic=topic, payload=encode(body, Codec.JSON)))
        self._wake.set()

    def rollout_changed(self, rollout: Rollout) -> None:
        topic = f"{self.scheme.events_prefix}/rollouts/{rollout.id}"
        self._notices.append(Publication(topic=topic, payload=encode(rollout_record(rollout), Codec.JSON)))
        self._wake.set()

    def outstanding_changed(self, target: Target, *, added: bool, delivery: Delivery | None = None) -> None:
        # Without retained lists a device only needs a push when something new is there for it: a
        # command added or, with a delivery window, one finished (a queued one may have entered the
        # window; the list is read afresh, so one push also covers several finishes at once).
        if added or self.retain or self.service.limits.max_in_flight_per_target is not None:
            if delivery is not None and self._push_now(target, delivery):
                return
            # A list committed earlier may be out of date by the time the loop gets to it (another
            # process, a poll changing observe or format): queued pushes read the list afresh.
            self._dirty[target] = None
            self._wake_pushes.set()

    def _push_now(self, target: Target, delivery: Delivery) -> bool:
        """Publish a list as its change committed it, before the change's own reply; False: queue it.

        Only a list that needs nothing but the publish (it has commands for an observing device and,
        with retained pushes, is marked retained already), only while ``run`` publishes, and only for
        a target the push loop is not handling: a list it read earlier must not follow this one."""
        publish = self._live
        if publish is None or self.locks is not None or target in self._dirty or target in self._pushing:
            return False
        if not (delivery.observe and delivery.commands) or (self.retain and not delivery.retained):
            return False
        if delivery.retained_elsewhere is not None:  # the old format's topic is cleared first, in the loop
            return False
        try:
            sent = _publish_all(publish, self._lists(delivery, retain=self.retain))
        except Exception as exc:  # refused at once (no connection): the loop pushes it after the reconnect
            log.warning("push_failed", target=_endpoint(target), error=str(exc))
            return False
        self._sent.add(sent)
        sent.add_done_callback(lambda done: self._pushed_now(target, done))
        return True

    def _pushed_now(self, target: Target, done: asyncio.Future[Any]) -> None:
        self._sent.discard(done)
        if not done.cancelled() and done.exception() is None:
            return
        if not done.cancelled():
            log.warning("push_failed", target=_endpoint(target), error=str(done.exception()))
        self._dirty[target] = None  # the loop pushes it again (after a reconnect: with the new client)
        self._wake_pushes.set()

    async def recover(self, page: int = 1000) -> int:
        """Queue the events of changes that were committed but never acknowledged by the broker.

        Loads the first page now and the rest a page at a time as the queue drains (``_load_recovered``),
        so a backlog of any size costs one page of memory (measured: 153 MB of RSS two seconds after a
        start with 100k of them loaded at once). Returns how many the first page held."""
        self._recover_page = page
        self._recover_after = 0  # restart from the beginning: a reconnect may have failed mid-way
        found = await self._load_recovered()
        if found:
            log.info("events_recovering", first_page=found)
        return found

    async def _load_recovered(self) -> int:
        if self._recover_after is None:
            return 0
        found = await self.service.store.unannounced(self._recover_after, self._recover_page)
        # A short page was the last one: everything after it was announced already.
        self._recover_after = found[-1].id if len(found) == self._recover_page else None
        if found:
            self._events.extend(found)
            self._wake.set()
        return len(found)

    def republish(self, targets: list[Target]) -> None:
        """Push these targets again (after a reconnect)."""
        for target in targets:
            self._dirty[target] = None
        self._wake_pushes.set()

    @property
    def pending(self) -> int:
        recovering = 0 if self._recover_after is None else 1  # at least one more page may be waiting
        queued = len(self._events) + len(self._dirty) + len(self._expired) + len(self._marks) + len(self._notices)
        return queued + len(self._clearing) + recovering

    # -- publishing ---------------------------------------------------------------------------
    async def run(self, publish: Publish) -> None:
        """Publish until cancelled; on a publish failure, requeue and re-raise.

        Pushes and events go out in two loops: a device's push must not wait for the broker to
        acknowledge a batch of events (measured: it did, adding ~100 ms at full load). A third
        records which events were acknowledged, so the next events need not wait for that commit
        (measured: under full load a write waited ~15 ms in the store's queue)."""
        self._live = publish
        # Work left by a previous connection (its loops were cancelled after clearing their wake-ups).
        for wake, pending in (
            (self._wake, self._events or self._expired or self._notices),
            (self._wake_pushes, self._dirty),
            (self._wake_marks, self._marks),
        ):
            if pending:
                wake.set()
        try:
            async with asyncio.TaskGroup() as loops:
                loops.create_task(self._loop(self._wake, self._flush_all_events, publish), name="outbox-events")
                loops.create_task(self._loop(self._wake_pushes, self._flush_pushes, publish), name="outbox-pushes")
                loops.create_task(self._loop(self._wake_marks, self._flush_marks, publish), name="outbox-marks")
        finally:
            self._live = None

    @staticmethod
    async def _loop(wake: asyncio.Event, flush: Callable[[Publish], Awaitable[None]], publish: Publish) -> None:
        while True:
            await wake.wait()
            wake.clear()
            try:
                await flush(publish)
            except StoreUnavailable as exc:  # what failed was requeued; the database may heal
                log.error("outbox_store_unavailable", reason=exc.reason, retry_in_s=STORE_RETRY_S)
                await asyncio.sleep(STORE_RETRY_S)
                wake.set()

    async def _flush_all_events(self, publish: Publish) -> None:
        await self._flush_notices(publish)
        while self._events or self._expired or self._recover_after is not None:
            if len(self._events) < CHUNK:
                await self._load_recovered()
            await self._load_expired()
            await self._flush_events(publish)

    async def flush(self, publish: Publish) -> None:
        """Publish everything announced so far."""
        while self.pending:
            await self._flush_marks(publish)  # first: what was acknowledged stays marked if publishing fails
            await self._flush_pushes(publish)
            await self._flush_all_events(publish)
            await self._flush_marks(publish)
            await asyncio.gather(*self._clearing, return_exceptions=True)  # a failed one pushes again

    async def _flush_notices(self, publish: Publish) -> None:
        while self._notices:
            chunk = [self._notices.popleft() for _ in range(min(CHUNK, len(self._notices)))]
            try:
                await asyncio.gather(*(publish(p) for p in chunk))
            except BaseException:
                self._notices.extendleft(reversed(chunk))
                raise

    async def _load_expired(self) -> None:
        """Turn expired ids into records, a page at a time (the sweep did not decode them)."""
        if self._expired:
            ids = [self._expired.popleft() for _ in range(min(CHUNK, len(self._expired)))]
            try:
                self._events.extend(await self.service.store.get_many(ids))
            except BaseException:
                self._expired.extendleft(reversed(ids))
                raise

    async def _flush_events(self, publish: Publish) -> None:
        while self._events:
            chunk = [self._events.popleft() for _ in range(min(CHUNK, len(self._events)))]
            try:
                await asyncio.gather(*(publish(self._event(c)) for c in chunk))
            except BaseException:
                self._events.extendleft(reversed(chunk))  # published again later: at least once
                raise
            # Only once acknowledged: a crash before the mark republishes these events after the restart.
            self._marks.extend((c.id, c.updated_at) for c in chunk)
            self._wake_marks.set()

    async def _flush_marks(self, publish: Publish) -> None:
        """Record the acknowledged events, everything gathered since the last commit at once."""
        while self._marks:
            marks, self._marks = self._marks, []
            try:
                await self.service.store.mark_announced(marks)
            except BaseException:
                self._marks[:0] = marks
                raise

    def _event(self, command: Command) -> Publication:
        topic = self.scheme.event_topic(command.target, command.id)
        return Publication(topic=topic, payload=encode(to_record(command), Codec.JSON))

    async def _flush_pushes(self, publish: Publish) -> None:
        busy: list[Target] = []  # locked by another instance: pushed again once it is done
        while self._dirty:
            chunk = list(self._dirty)[:CHUNK]
            for target in chunk:
                del self._dirty[target]
            if self.locks is not None:
                try:
                    locked = await self.locks.acquire(chunk)
                except BaseException:
                    self.republish(chunk)
                    raise
                got = set(locked)
                busy.extend(t for t in chunk if t not in got)
                chunk = locked
            self._pushing.update(chunk)
            try:
                # Read under the locks, all in one read: each a round trip of its own was the
                # largest single cost of a command on PostgreSQL (measured with py-spy).
                if chunk:
                    await self._push(publish, await self.service.deliveries(chunk))
            except BaseException:
                self.republish(chunk)
                raise
            finally:
                self._pushing.difference_update(chunk)
                if self.locks is not None and chunk:
                    await self._release(chunk)
        if busy:
            asyncio.get_running_loop().call_later(LOCKED_RETRY_S, self.republish, busy)

    async def _release(self, targets: list[Target]) -> None:
        assert self.locks is not None
        try:
            await self.locks.release(targets)
        except StoreUnavailable as exc:  # the lock's connection is gone, and its locks with it
            log.warning("push_locks_lost", reason=exc.reason)

    async def _push(self, publish: Publish, deliveries: list[Delivery]) -> None:
        if not self.retain:
            await asyncio.gather(
                *(publish(p) for d in deliveries if d.observe and d.commands for p in self._lists(d, retain=False))
            )
            return
        await self._push_retained(publish, deliveries)

    async def _push_retained(self, publish: Publish, deliveries: list[Delivery]) -> None:
        """Keep the broker's retained lists equal to the outstanding lists; mark before, clear after.

        A device that switched formats left its list on the old format's topic: that one is deleted
        first (the mark keeps naming it until then, so a crash in between deletes it after the
        restart). Each step is taken for the whole chunk at once: one write for the marks, one for
        the clears (a write per target was the largest store cost on PostgreSQL, measured)."""
        moved = [d for d in deliveries if d.retained_elsewhere is not None]
        await asyncio.gather(*(publish(self._deletion(d, d.retained_elsewhere)) for d in moved))
        lists = [d for d in deliveries if d.observe and d.commands]
        emptied = [d for d in deliveries if d.retained and not (d.observe and d.commands)]
        marks: list[tuple[Target, bool, Format | None]] = [
            (d.target, True, d.format) for d in lists if not d.retained or d.retained_elsewhere is not None
        ]
        if marks:
            await self.service.store.mark_retained_many(marks)
        await asyncio.gather(
            *(publish(p) for d in lists for p in self._lists(d, retain=True)),
            # observe false: delete the retained list (empty payload) rather than push "[]".
            *(
                publish(self._lists(d, retain=True)[0] if d.observe else self._deletion(d))
                for d in emptied
                if d.retained_elsewhere is None
            ),
        )
        if emptied:
            self._clear_later([d.target for d in emptied])

    def _clear_later(self, targets: list[Target]) -> None:
        """Clear the marks of lists published empty, without holding up the next chunk: a clear is
        conditional in the store (never while the target has open commands), so one that commits
        after a later mark of the same target leaves that mark standing. Failed: pushed again."""
        marks: list[tuple[Target, bool, Format | None]] = [(t, False, None) for t in targets]
        clearing = asyncio.ensure_future(self.service.store.mark_retained_many(marks))
        self._clearing.add(clearing)
        clearing.add_done_callback(lambda done: self._cleared(done, targets))

    def _cleared(self, done: asyncio.Future[None], targets: list[Target]) -> None:
        self._clearing.discard(done)
        if done.cancelled() or done.exception() is None:
            return
        log.warning("retained_clear_failed", targets=len(targets), error=str(done.exception()))
        self.republish(targets)

    def _lists(self, delivery: Delivery, *, retain: bool) -> list[Publication]:
        """The list as messages of at most ``max_push_bytes``, oldest commands first. Retained, only
        the first is: a device that subscribes later gets the oldest commands at once and the rest
        in the push that follows its next report (every change pushes the list again). Not
        retained, an empty list is no message (retained, ``[]`` replaces the list on the broker)."""
        split = messages(delivery.commands, delivery.format.codec, self.max_push_bytes)
        log_left_out(delivery.target, split, self.max_push_bytes)
        topic = self.scheme.push_topic(delivery.target, delivery.format)
        return [
            Publication(topic=topic, payload=chunk.payload, retain=retain and n == 0, command_ids=chunk.command_ids)
            for n, chunk in enumerate(split.chunks)
            if retain or chunk.command_ids
        ]

    def _deletion(self, delivery: Delivery, fmt: Format | None = None) -> Publication:
        """An empty retained message: deletes the list retained on that format's push topic."""
        topic = self.scheme.push_topic(delivery.target, delivery.format if fmt is None else fmt)
        return Publication(topic=topic, payload=b"", retain=True)


def log_left_out(target: Target, split: Split, max_push_bytes: int) -> None:
    """Commands too large for any message stay outstanding (HTTP polls still hand them out) until
    they finish or expire; say so loudly, once per list that leaves them out."""
    if split.left_out:
        log.error(
            "commands_too_large_to_push",
            target=f"{_endpoint(target)}/{target.command_type}",
            ids=list(split.left_out[:20]),
            max_push_bytes=max_push_bytes,
            hint="raise max_push_bytes (and the broker's packet size limit) or cancel them",
        )


def _publish_all(publish: Publish, publications: list[Publication]) -> asyncio.Future[Any]:
    """Publish these in order now; one future for all of them. If one is refused at once, the ones
    already out are still awaited (their failures are not left unretrieved) and the refusal raised."""
    sent: list[Awaitable[None]] = []
    try:
        for publication in publications:
            sent.append(publish(publication))
    except BaseException:
        asyncio.gather(*sent, return_exceptions=True)  # takes their outcomes; the loop pushes the list again
        raise
    # One message (nearly every push): its own future; a gather costs 3.4 us more (measured).
    return asyncio.ensure_future(sent[0]) if len(sent) == 1 else asyncio.gather(*sent)


def _endpoint(target: Target) -> str:
    return f"{target.app_version}/{target.endpoint_token}"
