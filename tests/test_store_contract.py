"""One contract, every store: MemoryStore and SqliteStore must behave the same."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker_bridge.commands import CommandState, NewCommand, Report
from broker_bridge.devices import Device, parse_manifest
from broker_bridge.errors import (
    CommandFinished,
    CommandNotFound,
    Conflict,
    DeviceNotFound,
    LimitExceeded,
    StoreUnavailable,
)
from broker_bridge.store import CommandQuery, CommandStore
from broker_bridge.store.base import EXPIRE_WINDOW
from broker_bridge.store.memory import MemoryStore
from broker_bridge.store.postgres import PostgresStore
from broker_bridge.store.sqlite import SqliteStore
from broker_bridge.topics import Format, Target

T0 = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
REBOOT = Target(app_version="app-v1", endpoint_token="dev1", command_type="reboot")
OTHER_TYPE = Target(app_version="app-v1", endpoint_token="dev1", command_type="zero")
OTHER_DEVICE = Target(app_version="app-v1", endpoint_token="dev2", command_type="reboot")


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CommandStore]:
    """Each contract test runs once per store implementation."""
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "postgres":
        async with PostgresStore(request.getfixturevalue("pg_url"), instance="contract") as pg_store:
            yield pg_store
        return
    async with SqliteStore(tmp_path / "bridge.db") as sqlite_store:
        yield sqlite_store


def new(target: Target = REBOOT, ttl_s: float = 60, at: datetime = T0, payload: object = None) -> NewCommand:
    return NewCommand(target=target, payload=payload, created_at=at, expires_at=at + timedelta(seconds=ttl_s))


def report(code: int, at: datetime = T0, payload: object = "ok") -> Report:
    return Report(status_code=code, reason_phrase="R", payload=payload, received_at=at + timedelta(seconds=1))


Make = Callable[..., NewCommand]


async def test_create_assigns_increasing_unique_ids(store: CommandStore) -> None:
    """Ids are integers, unique and increasing across targets."""
    ids = [(await store.create(new(t))).id for t in (REBOOT, OTHER_TYPE, OTHER_DEVICE, REBOOT)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 4


async def test_create_round_trips_every_field(store: CommandStore) -> None:
    """What is stored comes back equal, including microseconds and nested payloads."""
    created = await store.create(new(payload={"a": [1, 2.5, None, "ü"]}))
    fetched = await store.get(created.id)
    assert fetched == created
    assert fetched.state is CommandState.PENDING
    assert fetched.expires_at == T0 + timedelta(seconds=60)


async def test_rerun_of_round_trips(store: CommandStore) -> None:
    """A re-run records the command it repeats; a plain invoke records none."""
    first = await store.create(new())
    again = await store.create(dataclasses.replace(new(), rerun_of=first.id))
    assert (await store.get(first.id)).rerun_of is None  # type: ignore[union-attr]
    assert (await store.get(again.id)).rerun_of == first.id  # type: ignore[union-attr]
    assert (await store.delivery(REBOOT, T0)).commands[1].rerun_of == first.id


async def test_get_unknown_returns_none(store: CommandStore) -> None:
    """Unknown ids are None, not an error."""
    assert await store.get(999) is None


async def test_poll_returns_only_open_commands_of_that_target(store: CommandStore) -> None:
    """A poll sees its own target's open, undue commands in id order."""
    a = await store.create(new())
    b = await store.create(new())
    await store.create(new(OTHER_TYPE))
    await store.create(new(OTHER_DEVICE))
    await store.report(REBOOT, [(a.id, report(200))])
    polled = await store.poll(REBOOT, T0 + timedelta(seconds=2), None, Format.PLAIN)
    assert [c.id for c in polled.commands] == [b.id]
    assert polled.moved is False


async def test_poll_hides_due_commands(store: CommandStore) -> None:
    """A command past its deadline is not delivered even before the sweep runs."""
    await store.create(new(ttl_s=5))
    assert (await store.poll(REBOOT, T0 + timedelta(seconds=5), None, Format.PLAIN)).commands == ()


async def test_progress_then_final_result(store: CommandStore) -> None:
    """1xx moves to in_progress and logs; a final code executes and stores the result."""
    cmd = await store.create(new())
    [progress] = await store.report(REBOOT, [(cmd.id, report(102, payload={"pct": 50}))])
    assert progress.error is None
    assert progress.command is not None
    assert progress.command.state is CommandState.IN_PROGRESS
    [final] = await store.report(REBOOT, [(cmd.id, report(409, at=T0 + timedelta(seconds=1), payload="busy"))])
    stored = await store.get(cmd.id)
    assert final.command == stored
    assert stored is not None
    assert (stored.state, stored.status_code, stored.result_payload) == (CommandState.EXECUTED, 409, "busy")
    assert [r.status_code for r in stored.log] == [102, 409]


async def test_report_for_other_target_is_refused_and_changes_nothing(store: CommandStore) -> None:
    """A result naming another endpoint's or type's id is unknown there and leaves it untouched."""
    cmd = await store.create(new())
    for wrong in (OTHER_TYPE, OTHER_DEVICE):
        [outcome] = await store.report(wrong, [(cmd.id, report(200))])
        assert isinstance(outcome.error, CommandNotFound)
        assert not outcome.changed
    assert await store.get(cmd.id) == cmd


