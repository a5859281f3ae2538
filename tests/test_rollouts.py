"""Fleet rollouts: the pure rules on a fake clock, the step on every store, and the HTTP flow."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker_bridge.commands import Command, CommandState, Report
from broker_bridge.devices import Device, parse_manifest
from broker_bridge.errors import Conflict, Unprocessable
from broker_bridge.rollout_service import Preview, RolloutService, parse_spec
from broker_bridge.rollouts import (
    DeviceState,
    Member,
    Pace,
    Rollout,
    RolloutSpec,
    RolloutState,
    Snapshot,
    allowance,
    first_pace,
    plan,
    ramp_up,
    tripped_rule,
)
from broker_bridge.service import CommandService
from broker_bridge.store import CommandStore
from broker_bridge.store.memory import MemoryStore
from broker_bridge.store.postgres import PostgresStore
from broker_bridge.store.sqlite import SqliteStore
from broker_bridge.topics import Target

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def spec(**changes: Any) -> RolloutSpec:
    body: dict[str, Any] = {"command": {"name": "reboot"}, "target": {"labels": {"site": "lab"}}, **changes}
    return parse_spec(body)


def rollout(s: RolloutSpec, counts: dict[DeviceState, int], pace: Pace | None = None) -> Rollout:
    return Rollout(
        id=1, spec=s, state=RolloutState.IN_PROGRESS, created_at=T0, updated_at=T0, started_at=T0,
        pace=pace or first_pace(s, T0), counts=counts,
    )  # fmt: skip


# -- the pure rules -----------------------------------------------------------------------------------
def test_steady_rate_lets_out_one_at_once_then_per_minute() -> None:
    s = spec(rate={"max_per_minute": 60})
    queued = {DeviceState.QUEUED: 1000}
    assert allowance(s, first_pace(s, T0), queued, T0) == 1
    assert allowance(s, first_pace(s, T0), queued, T0 + timedelta(seconds=10)) == 11
    sent_11 = {DeviceState.QUEUED: 989, DeviceState.SENT: 11}
    assert allowance(s, first_pace(s, T0), sent_11, T0 + timedelta(seconds=10)) == 0
    assert allowance(s, first_pace(s, T0), sent_11, T0 + timedelta(seconds=60)) == 50
    # Over a minute, never more than the rate (plus the first one).
    assert allowance(s, first_pace(s, T0), queued, T0 + timedelta(seconds=60)) == 61


def test_no_rate_sends_everything_and_max_in_flight_caps_it() -> None:
    assert allowance(spec(), first_pace(spec(), T0), {DeviceState.QUEUED: 5000}, T0) == 5000
    s = spec(rate={"max_in_flight": 3})
    counts = {DeviceState.QUEUED: 10, DeviceState.SENT: 1, DeviceState.IN_PROGRESS: 1}
    assert allowance(s, first_pace(s, T0), counts, T0) == 1


def test_ramp_multiplies_the_rate_each_step_up_to_the_ceiling() -> None:
    s = spec(rate={"max_per_minute": 100, "ramp": {"base_per_minute": 10, "factor": 2, "every": 5}})
    pace = first_pace(s, T0)
    assert (pace.per_minute, pace.next_step) == (10, 5)
    assert ramp_up(s, pace, {DeviceState.SENT: 4}, T0) == pace
    stepped = ramp_up(s, pace, {DeviceState.SENT: 5}, T0 + timedelta(seconds=30))
    assert (stepped.per_minute, stepped.next_step, stepped.sent_before) == (20, 10, 5)
    assert stepped.since == T0 + timedelta(seconds=30)
    top = ramp_up(s, stepped, {DeviceState.SUCCEEDED: 40}, T0 + timedelta(seconds=40))
    assert top.per_minute == 100  # 20 -> 40 -> 80 -> 100, capped
    by_success = spec(
        rate={"max_per_minute": 100, "ramp": {"base_per_minute": 10, "factor": 2, "every": 5, "counting": "succeeded"}}
    )
    assert ramp_up(by_success, first_pace(by_success, T0), {DeviceState.SENT: 50}, T0).per_minute == 10


@pytest.mark.parametrize(
    ("outcome", "counts", "trips"),
    [
        ("ERROR", {DeviceState.SUCCEEDED: 9, DeviceState.FAILED: 1}, True),
        ("ERROR", {DeviceState.SUCCEEDED: 10, DeviceState.FAILED: 1}, False),
        ("TIMEOUT", {DeviceState.SUCCEEDED: 9, DeviceState.FAILED: 5}, False),
        ("TIMEOUT", {DeviceState.SUCCEEDED: 8, DeviceState.TIMED_OUT: 2}, True),
        ("ANY_FAILURE", {DeviceState.SUCCEEDED: 18, DeviceState.FAILED: 1, DeviceState.TIMED_OUT: 1}, True),
        ("ANY_FAILURE", {DeviceState.SUCCEEDED: 2, DeviceState.FAILED: 3}, False),  # under min_executed
    ],
)
def test_abort_rules(outcome: str, counts: dict[DeviceState, int], trips: bool) -> None:
    s = spec(abort=[{"outcome": outcome, "threshold_percent": 10, "min_executed": 10}])
    found = tripped_rule(s.abort, counts)
    assert (found is not None) is trips
    if found is not None:
        assert found.startswith(outcome)


def member(state: DeviceState, attempt: int = 1, command_id: int = 1) -> Member:
    return Member(
        position=0, device_id="d", app_version="a-v1", endpoint_token="t", state=state, attempt=attempt,
        command_id=command_id, updated_at=T0,
    )  # fmt: skip


def command(state: CommandState, status: int | None = None) -> Command:
    return Command(
        id=1, target=Target(app_version="a-v1", endpoint_token="t", command_type="reboot"), payload=None,
        state=state, status_code=status, reason_phrase=None, result_payload=None, created_at=T0, updated_at=T0,
        expires_at=T0 + timedelta(hours=1),
    )  # fmt: skip


def test_plan_settles_outcomes_and_retries_within_limits() -> None:
    s = spec(retry={"max_attempts": 2, "on": ["TIMEOUT"]})
    counts = {DeviceState.SENT: 4}
    snapshot = Snapshot(
        rollout=rollout(s, counts),
        in_flight=[
            (member(DeviceState.SENT), command(CommandState.EXECUTED, 200)),
            (member(DeviceState.SENT), command(CommandState.EXECUTED, 500)),
            (member(DeviceState.SENT, attempt=1), command(CommandState.EXPIRED)),
            (member(DeviceState.SENT, attempt=2), command(CommandState.EXPIRED)),
        ],
    )
    decided = plan(snapshot, T0 + timedelta(seconds=1))
    assert [state for _, state in decided.settle] == [
        DeviceState.SUCCEEDED, DeviceState.FAILED, DeviceState.QUEUED, DeviceState.TIMED_OUT,
    ]  # fmt: skip
    assert decided.rollout.counts == {
        DeviceState.SUCCEEDED: 1, DeviceState.FAILED: 1, DeviceState.QUEUED: 1, DeviceState.TIMED_OUT: 1,
    }  # fmt: skip
    assert decided.send == 1  # the retried one goes out again


def test_plan_completes_when_nothing_is_left_and_waits_for_start_at() -> None:
    done = plan(Snapshot(rollout=rollout(spec(), {DeviceState.SUCCEEDED: 3}), in_flight=[]), T0)
    assert (done.rollout.state, done.rollout.finished_at) == (RolloutState.COMPLETED, T0)
    later = spec(start_at=(T0 + timedelta(hours=1)).isoformat())
    waiting = dataclasses.replace(
        rollout(later, {DeviceState.QUEUED: 3}), state=RolloutState.SCHEDULED, started_at=None
    )
    assert plan(Snapshot(rollout=waiting, in_flight=[]), T0).send == 0
    started = plan(Snapshot(rollout=waiting, in_flight=[]), T0 + timedelta(hours=1))
    assert (started.rollout.state, started.send) == (RolloutState.IN_PROGRESS, 3)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"command": {"name": "reboot"}, "target": {}}, "target"),
        (
            {"command": {"name": "reboot"}, "target": {"labels": {"a": "b"}}, "rate": {"max_per_minute": 0}},
            "rate.max_per_minute",
        ),
        (
            {
                "command": {"name": "reboot"},
                "target": {"labels": {"a": "b"}},
                "abort": [{"outcome": "ERROR", "threshold_percent": 150}],
            },
            "abort.0.threshold_percent",
        ),
        ({"command": {"name": ""}, "target": {"labels": {"a": "b"}}}, "command.name"),
        ({"command": {"name": "x"}, "target": {"labels": {"a": "b"}}, "tll": 5}, "tll"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(Unprocessable) as refused:
        parse_spec(body)
    assert refused.value.reason.startswith(field)


# -- the step on every store --------------------------------------------------------------------------
@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CommandStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "postgres":
        async with PostgresStore(request.getfixturevalue("pg_url"), instance="rollouts") as pg_store:
            yield pg_store
        return
    async with SqliteStore(tmp_path / "bridge.db") as sqlite_store:
        yield sqlite_store


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


async def fleet(store: CommandStore, n: int, manifest: dict[str, Any] | None = None) -> None:
    for i in range(n):
        labels = {"site": "lab"} if i % 2 == 0 else {"site": "hq"}
        await store.add_device(
            Device(
                device_id=f"d{i}",
                app_version="a-v1",
                endpoint_token=f"t{i}",
                labels=labels,
                manifest=None if manifest is None or i != 0 else parse_manifest(manifest),
                created_at=T0,
                updated_at=T0,
            )
        )


async def finish(store: CommandStore, command_id: int, status: int, at: datetime) -> None:
    found = await store.get(command_id)
    assert found is not None
    report = Report(status_code=status, reason_phrase=None, payload=None, received_at=at)
    (outcome,) = await store.report(found.target, [(command_id, report)])
    assert outcome.error is None


async def test_a_rollout_runs_at_its_rate_retries_and_completes(store: CommandStore) -> None:
    """Labels and ids resolve (no device twice); each member gets one command per attempt; the rate
    holds on a fake clock; a retried member gets a second command; counters equal member states."""
    await fleet(store, 6, manifest={"commands": {"other": {}}})  # d0's manifest refuses reboot
    clock = Clock()
    rollouts = RolloutService(CommandService(store, clock=clock))
    s = spec(target={"labels": {"site": "lab"}, "device_ids": ["d1", "d2"]}, rate={"max_per_minute": 60},
             retry={"max_attempts": 2, "on": ["ERROR"]}, timeout_s=30)  # fmt: skip
    preview = await rollouts.create(s.model_copy(update={"dry_run": True}))
    assert isinstance(preview, Preview)
    assert (preview.count, preview.device_ids) == (4, ["d1", "d2", "d0", "d4"])
    made = await rollouts.create(s, invoked_by="ops")
    assert isinstance(made, Rollout)
    assert made.counts == {DeviceState.SENT: 1, DeviceState.QUEUED: 3}  # one at once
    clock.now += timedelta(seconds=1)
    stepped = await rollouts.step(made.id)
    assert stepped is not None
    assert stepped.rollout.counts == {DeviceState.SENT: 2, DeviceState.QUEUED: 2}
    clock.now += timedelta(seconds=2)
    await rollouts.step(made.id)
    members, total = await rollouts.members(made.id, frozenset(), 10, 0)
    assert total == 4
    assert [m.state for m in members] == [DeviceState.SENT, DeviceState.SENT, DeviceState.SKIPPED, DeviceState.SENT]
    commands = {m.device_id: m.command_id for m in members if m.command_id is not None}
    created = await store.get_many(list(commands.values()))
    assert all(c.invoked_by == f"rollout:{made.id}" for c in created)
    assert all(c.expires_at - c.created_at == timedelta(seconds=30) for c in created)
    await finish(store, commands["d1"], 200, clock.now)
    await finish(store, commands["d2"], 500, clock.now)  # retried once
    await finish(store, commands["d4"], 200, clock.now)
    clock.now += timedelta(seconds=1)
    await rollouts.step(made.id)
    members, _ = await rollouts.members(made.id, frozenset(), 10, 0)
    d2 = members[1]
    assert (d2.state, d2.attempt) == (DeviceState.SENT, 2)
    assert d2.command_id != commands["d2"]
    await finish(store, d2.command_id or 0, 500, clock.now)
    clock.now += timedelta(seconds=1)
    await rollouts.step(made.id)
    done = await rollouts.get(made.id)
    assert done.state is RolloutState.COMPLETED
    assert done.counts == {DeviceState.SUCCEEDED: 2, DeviceState.FAILED: 1, DeviceState.SKIPPED: 1}
    members, _ = await rollouts.members(made.id, frozenset(), 10, 0)
    by_state: dict[DeviceState, int] = {}
    for m in members:
        by_state[m.state] = by_state.get(m.state, 0) + 1
    assert by_state == done.counts
    failed, n = await rollouts.members(made.id, frozenset({DeviceState.FAILED}), 10, 0)
    assert ([m.device_id for m in failed], n) == (["d2"], 1)


async def test_abort_cancels_what_is_open_and_pause_resume_cancel(store: CommandStore) -> None:
    """A tripped rule aborts: open commands cancelled, queued members cancelled, nothing more sent;
    pause stops sending (in-flight goes on), resume continues, cancel ends it; wrong moves are 409."""
    await fleet(store, 8)
    clock = Clock()
    rollouts = RolloutService(CommandService(store, clock=clock))
    everyone = {"labels": {}, "device_ids": [f"d{i}" for i in range(8)]}
    aborting = await rollouts.create(
        spec(target=everyone, rate={"max_in_flight": 3}, abort=[{"outcome": "ERROR", "threshold_percent": 50}])
    )
    assert isinstance(aborting, Rollout)
    first, _ = await rollouts.members(aborting.id, frozenset({DeviceState.SENT}), 10, 0)
    await finish(store, first[0].command_id or 0, 500, clock.now)
    clock.now += timedelta(seconds=1)
    await rollouts.step(aborting.id)
    aborted = await rollouts.get(aborting.id)
    assert aborted.state is RolloutState.ABORTED
    assert aborted.aborted_by is not None
    assert aborted.aborted_by.startswith("ERROR 1 of 1")
    assert aborted.counts == {DeviceState.FAILED: 1, DeviceState.CANCELLED: 7}
    for m in first[1:]:
        cancelled = await store.get(m.command_id or 0)
        assert cancelled is not None
        assert cancelled.state is CommandState.CANCELLED
    with pytest.raises(Conflict):
        await rollouts.resume(aborting.id)

    steered = await rollouts.create(spec(target=everyone, rate={"max_per_minute": 60}))
    assert isinstance(steered, Rollout)
    paused = await rollouts.pause(steered.id)
    assert paused.state is RolloutState.PAUSED
    clock.now += timedelta(seconds=30)
    await rollouts.step(steered.id)
    assert (await rollouts.get(steered.id)).counts == {DeviceState.SENT: 1, DeviceState.QUEUED: 7}
    resumed = await rollouts.resume(steered.id)
    assert resumed.state is RolloutState.IN_PROGRESS
    assert resumed.counts == {DeviceState.SENT: 2, DeviceState.QUEUED: 6}  # no burst for the paused time
    cancelled = await rollouts.cancel(steered.id)
    assert (cancelled.state, cancelled.counts) == (RolloutState.CANCELLED, {DeviceState.CANCELLED: 8})
    with pytest.raises(Conflict):
        await rollouts.pause(steered.id)


async def test_unknown_targets_are_refused(store: CommandStore) -> None:
    await fleet(store, 2)
    rollouts = RolloutService(CommandService(store))
    with pytest.raises(Unprocessable, match=r"target\.labels"):
        await rollouts.create(spec(target={"labels": {"site": "moon"}}))
    with pytest.raises(Unprocessable, match=r"target\.device_ids: no device 'nope'"):
        await rollouts.create(spec(target={"device_ids": ["d0", "nope"]}))


def test_start_at_needs_a_timezone() -> None:
    """A start time without a timezone is ambiguous: refused naming the field, not a crash."""
    with pytest.raises(Unprocessable, match=r"^start_at: "):
        spec(start_at="2026-12-05T02:00:00")
    assert spec(start_at="2026-12-05T02:00:00Z").start_at == datetime(2026, 12, 5, 2, tzinfo=UTC)
