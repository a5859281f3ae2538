"""What only the PostgreSQL store must do: several instances on one database, nothing doubled."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from broker_bridge import service as service_module
from broker_bridge.commands import CommandState
from broker_bridge.errors import CommandFinished, Conflict, StartupError, StoreUnavailable
from broker_bridge.outbox import Outbox, Publication
from broker_bridge.protocol import ResultItem
from broker_bridge.service import CommandService
from broker_bridge.store.postgres import InstanceLease, PostgresStore, PushLocks
from broker_bridge.topics import Format, Target, TopicScheme
from tests.test_store_contract import REBOOT, T0, new, report


@pytest.fixture
async def pair(pg_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two instances' stores on one database, opened at once (both run the migration)."""
    a, b = PostgresStore(pg_url, instance="a"), PostgresStore(pg_url, instance="b")
    await asyncio.gather(a.__aenter__(), b.__aenter__())
    yield a, b
    await asyncio.gather(a.__aexit__(None, None, None), b.__aexit__(None, None, None))


def target(n: int) -> Target:
    return Target(app_version="app-v1", endpoint_token=f"dev{n}", command_type="reboot")


async def test_ids_from_two_instances_are_unique_and_follow_commit_order(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """One sequence: a command created after another committed has a higher id, whichever store."""
    a, b = pair
    ids = []
    for i in range(20):
        store = a if i % 2 else b
        ids.append((await store.create(new(target(i)))).id)
    assert ids == sorted(ids)
    assert len(set(ids)) == 20


async def test_one_result_reported_to_two_instances_at_once_is_applied_once(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """A device's result that both instances take in (a redelivery): one applies it, one refuses."""
    a, b = pair
    created = [await a.create(new(target(i))) for i in range(40)]
    outcomes = await asyncio.gather(
        *(store.report(c.target, [(c.id, report(200))]) for c in created for store in (a, b))
    )
    for c, (first, second) in zip(created, zip(outcomes[::2], outcomes[1::2], strict=True), strict=True):
        applied = [o for o in (first[0], second[0]) if o.error is None]
        refused = [o for o in (first[0], second[0]) if o.error is not None]
        assert len(applied) == 1, c.id
        assert len(refused) == 1, c.id
        assert isinstance(refused[0].error, CommandFinished)
        stored = await b.get(c.id)
        assert stored is not None
        assert stored.state is CommandState.EXECUTED
        assert len(stored.log) == 1


async def test_one_batch_decides_reports_first_and_the_rest_sees_their_writes(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """A batch locks its reports' and cancels' rows in one statement and runs them first, each on
    what the earlier ones decided (progress, then final, then a cancel refused), writes them in one
    statement, then runs the rest in order on the written rows; an unknown id is refused alone."""
    a, _ = pair
    first, second = await a.create(new(target(1), ttl_s=3)), await a.create(new(target(2)))
    sizes = len(a.batch_sizes)
    limited, expired, progress, final, cancel, late, unknown = await asyncio.gather(
        a.submit(new(target(2)), max_open=1, mark_retained=False),  # second is open: refused if first
        a.expire_due(T0 + timedelta(seconds=5), 10),  # first is due by then, unless executed
        a.report(first.target, [(first.id, report(102, payload="half"))]),
        a.report(second.target, [(second.id, report(102)), (second.id, report(200, payload="done"))]),
        a.cancel(second.id, T0),
        a.report(first.target, [(first.id, report(200))]),
        a.report(first.target, [(first.id + 1000, report(200))]),
        return_exceptions=True,
    )
    assert a.batch_sizes[sizes:] == [7]  # one transaction
    assert not isinstance(limited, BaseException)
    assert limited.created
    assert expired == []
    for outcome in (progress, final, late):
        assert not isinstance(outcome, BaseException)
        assert [o.error for o in outcome] == [None] * len(outcome)
    assert isinstance(cancel, CommandFinished)
    assert not isinstance(unknown, BaseException)
    assert unknown[0].error is not None
    for command_id, codes in ((first.id, [102, 200]), (second.id, [102, 200])):
        stored = await a.get(command_id)
        assert stored is not None
        assert stored.state is CommandState.EXECUTED
        assert [r.status_code for r in stored.log] == codes


async def test_two_sweeps_expire_each_command_once(pair: tuple[PostgresStore, PostgresStore]) -> None:
    """Expiry running on both instances: every due command expired exactly once, none skipped."""
    a, b = pair
    due = {(await a.create(new(target(i % 7), ttl_s=1))).id for i in range(300)}
    later = T0 + timedelta(seconds=5)
    expired: list[int] = []
    while True:
        batches = await asyncio.gather(a.expire_due(later, 50), b.expire_due(later, 50))
        found = [command_id for batch in batches for command_id, _ in batch]
        if not found:
            break
        expired.extend(found)
    assert sorted(expired) == sorted(due)
    assert all(c.state is CommandState.EXPIRED for c in await b.get_many(sorted(due)))


async def test_idempotency_key_used_at_once_on_two_instances_creates_one_command(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """The unique index decides; the loser is told Conflict (the service then returns the winner)."""
    a, b = pair
    for i in range(20):
        keyed = dataclasses.replace(new(target(i)), idempotency_key=f"k{i}")
        results = await asyncio.gather(
            a.submit(keyed, max_open=10, mark_retained=False),
            b.submit(keyed, max_open=10, mark_retained=False),
            return_exceptions=True,
        )
        created = [r for r in results if not isinstance(r, BaseException) and r.created]
        assert len(created) == 1
        other = next(r for r in results if r is not created[0])
        assert isinstance(other, Conflict) or (not isinstance(other, BaseException) and not other.created)
        found = await a.find_idempotent(target(i), f"k{i}")
        assert found is not None
        assert found.id == created[0].command.id


async def test_a_finished_command_is_notified_to_the_other_instance(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """LISTEN/NOTIFY wakes the instance whose HTTP request waits for a result another took in."""
    a, b = pair
    heard: asyncio.Queue[list[int]] = asyncio.Queue()
    b.on_finished = heard.put_nowait
    listening = asyncio.create_task(b.listen())
    try:
        command = await a.create(new())
        for _ in range(100):  # the listener connects in the background
            if b._listener is not None:
                break
            await asyncio.sleep(0.02)
        await a.report(REBOOT, [(command.id, report(102))])  # not final: no notification
        await a.report(REBOOT, [(command.id, report(200))])
        assert await asyncio.wait_for(heard.get(), 5) == [command.id]
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening


async def test_a_database_error_fails_only_its_own_operation(pg_url: str) -> None:
    """Text PostgreSQL cannot store (NUL) aborts the batch's transaction; the batch is run again one
    operation per transaction, so the others still commit."""
    async with PostgresStore(pg_url, instance="a") as store:
        command = await store.create(new())
        bad = dataclasses.replace(report(200), reason_phrase="a\x00b")
        results = await asyncio.gather(
            store.create(new(target(1))),
            store.report(REBOOT, [(command.id, bad)]),
            store.create(new(target(2))),
            return_exceptions=True,
        )
        assert isinstance(results[1], StoreUnavailable)
        assert [r.target for r in results if not isinstance(r, BaseException)] == [target(1), target(2)]
        stored = await store.get(command.id)
        assert stored is not None
        assert stored.state is CommandState.PENDING


async def test_unannounced_changes_of_a_running_instance_are_not_taken(pg_url: str) -> None:
    """Recovery adopts the unannounced events of stopped instances only: a running one publishes
    its own, so nothing is announced twice."""
    async with PostgresStore(pg_url, instance="a") as a, PostgresStore(pg_url, instance="b") as b:
        lease = InstanceLease(pg_url, "a", embedded_broker=False)
        async with lease:
            mine = await a.create(new())
            assert [c.id for c in await a.unannounced(0, 10)] == [mine.id]
            assert await b.unannounced(0, 10) == []
        assert [c.id for c in await b.unannounced(0, 10)] == [mine.id]  # a stopped: b adopts


async def test_instance_names_are_exclusive(pg_url: str) -> None:
    """A second instance with a running name is refused, naming the clash; the name is free again
    once the first stops."""
    async with PostgresStore(pg_url), InstanceLease(pg_url, "b1", embedded_broker=False):
        with pytest.raises(StartupError, match="'b1' is already running"):
            async with InstanceLease(pg_url, "b1", embedded_broker=False):
                pass
        async with InstanceLease(pg_url, "b2", embedded_broker=False):
            pass
        with pytest.raises(StartupError, match="external MQTT broker"):
            async with InstanceLease(pg_url, "b3", embedded_broker=True):
                pass
    async with InstanceLease(pg_url, "b1", embedded_broker=False):
        pass


async def test_push_locks_exclude_the_other_instance_until_released(pg_url: str) -> None:
    """One target's list is read and published by one instance at a time."""
    async with PostgresStore(pg_url):
        a, b = PushLocks(pg_url), PushLocks(pg_url)
        try:
            t1, t2 = target(1), Target(app_version="app-v1", endpoint_token="dev1", command_type="x")
            assert await a.acquire([t1]) == [t1]
            assert await b.acquire([t1, t2]) == [t2]
            await a.release([t1])
            assert await b.acquire([t1]) == [t1]
            await b.release([t1, t2])
            assert set(await a.acquire([t1, t2])) == {t1, t2}
        finally:
            await a.close()
            await b.close()


async def test_retained_mark_and_observer_survive_across_instances(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """What one instance records of a device (observe flag, format, retained mark) the other reads."""
    a, b = pair
    await a.poll(REBOOT, T0, False, Format.JSON)
    await a.create(new())
    await a.mark_retained(REBOOT, True)
    delivery = await b.delivery(REBOOT, T0)
    assert (delivery.observe, delivery.format, delivery.retained_format) == (False, Format.JSON, Format.JSON)


async def test_two_instances_pushing_one_target_never_leave_an_older_list(pg_url: str) -> None:
    """Instance A publishes a device's list slowly (a slow network); B commits a newer command
    meanwhile. B's push waits for A's to be acknowledged and then reads the list afresh, so the
    retained list ends as the database has it. (Without the push locks B's newer list went out
    first and A's older one replaced it.)"""
    retained: dict[str, list[int]] = {}

    def keep(p: Publication) -> None:
        if p.retain and "/command/" in p.topic:
            retained[p.topic] = [item["id"] for item in json.loads(p.payload or b"[]")]

    async def slow(p: Publication) -> None:
        await asyncio.sleep(0.3)
        keep(p)

    async def fast(p: Publication) -> None:
        keep(p)

    async with PostgresStore(pg_url, instance="a") as a, PostgresStore(pg_url, instance="b") as b:
        locks = [PushLocks(pg_url), PushLocks(pg_url)]
        services = [CommandService(store, retained_pushes=True) for store in (a, b)]
        outboxes = [Outbox(s, TopicScheme(), retain=True, locks=lock) for s, lock in zip(services, locks, strict=True)]
        for service, outbox in zip(services, outboxes, strict=True):
            service.announcer = outbox
        running = [asyncio.create_task(outboxes[0].run(slow)), asyncio.create_task(outboxes[1].run(fast))]
        try:
            first = await services[0].invoke(REBOOT, {"n": 1})
            await asyncio.sleep(0.05)  # A is publishing [first] now
            second = await services[1].invoke(REBOOT, {"n": 2})
            await asyncio.sleep(1.0)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            for lock in locks:
                await lock.close()
    assert retained == {TopicScheme().push_topic(REBOOT): [first.id, second.id]}


async def test_a_wait_on_one_instance_ends_with_the_result_another_took_in(
    pair: tuple[PostgresStore, PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """execute_command / awaitTimeout on instance A while the device's result reaches instance B:
    A's waiter is woken by B's NOTIFY (the periodic re-read is pushed out of reach here)."""
    monkeypatch.setattr(service_module, "RECHECK_S", 60.0)
    a, b = pair
    waiting_side, reporting_side = CommandService(a), CommandService(b)
    a.on_finished = waiting_side.finished_elsewhere
    listening = asyncio.create_task(a.listen())
    try:
        for _ in range(100):
            if a._listener is not None:
                break
            await asyncio.sleep(0.02)
        command = await waiting_side.invoke(REBOOT, {"n": 1})
        waiter = asyncio.create_task(waiting_side.wait_final(command.id, 10.0))
        await asyncio.sleep(0.1)
        item = ResultItem.model_validate({"id": command.id, "statusCode": 200, "reasonPhrase": "OK", "payload": "done"})
        await reporting_side.report(REBOOT, [item])
        final = await asyncio.wait_for(waiter, 5.0)
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
    assert final.state is CommandState.EXECUTED
    assert final.result_payload == "done"


async def test_events_of_an_instance_that_does_not_come_back_are_adopted_once(pg_url: str) -> None:
    """A dead instance's unannounced events: a running instance adopts them (once, though two
    adopt at the same moment); a running instance's own are never taken; CLI leftovers after the
    grace period."""
    async with (
        PostgresStore(pg_url, instance="dead") as dead,
        PostgresStore(pg_url, instance="alive") as alive,
        PostgresStore(pg_url, instance="other") as other,
        PostgresStore(pg_url) as cli,
        InstanceLease(pg_url, "alive", embedded_broker=False),
        InstanceLease(pg_url, "other", embedded_broker=False),
    ):
        async with InstanceLease(pg_url, "dead", embedded_broker=False):
            left = [await dead.create(new(target(i))) for i in range(30)]
            assert await alive.adopt_orphans(T0, 100) == []  # "dead" is still running
        own = await alive.create(new(target(99)))
        from_cli = await cli.create(new(target(98)))
        later = from_cli.updated_at + timedelta(seconds=1)
        first, second = await asyncio.gather(alive.adopt_orphans(later, 100), other.adopt_orphans(later, 100))
        adopted = sorted(c.id for c in [*first, *second])
        assert adopted == sorted([c.id for c in left] + [from_cli.id])
        assert own.id not in adopted
        assert await alive.adopt_orphans(later, 100) == []  # adopted rows belong to running instances now