async def test_report_on_finished_command_is_refused(store: CommandStore) -> None:
    """A second final result does not overwrite the first."""
    cmd = await store.create(new())
    await store.report(REBOOT, [(cmd.id, report(200, payload="first"))])
    [again] = await store.report(REBOOT, [(cmd.id, report(500, payload="second"))])
    assert isinstance(again.error, CommandFinished)
    stored = await store.get(cmd.id)
    assert stored is not None
    assert (stored.status_code, stored.result_payload, len(stored.log)) == (200, "first", 1)


async def test_late_report_is_logged_on_expired_command(store: CommandStore) -> None:
    """After the deadline a result is refused, the command is expired and the report kept in its log."""
    cmd = await store.create(new(ttl_s=0.5))
    [late] = await store.report(REBOOT, [(cmd.id, report(200))])
    assert isinstance(late.error, CommandFinished)
    stored = await store.get(cmd.id)
    assert stored is not None
    assert stored.state is CommandState.EXPIRED
    assert stored.status_code is None
    assert [r.status_code for r in stored.log] == [200]


async def test_batch_report_applies_each_item_in_order(store: CommandStore) -> None:
    """An array of results is applied item by item; a bad id does not block the good ones."""
    a = await store.create(new())
    b = await store.create(new())
    batch = [(a.id, report(102)), (999, report(200)), (a.id, report(200)), (b.id, report(201))]
    outcomes = await store.report(REBOOT, batch)
    assert [o.error is None for o in outcomes] == [True, False, True, True]
    assert [(await store.get(i)).state for i in (a.id, b.id)] == [CommandState.EXECUTED] * 2  # type: ignore[union-attr]


async def test_cancel(store: CommandStore) -> None:
    """Cancel finishes an open command; a finished or foreign one is refused."""
    cmd = await store.create(new())
    with pytest.raises(CommandNotFound):
        await store.cancel(cmd.id, T0, OTHER_DEVICE)
    cancelled = await store.cancel(cmd.id, T0 + timedelta(seconds=1), REBOOT)
    assert cancelled.state is CommandState.CANCELLED
    assert await store.get(cmd.id) == cancelled
    with pytest.raises(CommandFinished):
        await store.cancel(cmd.id, T0 + timedelta(seconds=2))
    assert (await store.poll(REBOOT, T0, None, Format.PLAIN)).commands == ()


async def test_expire_due_takes_only_due_commands_up_to_limit(store: CommandStore) -> None:
    """The sweep expires what is due, lowest ids first among the earliest deadlines, and nothing else."""
    due = [await store.create(new(ttl_s=s)) for s in (3, 1, 2)]
    later = await store.create(new(ttl_s=100))
    done = await store.create(new(ttl_s=1))
    await store.report(REBOOT, [(done.id, report(200, at=T0 - timedelta(seconds=1)))])
    first = await store.expire_due(T0 + timedelta(seconds=10), limit=2)
    assert first == [(due[0].id, REBOOT), (due[1].id, REBOOT)]  # all three in the window: id order
    rest = await store.expire_due(T0 + timedelta(seconds=10), limit=10)
    assert rest == [(due[2].id, REBOOT)]
    fetched = await store.get_many([due[0].id, due[1].id, due[2].id, 999])
    assert [c.id for c in fetched] == sorted(c.id for c in due)
    assert all(c.state is CommandState.EXPIRED for c in fetched)
    assert (await store.get(later.id)).state is CommandState.PENDING  # type: ignore[union-attr]
    assert (await store.get(done.id)).state is CommandState.EXECUTED  # type: ignore[union-attr]


async def test_expire_due_backlog_goes_window_by_window_in_deadline_order(store: CommandStore) -> None:
    """A backlog larger than the window: the latest deadline waits even though its id is the lowest."""
    window = EXPIRE_WINDOW  # with limit=1
    last_due = await store.create(new(ttl_s=window + 1))
    earlier = [await store.create(new(ttl_s=s)) for s in range(window, 0, -1)]  # ids ascend, deadlines descend
    now = T0 + timedelta(seconds=window + 5)
    taken = [await store.expire_due(now, limit=1) for _ in range(window + 2)]
    # The window is the `window` earliest deadlines; once one of them is expired the latest enters it.
    order = [earlier[0], last_due, *earlier[1:]]
    assert taken == [[(c.id, REBOOT)] for c in order] + [[]]


async def test_purge_deletes_old_finished_only_and_ids_are_not_reused(store: CommandStore) -> None:
    """Retention removes old finished commands; open ones stay; new ids stay unique."""
    old = await store.create(new())
    await store.report(REBOOT, [(old.id, report(200))])
    still_open = await store.create(new(ttl_s=10_000))
    assert await store.purge_finished(T0 + timedelta(days=1), limit=100) == 1
    assert await store.get(old.id) is None
    assert await store.get(still_open.id) is not None
    assert (await store.create(new())).id > still_open.id


