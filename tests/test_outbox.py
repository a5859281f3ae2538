"""The outbox on its own: recovery of unacknowledged events a page at a time, and database trouble."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
import structlog.testing

from broker_bridge.errors import StoreUnavailable
from broker_bridge.outbox import Outbox, Publication
from broker_bridge.protocol import ResultItem, decode, encode
from broker_bridge.service import CommandService, Limits, utc_now
from broker_bridge.store.memory import MemoryStore
from broker_bridge.topics import Codec, Format, Target, TopicScheme

REBOOT = Target(app_version="app-v1", endpoint_token="dev1", command_type="reboot")


def wired(*, retain: bool) -> tuple[CommandService, Outbox]:
    """A service on the memory store announcing through an outbox, as serve wires them."""
    service = CommandService(MemoryStore(), retained_pushes=retain)
    outbox = Outbox(service, TopicScheme(), retain=retain)
    service.announcer = outbox
    return service, outbox


@contextlib.asynccontextmanager
async def running(outbox: Outbox, publish: Any) -> AsyncIterator[asyncio.Task[None]]:
    """``outbox.run(publish)`` in a task, its loops waiting, cancelled on the way out."""
    runner = asyncio.create_task(outbox.run(publish))
    await asyncio.sleep(0)
    try:
        yield runner
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def unannounced_service(count: int) -> CommandService:
    """A service whose store holds ``count`` commands whose events were committed but never published."""
    service = CommandService(MemoryStore(), limits=Limits(max_outstanding_per_endpoint=count + 1))
    for seq in range(count):
        await service.invoke(REBOOT, {"seq": seq})  # the default announcer drops them, as a crash would
    return service


class Recorder:
    def __init__(self) -> None:
        self.events: list[int] = []

    async def publish(self, publication: Publication) -> None:
        if publication.topic.startswith("cex/events/"):
            self.events.append(json.loads(publication.payload)["id"])


async def test_recovery_loads_a_page_at_a_time_and_publishes_everything_once() -> None:
    service = await unannounced_service(2500)
    outbox = Outbox(service, TopicScheme(), retain=False)
    service.announcer = outbox
    assert await outbox.recover(page=1000) == 1000
    assert len(outbox._events) == 1000  # not the whole backlog
    recorder = Recorder()
    sizes: list[int] = []
    real_load = outbox._load_recovered

    async def load() -> int:
        sizes.append(len(outbox._events))
        return await real_load()

    outbox._load_recovered = load  # type: ignore[method-assign]
    await outbox.flush(recorder.publish)
    assert sorted(recorder.events) == sorted(set(recorder.events))  # once each
    assert len(recorder.events) == 2500
    assert await service.store.unannounced(0, 10) == []
    assert max(sizes) < 1000  # the next page was loaded only once the queue had drained below a chunk
    assert outbox.pending == 0


async def test_store_failure_while_publishing_loses_no_event() -> None:
    service = await unannounced_service(10)
    outbox = Outbox(service, TopicScheme(), retain=False)
    await outbox.recover(page=1000)
    store: Any = service.store
    real_mark = store.mark_announced
    failures = 0
    all_marked = asyncio.Event()

    async def flaky_mark(announced: Any) -> None:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise StoreUnavailable("database error: disk I/O error")
        await real_mark(announced)
        if not await service.store.unannounced(0, 10):
            all_marked.set()

    store.mark_announced = flaky_mark
    recorder = Recorder()
    async with running(outbox, recorder.publish) as runner:
        await asyncio.wait_for(all_marked.wait(), 10)
        assert not runner.done()  # the publishing loop survived both errors
    assert failures == 2
    assert set(recorder.events) == set(range(1, 11))  # republished after each failure: at least once


class Pushes:
    """Records pushes (topic, decoded list, retain) and counts the store reads the outbox makes."""

    def __init__(self, service: CommandService) -> None:
        self.seen: list[tuple[str, Any, bool]] = []
        self.reads = 0
        store: Any = service.store
        real_delivery, real_deliveries = store.delivery, store.deliveries

        async def delivery(*args: Any) -> Any:
            self.reads += 1
            return await real_delivery(*args)

        async def deliveries(targets: Any, *args: Any) -> Any:
            self.reads += len(targets)
            return await real_deliveries(targets, *args)

        store.delivery, store.deliveries = delivery, deliveries

    async def publish(self, publication: Publication) -> None:
        if not publication.topic.startswith("cex/events/"):
            self.seen.append((publication.topic, json.loads(publication.payload or b"null"), publication.retain))


class Wire:
    """A publish that sends at once, like bridge.send: records the topic, returns the ack future."""

    def __init__(self) -> None:
        self.topics: list[str] = []
        self.sent: list[Publication] = []
        self.acks: list[asyncio.Future[None]] = []

    def publish(self, publication: Publication) -> asyncio.Future[None]:
        self.topics.append(publication.topic)
        self.sent.append(publication)
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        return ack

    def acknowledge_all(self) -> None:
        for ack in self.acks:
            if not ack.done():
                ack.set_result(None)


async def test_an_invoke_is_pushed_as_committed_without_reading_the_store_again() -> None:
    """The invoke's transaction returned the list and marked it retained: the push is the publish alone."""
    service, outbox = wired(retain=True)
    pushes = Pushes(service)
    store: Any = service.store
    # already marked in the invoke's transaction: calling either would fail
    store.mark_retained = store.mark_retained_many = None
    wire = Wire()
    async with running(outbox, wire.publish):
        command = await service.invoke(REBOOT, {"seq": 1})
        assert wire.sent[0] == Publication(
            topic="kp1/app-v1/cex/dev1/command/reboot/status",
            payload=json.dumps([{"id": command.id, "payload": {"seq": 1}}], separators=(",", ":")).encode(),
            retain=True,
            command_ids=(command.id,),
        )
        assert pushes.reads == 0