async def test_history_filters_orders_and_pages(store: CommandStore) -> None:
    """History filters by app version, token, type and state, newest first by default."""
    ids = [(await store.create(new(t))).id for t in (REBOOT, OTHER_TYPE, OTHER_DEVICE, REBOOT)]
    await store.report(REBOOT, [(ids[0], report(200))])
    assert [c.id for c in await store.history(CommandQuery())] == ids[::-1]
    by_device = CommandQuery(endpoint_token="dev1", command_type="reboot")
    assert [c.id for c in await store.history(by_device)] == [ids[3], ids[0]]
    pending = CommandQuery(states=frozenset({CommandState.PENDING}), oldest_first=True, limit=2, offset=1)
    assert [c.id for c in await store.history(pending)] == [ids[2], ids[3]]
    assert await store.count(CommandQuery(app_version="app-v1")) == 4
    assert await store.count(CommandQuery(app_version="nope")) == 0


async def test_poll_remembers_observe_and_format(store: CommandStore) -> None:
    """observe false sticks until observe true; the last poll's format is used for pushes."""
    assert (await store.delivery(REBOOT, T0)).observe is True
    await store.poll(REBOOT, T0, False, Format.MSGPACK)
    await store.poll(REBOOT, T0, None, Format.MSGPACK)
    delivery = await store.delivery(REBOOT, T0)
    assert (delivery.observe, delivery.format) == (False, Format.MSGPACK)
    await store.poll(REBOOT, T0, True, Format.PLAIN)
    delivery = await store.delivery(REBOOT, T0)
    assert (delivery.observe, delivery.format) == (True, Format.PLAIN)


async def test_deliveries_read_many_targets_at_once_each_as_delivery_does(store: CommandStore) -> None:
    """One read for a push loop's chunk: in the order asked, repeats kept, each equal to ``delivery``
    (observer state, retained mark, the open unexpired commands oldest first; none: empty)."""
    a = await store.create(new(REBOOT))
    b = await store.create(new(REBOOT))
    await store.create(new(OTHER_TYPE, ttl_s=1))  # expired by T0 + 2 s
    done = await store.create(new(OTHER_DEVICE))
    await store.cancel(done.id, T0)
    await store.poll(OTHER_DEVICE, T0, False, Format.MSGPACK)
    await store.mark_retained(REBOOT, True)
    later = T0 + timedelta(seconds=2)
    unknown = Target(app_version="app-v1", endpoint_token="nobody", command_type="reboot")
    asked = [OTHER_DEVICE, REBOOT, unknown, OTHER_TYPE, REBOOT]
    found = await store.deliveries(asked, later)
    assert found == [await store.delivery(t, later) for t in asked]
    assert [d.target for d in found] == asked
    assert [[c.id for c in d.commands] for d in found] == [[], [a.id, b.id], [], [], [a.id, b.id]]
    assert (found[0].observe, found[0].format) == (False, Format.MSGPACK)
    assert (found[1].retained, found[2].observe, found[2].retained) == (True, True, False)
    assert await store.deliveries([], later) == []


async def test_mark_retained_many_is_mark_retained_for_each_in_order(store: CommandStore) -> None:
    """A chunk's marks and clears at once; a clear keeps the mark of a target with open commands,
    and a target named twice ends as its last entry says."""
    await store.create(new(REBOOT))
    done = await store.create(new(OTHER_DEVICE))
    await store.cancel(done.id, T0)
    await store.mark_retained_many(
        [(REBOOT, True, Format.MSGPACK), (OTHER_DEVICE, True, None), (OTHER_TYPE, True, None)]
    )
    assert set(await store.retained_targets()) == {REBOOT, OTHER_DEVICE, OTHER_TYPE}
    assert (await store.delivery(REBOOT, T0)).retained_format == Format.MSGPACK
    assert (await store.delivery(OTHER_DEVICE, T0)).retained_format == Format.PLAIN
    await store.mark_retained_many([(REBOOT, False, None), (OTHER_DEVICE, False, None)])
    assert set(await store.retained_targets()) == {REBOOT, OTHER_TYPE}  # REBOOT still has an open command
    await store.mark_retained_many([(OTHER_TYPE, False, None), (OTHER_TYPE, True, Format.JSON)])
    assert (await store.delivery(OTHER_TYPE, T0)).retained_format == Format.JSON
    await store.mark_retained_many([])


async def test_open_summary_counts_open_commands_by_state_and_type(store: CommandStore) -> None:
    """What the metrics show of the whole store: open commands by state and type, the oldest pending."""
    assert (await store.open_summary()).counts == {}
    assert (await store.open_summary()).oldest_pending is None
    first = await store.create(new(REBOOT, at=T0))
    await store.create(new(REBOOT, at=T0 + timedelta(seconds=1)))
    started = await store.create(new(OTHER_TYPE, at=T0 - timedelta(seconds=5)))
    await store.report(OTHER_TYPE, [(started.id, report(102))])
    done = await store.create(new(OTHER_DEVICE, at=T0 - timedelta(seconds=9)))
    await store.cancel(done.id, T0)
    summary = await store.open_summary()
    assert summary.counts == {("pending", "reboot"): 2, ("in_progress", "zero"): 1}
    assert summary.oldest_pending == first.created_at


async def test_open_targets_and_retained_marks(store: CommandStore) -> None:
    """Open targets are listed per endpoint; retained marks are remembered."""
    await store.create(new(REBOOT))
    await store.create(new(OTHER_TYPE))
    other = await store.create(new(OTHER_DEVICE))
    assert await store.open_targets(T0, "app-v1", "dev1") == [REBOOT, OTHER_TYPE]
    assert len(await store.all_open_targets(T0)) == 3
    await store.mark_retained(OTHER_DEVICE, True)
    assert await store.retained_targets() == [OTHER_DEVICE]
    assert (await store.delivery(OTHER_DEVICE, T0)).retained is True
    await store.cancel(other.id, T0)
    await store.mark_retained(OTHER_DEVICE, False)
    assert await store.retained_targets() == []