async def test_queued_pushes_read_the_list_afresh() -> None:
    """Without a live connection (the CLI's one-shot flush) a list is read when it is pushed: another
    process may have changed it since this one committed."""
    service, outbox = wired(retain=False)
    pushes = Pushes(service)
    first = await service.invoke(REBOOT, 1)
    store: Any = service.store
    await store.cancel(first.id, first.created_at)  # as the service process would, unannounced here
    await outbox.flush(pushes.publish)
    assert pushes.reads == 1
    assert pushes.seen == []  # nothing outstanding any more: no push


async def test_a_list_that_changed_again_before_its_push_is_read_afresh() -> None:
    """Without retained pushes a result does not push, but it must not let the invoke's stale list out."""
    service, outbox = wired(retain=False)
    pushes = Pushes(service)
    first = await service.invoke(REBOOT, 1)
    second = await service.invoke(REBOOT, 2)
    await service.cancel(first.id)  # before the outbox ran: the committed list it holds is out of date
    await outbox.flush(pushes.publish)
    assert pushes.reads == 1
    assert [[item["id"] for item in items] for _, items, _ in pushes.seen] == [[second.id]]


async def test_while_running_an_invoke_is_pushed_before_the_invoke_returns() -> None:
    """The push is on the wire before the caller (the bridge) can publish the invoke's reply."""
    service, outbox = wired(retain=True)
    wire = Wire()
    async with running(outbox, wire.publish):
        await service.invoke(REBOOT, 1)
        assert wire.topics == ["kp1/app-v1/cex/dev1/command/reboot/status"]  # no event yet: its loop runs later
        wire.acknowledge_all()
        await asyncio.sleep(0.01)
        assert wire.topics[1:] == ["cex/events/app-v1/dev1/reboot/1"]


async def test_a_failed_immediate_push_is_queued_again() -> None:
    service, outbox = wired(retain=False)
    wire = Wire()
    async with running(outbox, wire.publish):
        await service.invoke(REBOOT, 1)
        wire.acks[0].set_exception(TimeoutError("no PUBACK"))
        for _ in range(5):
            await asyncio.sleep(0)
        pushes = [t for t in wire.topics if t.startswith("kp1/")]
        assert pushes == ["kp1/app-v1/cex/dev1/command/reboot/status"] * 2  # the loop read it and pushed again


async def test_a_push_refused_at_once_is_queued_and_the_invoke_still_succeeds() -> None:
    """A publish that raises (no connection) must not fail the invoke that was committed."""
    service, outbox = wired(retain=False)

    def refusing(publication: Publication) -> asyncio.Future[None]:
        raise ConnectionError("not connected")

    outbox._live = refusing  # as between a lost connection and the end of run()
    command = await service.invoke(REBOOT, 1)
    assert await service.get(command.id) == command
    assert list(outbox._dirty) == [REBOOT]  # pushed by the loop once it runs again


async def test_marks_left_by_a_previous_connection_are_committed_when_run_starts() -> None:
    service = await unannounced_service(3)
    outbox = Outbox(service, TopicScheme(), retain=False)
    outbox._marks.extend((c.id, c.updated_at) for c in await service.store.unannounced(0, 10))
    async with running(outbox, Wire().publish):
        for _ in range(20):
            await asyncio.sleep(0)
            if not outbox._marks:
                break
        assert await service.store.unannounced(0, 10) == []