async def test_submit_creates_and_returns_the_committed_delivery(store: CommandStore) -> None:
    """submit is create plus the target's outstanding list as committed, in one transaction."""
    first = await store.submit(new(), max_open=10, mark_retained=False)
    second = await store.submit(new(), max_open=10, mark_retained=False)
    assert (first.created, second.created) == (True, True)
    assert second.delivery is not None
    assert [c.id for c in second.delivery.commands] == [first.command.id, second.command.id]
    assert second.delivery.commands[-1] == second.command == await store.get(second.command.id)
    assert (second.delivery.observe, second.delivery.format, second.delivery.retained) == (True, Format.PLAIN, False)
    assert await store.retained_targets() == []


async def test_submit_without_delivery_reads_no_list_but_marks_as_with_it(store: CommandStore) -> None:
    """Several instances push lists they read afresh: the invoke returns no list, and marks the
    target retained exactly as it would with one (observing devices only, in their format)."""
    created = await store.submit(new(), max_open=10, mark_retained=True, with_delivery=False)
    assert (created.created, created.delivery) == (True, None)
    assert created.command == await store.get(created.command.id)
    assert await store.retained_targets() == [REBOOT]
    assert (await store.delivery(REBOOT, T0)).retained_format == Format.PLAIN
    await store.poll(OTHER_TYPE, T0, True, Format.MSGPACK)
    await store.submit(new(OTHER_TYPE), max_open=10, mark_retained=True, with_delivery=False)
    assert (await store.delivery(OTHER_TYPE, T0)).retained_format == Format.MSGPACK
    await store.poll(OTHER_DEVICE, T0, False, Format.PLAIN)
    await store.submit(new(OTHER_DEVICE), max_open=10, mark_retained=True, with_delivery=False)
    await store.submit(new(OTHER_DEVICE), max_open=10, mark_retained=False, with_delivery=False)
    assert sorted(await store.retained_targets(), key=str) == sorted([REBOOT, OTHER_TYPE], key=str)
    with pytest.raises(LimitExceeded):
        await store.submit(new(), max_open=1, mark_retained=True, with_delivery=False)


async def test_submit_marks_retained_only_for_observing_devices(store: CommandStore) -> None:
    """With mark_retained the target is marked in the same transaction, unless the device opted out."""
    created = await store.submit(new(), max_open=10, mark_retained=True)
    assert created.delivery is not None
    assert created.delivery.retained is True
    assert await store.retained_targets() == [REBOOT]
    await store.poll(OTHER_TYPE, T0, False, Format.JSON)  # observe false: nothing is pushed, nothing retained
    quiet = await store.submit(new(OTHER_TYPE), max_open=10, mark_retained=True)
    assert quiet.delivery is not None
    assert (quiet.delivery.observe, quiet.delivery.retained) == (False, False)
    assert await store.retained_targets() == [REBOOT]


async def test_a_late_clear_does_not_unmark_a_list_filled_again(store: CommandStore) -> None:
    """The push loop publishes the emptied list, then clears the mark; an invoke in between wins."""
    first = await store.submit(new(), max_open=10, mark_retained=True)
    await store.report(REBOOT, [(first.command.id, report(200))])  # the list is empty: a clear is due
    await store.submit(new(), max_open=10, mark_retained=True)  # filled again before the clear commits
    await store.mark_retained(REBOOT, False)
    assert await store.retained_targets() == [REBOOT]
    assert (await store.delivery(REBOOT, T0)).retained is True


async def test_a_clear_after_a_deletion_applies_while_commands_are_open(store: CommandStore) -> None:
    """observe false: the list was deleted from the broker, so the mark goes although commands wait."""
    await store.submit(new(), max_open=10, mark_retained=True)
    await store.poll(REBOOT, T0, False, Format.PLAIN)
    await store.mark_retained(REBOOT, False)
    assert await store.retained_targets() == []


async def test_a_retained_list_stays_recorded_under_its_format_when_the_device_switches(store: CommandStore) -> None:
    """The mark names the format the list was retained in; a poll in another format says it moved,
    until the list is marked again in the new format (the outbox deletes the old one in between)."""
    created = await store.submit(new(), max_open=10, mark_retained=True)
    assert created.delivery is not None
    assert (created.delivery.retained_format, created.delivery.retained_elsewhere) == (Format.PLAIN, None)
    switched = await store.poll(REBOOT, T0, None, Format.MSGPACK)
    assert switched.moved is True
    assert [c.id for c in switched.commands] == [created.command.id]
    delivery = await store.delivery(REBOOT, T0)
    assert (delivery.format, delivery.retained, delivery.retained_format) == (Format.MSGPACK, True, Format.PLAIN)
    assert delivery.retained_elsewhere is Format.PLAIN
    assert (await store.poll(REBOOT, T0, None, Format.MSGPACK)).moved is True  # until it is moved
    await store.mark_retained(REBOOT, True, Format.MSGPACK)
    delivery = await store.delivery(REBOOT, T0)
    assert (delivery.retained_format, delivery.retained_elsewhere) == (Format.MSGPACK, None)
    assert (await store.poll(REBOOT, T0, None, Format.MSGPACK)).moved is False
    back = await store.poll(REBOOT, T0, None, Format.PLAIN)
    assert back.moved is True
    assert (await store.delivery(REBOOT, T0)).retained_elsewhere is Format.MSGPACK