async def test_a_device_that_switches_formats_takes_its_retained_list_along() -> None:
    """The list retained on the plain topic is deleted, then retained on the MessagePack one; a
    restart in between (the mark still names the plain topic) deletes it all the same."""
    service, outbox = wired(retain=True)
    sent: list[Publication] = []

    async def publish(publication: Publication) -> None:
        if not publication.topic.startswith("cex/events/"):
            sent.append(publication)

    command = await service.invoke(REBOOT, {"seq": 1})
    await outbox.flush(publish)
    plain, packed = "kp1/app-v1/cex/dev1/command/reboot/status", "kp1/app-v1/cex/dev1/command/reboot/msgpack/status"
    listed = [{"id": command.id, "payload": {"seq": 1}}]
    pushed = Publication(topic=plain, payload=encode(listed, Codec.JSON), retain=True, command_ids=(command.id,))
    assert sent == [pushed]
    sent.clear()
    assert await service.poll(REBOOT, True, Format.MSGPACK) == (command,)
    restarted = Outbox(service, TopicScheme(), retain=True)  # the announcement was lost with the process
    restarted.republish(await service.store.retained_targets())
    await restarted.flush(publish)
    assert sent == [
        Publication(topic=plain, payload=b"", retain=True),  # an empty retained message deletes the old list
        Publication(topic=packed, payload=encode(listed, Codec.MSGPACK), retain=True, command_ids=(command.id,)),
    ]
    delivery = await service.delivery(REBOOT)
    assert (delivery.retained_format, delivery.retained_elsewhere) == (Format.MSGPACK, None)


async def test_a_format_switch_is_announced_and_an_emptied_list_is_not_left_behind() -> None:
    """Live: the poll announces the move; with nothing outstanding the old list goes and the mark too."""
    service, outbox = wired(retain=True)
    pushes = Pushes(service)
    command = await service.invoke(REBOOT, 1)
    await service.report(REBOOT, [ResultItem(id=command.id, statusCode=200)])
    await outbox.flush(pushes.publish)  # the push, then the emptied list "[]", then the mark cleared
    assert await service.store.retained_targets() == []
    second = await service.invoke(REBOOT, 2)
    await outbox.flush(pushes.publish)
    pushes.seen.clear()
    store: Any = service.store
    await store.cancel(second.id, second.created_at)  # by another process, say: nothing announced here
    assert await service.poll(REBOOT, None, Format.JSON) == ()
    await outbox.flush(pushes.publish)  # the poll's announcement is all there is to push
    json_topic = "kp1/app-v1/cex/dev1/command/reboot/json/status"
    assert ("kp1/app-v1/cex/dev1/command/reboot/status", None, True) in pushes.seen  # deleted
    assert all(topic != json_topic for topic, _, _ in pushes.seen)  # nothing to retain there
    assert await service.store.retained_targets() == []


def windowed(*, retain: bool, max_in_flight: int | None, clock: Any = utc_now) -> tuple[CommandService, Outbox]:
    """``wired``, with a delivery window (and a clock of the test's, if given)."""
    limits = Limits(max_in_flight_per_target=max_in_flight)
    service = CommandService(MemoryStore(), retained_pushes=retain, limits=limits, clock=clock)
    outbox = Outbox(service, TopicScheme(), retain=retain)
    service.announcer = outbox
    return service, outbox


def pushed_ids(pushes: Pushes) -> list[list[int]]:
    return [[item["id"] for item in items or []] for _, items, _ in pushes.seen]


async def test_without_retained_lists_a_finished_command_lets_the_next_one_out() -> None:
    """Window 1, no retained lists: a final result, a cancel and an expiry each push the next
    command (without a window none of them would push: nothing was added)."""
    now = [datetime.now(UTC)]
    service, outbox = windowed(retain=False, max_in_flight=1, clock=lambda: now[0])
    pushes = Pushes(service)
    first, second = [await service.invoke(REBOOT, n, ttl_s=60) for n in range(2)]
    third = await service.invoke(REBOOT, 2, ttl_s=10)
    fourth = await service.invoke(REBOOT, 3, ttl_s=60)
    await outbox.flush(pushes.publish)
    assert pushed_ids(pushes) == [[first.id]]
    await service.report(REBOOT, [ResultItem(id=first.id, statusCode=200)])
    await outbox.flush(pushes.publish)
    await service.cancel(second.id)
    await outbox.flush(pushes.publish)
    assert pushed_ids(pushes) == [[first.id], [second.id], [third.id]]
    now[0] += timedelta(seconds=11)
    assert await service.expire_due() == 1
    await outbox.flush(pushes.publish)
    assert pushed_ids(pushes)[-1] == [fourth.id]
    await service.report(REBOOT, [ResultItem(id=fourth.id, statusCode=200)])
    await outbox.flush(pushes.publish)
    assert len(pushes.seen) == 4  # nothing left: no push of an empty list


async def test_without_a_window_a_finished_command_pushes_nothing() -> None:
    """The default: the device has the whole list already, a result changes nothing for it."""
    service, outbox = windowed(retain=False, max_in_flight=None)
    pushes = Pushes(service)
    first, second = [await service.invoke(REBOOT, n) for n in range(2)]
    await outbox.flush(pushes.publish)
    await service.report(REBOOT, [ResultItem(id=first.id, statusCode=200)])
    await outbox.flush(pushes.publish)
    assert pushed_ids(pushes) == [[first.id, second.id]]


async def test_finishes_read_together_still_let_every_queued_command_out() -> None:
    """Window 2 over three commands: both delivered ones finish before the push loop reads the list;
    the one read is [third], shorter than the window, and it is pushed all the same."""
    service, outbox = windowed(retain=False, max_in_flight=2)
    pushes = Pushes(service)
    first, second, third = [await service.invoke(REBOOT, n) for n in range(3)]
    await outbox.flush(pushes.publish)
    await service.report(REBOOT, [ResultItem(id=c.id, statusCode=200) for c in (first, second)])
    await outbox.flush(pushes.publish)
    assert pushed_ids(pushes) == [[first.id, second.id], [third.id]]


async def test_a_retained_window_follows_the_finished_commands() -> None:
    """With retained lists the broker holds the window: [first], then [second], then []."""
    service, outbox = windowed(retain=True, max_in_flight=1)
    pushes = Pushes(service)
    wire = Wire()
    async with running(outbox, wire.publish):
        first = await service.invoke(REBOOT, 1)
        second = await service.invoke(REBOOT, 2)
    # The second invoke is queued behind the window: the device's list did not change, no push.
    assert [json.loads(p.payload) for p in wire.sent if "/command/" in p.topic] == [[{"id": first.id, "payload": 1}]]
    await service.report(REBOOT, [ResultItem(id=first.id, statusCode=200)])
    await outbox.flush(pushes.publish)
    await service.report(REBOOT, [ResultItem(id=second.id, statusCode=200)])
    await outbox.flush(pushes.publish)
    assert [(ids, retain) for ids, (_, _, retain) in zip(pushed_ids(pushes), pushes.seen, strict=True)] == [
        ([second.id], True),
        ([], True),
    ]


async def test_polls_and_deliveries_are_windowed() -> None:
    """A poll (MQTT or HTTP alike) and a push read hand out the oldest k commands only."""
    service, _ = windowed(retain=False, max_in_flight=2)
    made = [await service.invoke(REBOOT, n) for n in range(5)]
    assert await service.poll(REBOOT, None) == tuple(made[:2])
    assert (await service.delivery(REBOOT)).commands == tuple(made[:2])
    await service.cancel(made[0].id)
    assert await service.poll(REBOOT, None) == tuple(made[1:3])


def limited(*, retain: bool, max_push_bytes: int) -> tuple[CommandService, Outbox]:
    """``wired``, with a push size limit."""
    service = CommandService(MemoryStore(), retained_pushes=retain)
    outbox = Outbox(service, TopicScheme(), retain=retain, max_push_bytes=max_push_bytes)
    service.announcer = outbox
    return service, outbox


class Sent:
    """Every publication, acknowledged at once."""

    def __init__(self) -> None:
        self.sent: list[Publication] = []

    async def publish(self, publication: Publication) -> None:
        self.sent.append(publication)


def list_pushes(sent: list[Publication]) -> list[Publication]:
    return [p for p in sent if "/command/" in p.topic]


async def invoked(service: CommandService, count: int, size: int) -> list[int]:
    return [(await service.invoke(REBOOT, "x" * size)).id for _ in range(count)]