async def test_an_unretained_target_never_moves(store: CommandStore) -> None:
    """Without a retained list a format switch is only remembered; a cleared mark names no format."""
    created = await store.submit(new(), max_open=10, mark_retained=False)
    assert (await store.poll(REBOOT, T0, None, Format.JSON)).moved is False
    await store.mark_retained(REBOOT, True)  # no format given: the device's current one
    assert (await store.delivery(REBOOT, T0)).retained_format is Format.JSON
    await store.report(REBOOT, [(created.command.id, report(200))])
    await store.mark_retained(REBOOT, False)
    delivery = await store.delivery(REBOOT, T0)
    assert (delivery.retained, delivery.retained_format) == (False, None)
    assert (await store.poll(REBOOT, T0, None, Format.MSGPACK)).moved is False


async def test_submit_refuses_past_the_open_limit_without_writing(store: CommandStore) -> None:
    """The limit counts open commands of the endpoint (every type); finished ones free a slot."""
    a = await store.submit(new(REBOOT), max_open=2, mark_retained=False)
    await store.submit(new(OTHER_TYPE), max_open=2, mark_retained=False)
    with pytest.raises(LimitExceeded, match="max_outstanding_per_endpoint"):
        await store.submit(new(REBOOT), max_open=2, mark_retained=False)
    assert await store.count(CommandQuery()) == 2
    await store.submit(new(OTHER_DEVICE), max_open=2, mark_retained=False)  # another endpoint
    await store.report(REBOOT, [(a.command.id, report(200))])
    assert (await store.submit(new(REBOOT), max_open=2, mark_retained=False)).created


async def test_submit_with_a_used_idempotency_key_returns_the_earlier_command(store: CommandStore) -> None:
    """Nothing is created, the limit is not consulted, and there is no delivery to push."""
    keyed = dataclasses.replace(new(), idempotency_key="k1")
    first = await store.submit(keyed, max_open=1, mark_retained=False)
    again = await store.submit(dataclasses.replace(keyed, payload="other"), max_open=1, mark_retained=False)
    assert (again.created, again.command, again.delivery) == (False, first.command, None)
    assert await store.count(CommandQuery()) == 1


async def test_concurrent_operations_keep_submission_order(store: CommandStore) -> None:
    """Progress and final result submitted back to back apply in that order."""
    cmd = await store.create(new())
    progress = asyncio.ensure_future(store.report(REBOOT, [(cmd.id, report(102))]))
    final = asyncio.ensure_future(store.report(REBOOT, [(cmd.id, report(200, at=T0 + timedelta(seconds=1)))]))
    results = await asyncio.gather(progress, final)
    assert [r[0].error for r in results] == [None, None]
    stored = await store.get(cmd.id)
    assert stored is not None
    assert [r.status_code for r in stored.log] == [102, 200]


async def test_sqlite_survives_reopen(tmp_path: Path) -> None:
    """What was committed is there after the store is closed and opened again."""
    async with SqliteStore(tmp_path / "b.db") as first:
        cmd = await first.create(new())
        await first.report(REBOOT, [(cmd.id, report(102))])
    async with SqliteStore(tmp_path / "b.db") as second:
        assert await second.get(cmd.id) == (await second.history(CommandQuery()))[0]
        assert (await second.get(cmd.id)).state is CommandState.IN_PROGRESS  # type: ignore[union-attr]


async def test_sqlite_group_commit_batches_concurrent_writes(tmp_path: Path) -> None:
    """Many waiting writes share commits: fewer commits than writes."""
    async with SqliteStore(tmp_path / "b.db") as sqlite_store:
        created = await asyncio.gather(*(sqlite_store.create(new()) for _ in range(200)))
        assert len({c.id for c in created}) == 200
        assert max(sqlite_store.batch_sizes) > 1
        assert len(sqlite_store.batch_sizes) < 200


async def test_sqlite_a_failing_commit_hook_does_not_leave_callers_waiting(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "b.db") as sqlite_store:

        def broken(size: int) -> None:
            raise RuntimeError("metrics are down")

        sqlite_store.on_commit = broken
        created = await asyncio.wait_for(sqlite_store.create(new()), 5)
        assert await sqlite_store.get(created.id) == created


async def test_sqlite_open_limit_holds_under_concurrent_invokes(tmp_path: Path) -> None:
    """The limit is checked in the transaction that inserts: a burst cannot overshoot it."""
    async with SqliteStore(tmp_path / "b.db") as sqlite_store:
        results = await asyncio.gather(
            *(sqlite_store.submit(new(), max_open=5, mark_retained=False) for _ in range(40)), return_exceptions=True
        )
        assert max(sqlite_store.batch_sizes) > 5  # they did share transactions
        refused = [r for r in results if isinstance(r, LimitExceeded)]
        assert (len(results) - len(refused), len(refused)) == (5, 35)
        assert await sqlite_store.count(CommandQuery()) == 5


@pytest.mark.parametrize(
    ("sql", "index"),
    [
        (
            "SELECT id FROM commands WHERE state IN ('pending', 'in_progress') AND expires_at <= 1 "
            "ORDER BY expires_at LIMIT 10",
            "commands_due",
        ),
        (
            "SELECT id FROM commands WHERE state IN ('executed', 'expired', 'cancelled') AND updated_at < 1 "
            "ORDER BY updated_at LIMIT 10",
            "commands_finished",
        ),
    ],
)
async def test_sqlite_sweeps_read_only_what_they_remove(tmp_path: Path, sql: str, index: str) -> None:
    """The expiry and retention sweeps search a partial index, not the whole table."""
    async with SqliteStore(tmp_path / "b.db"):
        pass
    with sqlite3.connect(tmp_path / "b.db") as conn:
        plan = " ".join(str(row) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
    assert f"USING INDEX {index}" in plan or f"USING COVERING INDEX {index}" in plan, plan


# -- issue 3: idempotency, ephemeral executions, the device registry ----------------------------
def device(device_id: str = "d1", token: str = "dev1", manifest: dict[str, object] | None = None) -> Device:
    spec = None if manifest is None else parse_manifest(manifest)
    return Device(
        device_id=device_id,
        app_version="app-v1",
        endpoint_token=token,
        labels={"site": "a"},
        manifest=spec,
        created_at=T0,
        updated_at=T0,
    )


async def test_idempotency_key_is_unique_per_endpoint(store: CommandStore) -> None:
    """A key names one command per endpoint; another endpoint may reuse it."""
    first = await store.create(
        NewCommand(target=REBOOT, payload=1, created_at=T0, expires_at=T0 + timedelta(hours=1), idempotency_key="k1")
    )
    assert await store.find_idempotent(OTHER_TYPE, "k1") == first  # same endpoint, any type
    assert await store.find_idempotent(OTHER_DEVICE, "k1") is None
    with pytest.raises(Conflict):
        await store.create(NewCommand(target=REBOOT, payload=2, created_at=T0, expires_at=T0, idempotency_key="k1"))
    other = await store.create(
        NewCommand(target=OTHER_DEVICE, payload=3, created_at=T0, expires_at=T0, idempotency_key="k1")
    )
    assert other.id != first.id
    assert await store.count(CommandQuery()) == 2


async def test_ephemeral_commands_hidden_on_request_and_purged_by_age(store: CommandStore) -> None:
    """Ephemeral commands can be filtered out and are deleted by creation time, whatever their state."""
    kept = await store.create(new())
    short = await store.create(
        NewCommand(
            target=REBOOT,
            payload=None,
            created_at=T0,
            expires_at=T0 + timedelta(hours=1),
            ephemeral=True,
            request_name="alias",
        )
    )
    assert (await store.get(short.id)) == short
    assert short.ephemeral
    assert short.request_name == "alias"
    assert [c.id for c in await store.history(CommandQuery(ephemeral=False))] == [kept.id]
    assert await store.count(CommandQuery()) == 2
    assert await store.purge_ephemeral(T0, limit=10) == 0
    assert await store.purge_ephemeral(T0 + timedelta(days=1), limit=10) == 1
    assert await store.get(short.id) is None
    assert await store.get(kept.id) is not None


async def test_device_registry_round_trip(store: CommandStore) -> None:
    """Devices are stored with labels and manifest, found by id and by endpoint, listed, replaced, deleted."""
    manifest = {"commands": {"reboot": {"aliases": ["restart"], "arguments": {"delay": {"type": "integer"}}}}}
    added = await store.add_device(device(manifest=manifest))
    assert await store.get_device("d1") == added
    assert await store.device_for("app-v1", "dev1") == added
    assert await store.device_for("app-v1", "nobody") is None
    await store.add_device(device("d2", "dev2"))
    assert [d.device_id for d in await store.devices(limit=10, offset=0)] == ["d1", "d2"]
    assert await store.count_devices() == 2
    changed = dataclasses.replace(added, labels={"site": "b"}, manifest=None)
    assert await store.replace_device(changed) == changed
    assert await store.get_device("d1") == changed
    assert await store.delete_device("d1") is True
    assert await store.delete_device("d1") is False
    assert await store.get_device("d1") is None


async def test_mark_seen_keeps_the_latest_time_and_survives_edits(store: CommandStore) -> None:
    """Last-seen times for many endpoints at once: never back in time (the same endpoint twice, or
    an older flush written later), unknown endpoints left out, and an edit keeps the time."""
    await store.add_device(device("d1", "dev1"))
    await store.add_device(device("d2", "dev2"))
    fresh = await store.get_device("d1")
    assert fresh is not None
    assert fresh.last_seen_at is None
    t1, t2 = T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)
    await store.mark_seen([("app-v1", "dev1", t2), ("app-v1", "dev1", t1), ("app-v1", "nobody", t2)])
    await store.mark_seen([("app-v1", "dev2", t1)])
    await store.mark_seen([("app-v1", "dev1", t1), ("app-v1", "dev2", t2)])  # dev1's is older: kept
    await store.mark_seen([])
    one, two = await store.get_device("d1"), await store.device_for("app-v1", "dev2")
    assert one is not None
    assert two is not None
    assert (one.last_seen_at, two.last_seen_at) == (t2, t2)
    await store.replace_device(dataclasses.replace(one, labels={"site": "c"}, last_seen_at=None))
    edited = await store.get_device("d1")
    assert edited is not None
    assert (edited.labels, edited.last_seen_at) == ({"site": "c"}, t2)
    assert [d.last_seen_at for d in await store.devices(limit=10, offset=0)] == [t2, t2]
    assert await store.count_devices() == 2