async def test_a_long_list_goes_out_as_several_messages_within_the_limit() -> None:
    """Five commands of ~100 bytes at a 250-byte limit: arrays of two, two and one, in id order,
    each naming the commands it carries."""
    service, outbox = limited(retain=False, max_push_bytes=250)
    ids = await invoked(service, 5, 100)
    wire = Sent()
    await outbox.flush(wire.publish)
    pushes = list_pushes(wire.sent)
    assert [[item["id"] for item in json.loads(p.payload)] for p in pushes] == [ids[:2], ids[2:4], ids[4:]]
    assert [p.command_ids for p in pushes] == [tuple(ids[:2]), tuple(ids[2:4]), tuple(ids[4:])]
    assert all(len(p.payload) <= 250 and not p.retain for p in pushes)
    assert {p.topic for p in pushes} == {"kp1/app-v1/cex/dev1/command/reboot/status"}


async def test_split_retained_the_oldest_message_is_retained_and_the_rest_follow_it() -> None:
    """Retained pushes: the first message (oldest commands) is the retained one, the later ones are
    published after it, not retained; once the oldest are done the next ones are retained."""
    service, outbox = limited(retain=True, max_push_bytes=250)
    ids = await invoked(service, 5, 100)
    wire = Sent()
    await outbox.flush(wire.publish)
    pushes = list_pushes(wire.sent)
    assert [(p.command_ids, p.retain) for p in pushes] == [
        (tuple(ids[:2]), True),
        (tuple(ids[2:4]), False),
        (tuple(ids[4:]), False),
    ]
    wire.sent.clear()
    await service.report(REBOOT, [ResultItem(id=i, statusCode=200) for i in ids[:2]])
    await outbox.flush(wire.publish)
    assert [(p.command_ids, p.retain) for p in list_pushes(wire.sent)] == [(tuple(ids[2:4]), True), ((ids[4],), False)]


async def test_a_split_push_sent_at_once_goes_out_whole_in_order() -> None:
    """The invoke's own push (published before the invoke returns) is split the same way."""
    service, outbox = limited(retain=False, max_push_bytes=250)
    wire = Wire()
    async with running(outbox, wire.publish):
        ids = await invoked(service, 3, 100)
        assert [p.command_ids for p in list_pushes(wire.sent)] == [(ids[0],), tuple(ids[:2]), tuple(ids[:2]), (ids[2],)]


async def test_msgpack_lists_are_split_by_their_own_sizes() -> None:
    """A MessagePack device's list is cut by MessagePack sizes; every message decodes to whole commands."""
    service, outbox = limited(retain=False, max_push_bytes=250)
    await service.poll(REBOOT, True, Format.MSGPACK)
    ids = await invoked(service, 5, 100)
    wire = Sent()
    await outbox.flush(wire.publish)
    pushes = list_pushes(wire.sent)
    assert len(pushes) > 1
    assert all(len(p.payload) <= 250 and p.topic.endswith("/msgpack/status") for p in pushes)
    assert [item["id"] for p in pushes for item in decode(p.payload, Codec.MSGPACK)] == ids


async def test_a_command_too_large_for_any_message_is_left_out_and_named() -> None:
    """One command larger than the limit on its own (a CLI invoke, say): the others are pushed, it
    is not (never a truncated or oversized message), and the log says which and why."""
    service, outbox = limited(retain=False, max_push_bytes=250)
    small = await invoked(service, 1, 10)
    huge = await invoked(service, 1, 1000)
    wire = Sent()
    with structlog.testing.capture_logs() as logs:
        await outbox.flush(wire.publish)
    assert [p.command_ids for p in list_pushes(wire.sent)] == [tuple(small)]
    refused = [e for e in logs if e["event"] == "commands_too_large_to_push"]
    assert [e["ids"] for e in refused] == [huge]
    assert "max_push_bytes" in refused[0]["hint"]


async def test_a_split_push_refused_half_way_is_queued_whole_and_nothing_is_left_unawaited() -> None:
    """The first message went out, the second was refused at once (the connection dropped): the
    invoke succeeds, the target is pushed again by the loop, and the first message's failure later
    is taken (asyncio reports no unretrieved exception once the future is gone)."""
    service, outbox = limited(retain=False, max_push_bytes=250)
    out: list[asyncio.Future[None]] = []

    def half_way(publication: Publication) -> asyncio.Future[None]:
        if out:
            raise ConnectionError("not connected")
        out.append(asyncio.get_running_loop().create_future())
        return out[0]

    await invoked(service, 2, 100)  # not running: queued, then forgotten for this test
    outbox._dirty.clear()
    outbox._live = half_way
    unretrieved: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: unretrieved.append(context))
    await service.invoke(REBOOT, "x" * 100)
    assert len(out) == 1
    assert list(outbox._dirty) == [REBOOT]
    out.pop().set_exception(ConnectionError("lost"))
    for _ in range(3):
        await asyncio.sleep(0)
    gc.collect()
    assert unretrieved == []