async def test_devices_filtered_by_labels_carry_all_of_them(store: CommandStore) -> None:
    """Every label asked for must be on the device, with that value; keys may hold quotes and dots."""
    odd = 'we"ird.key'
    for n, labels in enumerate(({"site": "lab", "floor": "2"}, {"site": "lab"}, {"site": "hq", odd: "x"}, {})):
        await store.add_device(dataclasses.replace(device(f"d{n}", f"dev{n}"), labels=labels))

    async def ids(labels: dict[str, str] | None) -> tuple[list[str], int]:
        found = [d.device_id for d in await store.devices(limit=10, offset=0, labels=labels)]
        return found, await store.count_devices(labels)

    assert await ids(None) == (["d0", "d1", "d2", "d3"], 4)
    assert await ids({}) == (["d0", "d1", "d2", "d3"], 4)
    assert await ids({"site": "lab"}) == (["d0", "d1"], 2)
    assert await ids({"site": "lab", "floor": "2"}) == (["d0"], 1)
    assert await ids({"site": "lab", "floor": "3"}) == ([], 0)
    assert await ids({odd: "x"}) == (["d2"], 1)
    assert await ids({"site": "LAB"}) == ([], 0)  # values match exactly
    assert [d.device_id for d in await store.devices(limit=1, offset=1, labels={"site": "lab"})] == ["d1"]


async def test_device_conflicts(store: CommandStore) -> None:
    """Duplicate ids and duplicate endpoints are refused; replacing an unknown device is not found."""
    await store.add_device(device())
    with pytest.raises(Conflict):
        await store.add_device(device())
    with pytest.raises(Conflict):
        await store.add_device(device("d2", "dev1"))
    second = await store.add_device(device("d2", "dev2"))
    with pytest.raises(Conflict):
        await store.replace_device(dataclasses.replace(second, endpoint_token="dev1"))
    with pytest.raises(DeviceNotFound):
        await store.replace_device(device("ghost", "dev9"))


async def test_unannounced_changes_until_marked(store: CommandStore) -> None:
    """Every change is unannounced until its exact version is marked; a newer change is not covered."""
    a = await store.create(new())
    b = await store.create(new())
    assert [c.id for c in await store.unannounced(0, 10)] == [a.id, b.id]
    await store.mark_announced([(a.id, a.updated_at), (b.id, b.updated_at)])
    assert await store.unannounced(0, 10) == []
    [outcome] = await store.report(REBOOT, [(a.id, report(200))])
    assert outcome.command is not None
    assert [c.id for c in await store.unannounced(0, 10)] == [a.id]
    await store.mark_announced([(a.id, a.updated_at)])  # the old version: does not cover the new one
    assert [c.state for c in await store.unannounced(0, 10)] == [CommandState.EXECUTED]
    await store.mark_announced([(a.id, outcome.command.updated_at)])
    await store.cancel(b.id, T0 + timedelta(seconds=5))
    assert [c.id for c in await store.unannounced(0, 10)] == [b.id]
    assert await store.unannounced(b.id, 10) == []


async def test_check_writable_passes_on_a_healthy_store(store: CommandStore) -> None:
    """Readiness's write probe commits on every store, repeatedly."""
    await store.check_writable(T0)
    await store.check_writable(T0 + timedelta(seconds=1))


async def test_sqlite_check_writable_notices_the_file_gone_or_replaced(tmp_path: Path) -> None:
    """The WAL/database unlinked while running lost acknowledged commands after kill -9: readiness
    says so (the files open are no longer the ones on disk)."""
    db = tmp_path / "bridge.db"
    async with SqliteStore(db) as store:
        await store.check_writable(T0)
        db.rename(tmp_path / "moved.db")
        with pytest.raises(StoreUnavailable, match="gone while open"):
            await store.check_writable(T0)
        (tmp_path / "moved.db").rename(db)
        await store.check_writable(T0)
        db.rename(tmp_path / "moved.db")
        async with SqliteStore(db):  # a new file in its place
            pass
        with pytest.raises(StoreUnavailable, match="replaced while open"):
            await store.check_writable(T0)


async def test_invoker_and_device_seen_round_trip(store: CommandStore) -> None:
    """Who invoked a command, and whether its endpoint had been heard from, come back as stored,
    through a plain create and through an operator's submit."""
    made = await store.create(dataclasses.replace(new(), invoked_by="ops-team", device_seen=False))
    submitted = await store.submit(
        dataclasses.replace(new(OTHER_DEVICE), invoked_by="cli:alice"), max_open=10, mark_retained=False
    )
    assert (made.invoked_by, made.device_seen) == ("ops-team", False)
    assert await store.get(made.id) == made
    fetched = await store.get(submitted.command.id)
    assert fetched is not None
    assert (fetched.invoked_by, fetched.device_seen) == ("cli:alice", True)
    plain = await store.create(new())
    assert (plain.invoked_by, plain.device_seen) == (None, True)


async def test_mark_delivery_sets_each_time_once(store: CommandStore) -> None:
    """sentAt and deliveredAt are set by the first proof and never moved; delivered implies sent;
    the record's version stays (no compare-and-set of a report or cancel fails because of them);
    unknown ids are ignored."""
    first, second, third = [await store.create(new()) for _ in range(3)]
    t1, t2, t3 = (T0 + timedelta(seconds=s) for s in (1, 2, 3))
    await store.mark_delivery(sent=[(first.id, t1), (second.id, t1), (999_999, t1)], delivered=[(third.id, t2)])
    await store.mark_delivery(sent=[(first.id, t3)], delivered=[(second.id, t2), (second.id, t3)])
    await store.mark_delivery(sent=[], delivered=[])
    got = {c.id: c for c in await store.get_many([first.id, second.id, third.id])}
    assert (got[first.id].sent_at, got[first.id].delivered_at) == (t1, None)
    assert (got[second.id].sent_at, got[second.id].delivered_at) == (t1, t2)
    assert (got[third.id].sent_at, got[third.id].delivered_at) == (t2, t2)
    assert [c.updated_at for c in got.values()] == [T0, T0, T0]
    # A report after a push keeps the push's sentAt and adds its own proof of receipt.
    (outcome,) = await store.report(REBOOT, [(first.id, report(200, at=T0 + timedelta(seconds=9)))])
    assert outcome.error is None
    done = await store.get(first.id)
    assert done is not None
    assert (done.sent_at, done.delivered_at) == (t1, T0 + timedelta(seconds=10))
    # ... and a report written from a stale copy (delivered since it was read) does not undo the mark.
    cancelled = await store.cancel(second.id, T0 + timedelta(seconds=11))
    assert (cancelled.sent_at, cancelled.delivered_at) == (t1, t2)


async def test_presence_moves_forward_and_filters_devices(store: CommandStore) -> None:
    """Presence changes apply in time order (a stale one is ignored), unregistered endpoints are
    left out, an edit keeps presence, and listings filter by it; unknown is neither."""
    for n in range(3):
        await store.add_device(device(f"d{n}", f"dev{n}"))
    t1, t2, t3 = (T0 + timedelta(seconds=s) for s in (1, 2, 3))
    await store.mark_presence(
        [
            ("app-v1", "dev0", True, t1),
            ("app-v1", "dev1", True, t1),
            ("app-v1", "dev1", False, t2),
            ("app-v1", "unregistered", True, t1),
        ]
    )
    await store.mark_presence([("app-v1", "dev0", False, t1), ("app-v1", "dev1", True, t1)])  # stale: ignored
    await store.mark_presence([])
    d0, d1, d2 = [await store.get_device(f"d{n}") for n in range(3)]
    assert d0 is not None
    assert d1 is not None
    assert d2 is not None
    assert (d0.connected, d0.connected_at, d0.disconnected_at) == (True, t1, None)
    assert (d1.connected, d1.connected_at, d1.disconnected_at) == (False, t1, t2)
    assert (d2.connected, d2.connected_at, d2.disconnected_at) == (None, None, None)
    await store.replace_device(dataclasses.replace(d0, labels={"site": "lab"}, connected=None))
    edited = await store.get_device("d0")
    assert edited is not None
    assert (edited.labels, edited.connected) == ({"site": "lab"}, True)

    async def ids(connected: bool | None, labels: dict[str, str] | None = None) -> tuple[list[str], int]:
        found = [d.device_id for d in await store.devices(limit=10, offset=0, labels=labels, connected=connected)]
        return found, await store.count_devices(labels, connected)

    assert await ids(None) == (["d0", "d1", "d2"], 3)
    assert await ids(True) == (["d0"], 1)
    assert await ids(False) == (["d1"], 1)
    assert await ids(True, {"site": "lab"}) == (["d0"], 1)
    assert await ids(False, {"site": "lab"}) == ([], 0)
    assert await store.disconnect_all(t3) == 1
    after = await store.get_device("d0")
    assert after is not None
    assert (after.connected, after.connected_at, after.disconnected_at) == (False, t1, t3)
    assert await store.disconnect_all(t3) == 0


async def test_a_delivery_window_hands_out_the_oldest_open_commands_only(store: CommandStore) -> None:
    """``window=k``: poll, delivery, deliveries and submit's list carry the k lowest ids among the
    open, unexpired commands (finished and expired ones take no place), and read no further."""
    early = await store.create(new(REBOOT, ttl_s=1))  # expired by T0 + 2 s
    finished = await store.create(new(REBOOT))
    await store.cancel(finished.id, T0)
    made = [await store.create(new(REBOOT)) for _ in range(3)]
    await store.create(new(OTHER_TYPE))
    later = T0 + timedelta(seconds=2)
    assert early.id < finished.id < made[0].id
    assert (await store.poll(REBOOT, later, None, Format.PLAIN, 2)).commands == tuple(made[:2])
    assert (await store.delivery(REBOOT, later, 2)).commands == tuple(made[:2])
    assert [d.commands for d in await store.deliveries([REBOOT, OTHER_TYPE], later, 1)] == [
        (made[0],),
        ((await store.delivery(OTHER_TYPE, later)).commands[0],),
    ]
    assert len((await store.delivery(REBOOT, later, None)).commands) == 3
    created = await store.submit(new(REBOOT, at=later), max_open=100, mark_retained=False, window=2)
    assert created.delivery is not None
    assert created.delivery.commands == tuple(made[:2])
