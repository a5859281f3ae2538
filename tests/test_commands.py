"""The command state machine and its record: pure functions, time passed in."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_bridge.commands import (
    FINAL_STATES,
    MAX_LOG_BYTES,
    MAX_LOG_ENTRIES,
    OPEN_STATES,
    TRANSITIONS,
    Command,
    CommandState,
    NewCommand,
    Report,
    apply_report,
    cancel,
    create,
    delivery_item,
    expire,
    expires_at,
    log_late_report,
    report_record,
    rfc3339,
    to_record,
)
from broker_bridge.errors import CommandFinished, PayloadTooLarge
from broker_bridge.store.base import resolve_report
from broker_bridge.topics import Target

T0 = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
TTL = timedelta(seconds=60)
REBOOT = Target(app_version="app-v1", endpoint_token="dev1", command_type="reboot")
RECORD_KEYS = {
    "id", "appVersion", "endpointToken", "commandType", "payload", "state", "statusCode", "reasonPhrase",
    "resultPayload", "createdAt", "updatedAt", "expiresAt", "rerunOf", "invokedBy", "deviceSeen", "sentAt",
    "deliveredAt",
    "log",
}  # fmt: skip


def pending(payload: object = None, command_id: int = 7) -> Command:
    return create(NewCommand(target=REBOOT, payload=payload, created_at=T0, expires_at=T0 + TTL), command_id)


def report(code: int, after_s: float = 1, reason: str | None = "R", payload: object = "ok") -> Report:
    return Report(status_code=code, reason_phrase=reason, payload=payload, received_at=T0 + timedelta(seconds=after_s))


def in_state(state: CommandState) -> Command:
    return dataclasses.replace(pending(), state=state)


# -- the transition table ----------------------------------------------------------------------
def test_transition_table_covers_every_state() -> None:
    """Every state has an entry; open and final states partition the enum."""
    assert set(TRANSITIONS) == set(CommandState)
    assert set(CommandState) == OPEN_STATES | FINAL_STATES
    assert not OPEN_STATES & FINAL_STATES


@pytest.mark.parametrize("state", sorted(FINAL_STATES))
def test_no_move_out_of_final_states(state: CommandState) -> None:
    """Nothing resurrects a finished command."""
    assert TRANSITIONS[state] == frozenset()


@pytest.mark.parametrize("state", sorted(OPEN_STATES))
def test_open_states_can_reach_every_final_state(state: CommandState) -> None:
    """An open command can still be executed, expired or cancelled, and never goes back to pending."""
    assert TRANSITIONS[state] >= FINAL_STATES
    assert CommandState.PENDING not in TRANSITIONS[state]


def test_create_is_pending() -> None:
    """A new command is pending, has no result and was last updated when created."""
    command = pending(payload={"delay": 5})
    assert command.state is CommandState.PENDING
    assert command.id == 7
    assert command.payload == {"delay": 5}
    assert (command.status_code, command.reason_phrase, command.result_payload) == (None, None, None)
    assert command.created_at == command.updated_at == T0
    assert command.expires_at == T0 + TTL
    assert command.log == ()
    assert command.is_open


# -- device reports ----------------------------------------------------------------------------
@pytest.mark.parametrize("code", [100, 102, 150, 199])
def test_progress_report_moves_to_in_progress(code: int) -> None:
    """A 1xx report marks progress, logs the report and sets no result."""
    progress = report(code, payload={"pct": 50})
    command = apply_report(pending(), progress)
    assert command.state is CommandState.IN_PROGRESS
    assert command.log == (progress,)
    assert command.updated_at == progress.received_at
    assert (command.status_code, command.reason_phrase, command.result_payload) == (None, None, None)
    assert command.is_open


def test_repeated_progress_reports_append_to_log() -> None:
    """In-progress commands accept further progress reports and keep them in order."""
    first, second = report(102, 1), report(102, 2)
    command = apply_report(apply_report(pending(), first), second)
    assert command.state is CommandState.IN_PROGRESS
    assert command.log == (first, second)
    assert command.updated_at == second.received_at


@pytest.mark.parametrize("code", [200, 202, 299, 300, 404, 409, 500, 503, 599])
@pytest.mark.parametrize("start", sorted(OPEN_STATES))
def test_final_report_executes(code: int, start: CommandState) -> None:
    """Any 2xx-5xx report executes the command with its status, reason and payload."""
    final = report(code, reason="Done", payload={"out": [1, 2]})
    command = apply_report(in_state(start), final)
    assert command.state is CommandState.EXECUTED
    assert command.status_code == code
    assert command.reason_phrase == "Done"
    assert command.result_payload == {"out": [1, 2]}
    assert command.updated_at == final.received_at
    assert command.log[-1] == final
    assert not command.is_open


def test_progress_then_final_keeps_whole_log() -> None:
    """The log keeps progress reports before the final one."""
    progress, final = report(102, 1), report(200, 2, payload=None)
    command = apply_report(apply_report(pending(), progress), final)
    assert command.log == (progress, final)
    assert command.result_payload is None


def test_report_is_final_boundary() -> None:
    """199 is progress, 200 is final."""
    assert not report(199).is_final
    assert report(200).is_final


@pytest.mark.parametrize("state", sorted(FINAL_STATES))
@pytest.mark.parametrize("code", [102, 200, 500])
def test_report_on_finished_command_raises(state: CommandState, code: int) -> None:
    """Finished commands take no reports; the reason names the state."""
    with pytest.raises(CommandFinished) as info:
        apply_report(in_state(state), report(code))
    assert state.value in info.value.reason
    assert info.value.status_code == 409


@pytest.mark.parametrize("start", sorted(OPEN_STATES))
@pytest.mark.parametrize("after", [timedelta(0), timedelta(microseconds=1), timedelta(days=1)])
@pytest.mark.parametrize("code", [102, 200])
def test_report_at_or_after_expiry_raises(start: CommandState, after: timedelta, code: int) -> None:
    """A report received at or after expires_at is refused as finished, naming the expiry."""
    late = Report(status_code=code, reason_phrase=None, payload=None, received_at=T0 + TTL + after)
    with pytest.raises(CommandFinished) as info:
        apply_report(in_state(start), late)
    assert "expired" in info.value.reason
    assert rfc3339(T0 + TTL) in info.value.reason


def test_report_just_before_expiry_is_accepted() -> None:
    """One microsecond before expires_at a report still counts."""
    moment = T0 + TTL - timedelta(microseconds=1)
    just_in_time = Report(status_code=200, reason_phrase=None, payload=None, received_at=moment)
    assert apply_report(pending(), just_in_time).state is CommandState.EXECUTED


def test_apply_report_does_not_mutate_input() -> None:
    """Commands are immutable values; apply_report returns a new one."""
    original = pending()
    apply_report(original, report(200))
    assert original == pending()


def test_log_late_report_keeps_state() -> None:
    """A late report is logged on an expired command; only the log, updatedAt and the proof of
    delivery change (the device had it, late)."""
    expired = expire(pending(), T0 + TTL)
    late = report(200, after_s=120)
    logged = log_late_report(expired, late)
    assert logged.log == (late,)
    assert logged.updated_at == late.received_at
    assert logged.delivered_at == logged.sent_at == late.received_at
    unchanged = dataclasses.replace(logged, log=(), updated_at=expired.updated_at, sent_at=None, delivered_at=None)
    assert unchanged == expired


def test_report_proves_delivery_once() -> None:
    """The first report sets deliveredAt (and sentAt when no push proved it earlier); later ones
    keep the first proof."""
    sent = dataclasses.replace(pending(), sent_at=T0 + timedelta(seconds=1))
    progress = apply_report(sent, report(102, after_s=5))
    assert progress.sent_at == T0 + timedelta(seconds=1)
    assert progress.delivered_at == progress.log[0].received_at
    final = apply_report(progress, report(200, after_s=9))
    assert (final.sent_at, final.delivered_at) == (progress.sent_at, progress.delivered_at)
    unsent = apply_report(pending(), report(200, after_s=3))
    assert unsent.sent_at == unsent.delivered_at == unsent.log[0].received_at


# -- expire and cancel -------------------------------------------------------------------------
@pytest.mark.parametrize("start", sorted(OPEN_STATES))
def test_expire_open_command(start: CommandState) -> None:
    """An open command expires at the given time and keeps no result."""
    now = T0 + TTL
    command = expire(in_state(start), now)
    assert command.state is CommandState.EXPIRED
    assert command.updated_at == now
    assert command.status_code is None


@pytest.mark.parametrize("start", sorted(OPEN_STATES))
def test_cancel_open_command(start: CommandState) -> None:
    """An open command can be cancelled at any time."""
    now = T0 + timedelta(seconds=3)
    command = cancel(in_state(start), now)
    assert command.state is CommandState.CANCELLED
    assert command.updated_at == now


@pytest.mark.parametrize("state", sorted(FINAL_STATES))
def test_cancel_and_expire_of_finished_raise(state: CommandState) -> None:
    """Neither cancel nor expire touches a finished command."""
    finished = in_state(state)
    with pytest.raises(CommandFinished, match=state.value):
        cancel(finished, T0)
    with pytest.raises(CommandFinished, match=state.value):
        expire(finished, T0)


def test_cancel_of_executed_raises() -> None:
    """An executed command cannot be cancelled."""
    executed = apply_report(pending(), report(200))
    with pytest.raises(CommandFinished, match="already executed"):
        cancel(executed, T0 + timedelta(seconds=2))


def test_is_due() -> None:
    """Open commands are due from expires_at on; finished ones never are."""
    command = pending()
    assert not command.is_due(T0 + TTL - timedelta(microseconds=1))
    assert command.is_due(T0 + TTL)
    assert command.is_due(T0 + TTL * 2)
    assert not in_state(CommandState.EXECUTED).is_due(T0 + TTL * 2)


def test_expires_at_adds_ttl_seconds() -> None:
    """expires_at is now plus the TTL in seconds, fractions included."""
    assert expires_at(T0, 60) == T0 + TTL
    assert expires_at(T0, 0.5) == T0 + timedelta(milliseconds=500)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("report"), st.integers(min_value=100, max_value=599)),
        st.tuples(st.just("expire"), st.just(0)),
        st.tuples(st.just("cancel"), st.just(0)),
    ),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(ops=OPS)
def test_final_states_are_absorbing(ops: list[tuple[str, int]]) -> None:
    """Whatever sequence of reports, expiries and cancels arrives, a finished command never changes."""
    command = pending()
    for step, (op, code) in enumerate(ops, start=1):
        now = T0 + timedelta(seconds=step)
        was = command
        try:
            if op == "report":
                received = Report(status_code=code, reason_phrase=None, payload=step, received_at=now)
                command = apply_report(command, received)
            elif op == "expire":
                command = expire(command, now)
            else:
                command = cancel(command, now)
        except CommandFinished:
            assert was.state in FINAL_STATES
            assert command is was
            continue
        assert was.state in OPEN_STATES
        assert command.state in TRANSITIONS[was.state]
        assert command.updated_at == now


# -- the record --------------------------------------------------------------------------------
def test_to_record_has_exactly_the_documented_keys() -> None:
    """The record is the same JSON shape everywhere; no key more or less."""
    assert set(to_record(pending())) == RECORD_KEYS


def test_to_record_values() -> None:
    """The record carries the target, payload, state and result of the command."""
    progress, final = report(102, 1, reason=None, payload=None), report(200, 2, reason="OK", payload="Success")
    record = to_record(apply_report(apply_report(pending(payload={"a": 1}), progress), final))
    assert record["id"] == 7
    assert (record["appVersion"], record["endpointToken"], record["commandType"]) == ("app-v1", "dev1", "reboot")
    assert record["payload"] == {"a": 1}
    assert record["state"] == "executed"
    assert (record["statusCode"], record["reasonPhrase"], record["resultPayload"]) == (200, "OK", "Success")
    assert record["createdAt"] == "2026-01-01T12:00:00.123Z"
    assert record["updatedAt"] == "2026-01-01T12:00:02.123Z"
    assert record["expiresAt"] == "2026-01-01T12:01:00.123Z"
    assert record["log"] == [report_record(progress), report_record(final)]


def test_to_record_of_pending_has_null_result() -> None:
    """A pending command's record has null result fields and an empty log."""
    record = to_record(pending())
    assert record["state"] == "pending"
    assert (record["statusCode"], record["reasonPhrase"], record["resultPayload"]) == (None, None, None)
    assert record["log"] == []


def test_record_timestamps_are_rfc3339_utc() -> None:
    """Every timestamp ends with Z and parses back with datetime.fromisoformat to the millisecond."""
    record = to_record(apply_report(pending(), report(102, 1.5)))
    stamps = [record["createdAt"], record["updatedAt"], record["expiresAt"], record["log"][0]["receivedAt"]]
    for stamp in stamps:
        assert stamp.endswith("Z")
        parsed = datetime.fromisoformat(stamp)
        assert parsed.utcoffset() == timedelta(0)
    assert datetime.fromisoformat(record["createdAt"]) == T0.replace(microsecond=123000)
    received = datetime.fromisoformat(record["log"][0]["receivedAt"])
    assert received == T0.replace(microsecond=623000) + timedelta(seconds=1)


def test_report_record_keys() -> None:
    """A log entry names status, reason, payload and receipt time."""
    assert report_record(report(102, payload=[1])) == {
        "statusCode": 102,
        "reasonPhrase": "R",
        "payload": [1],
        "receivedAt": "2026-01-01T12:00:01.123Z",
    }


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (datetime(2026, 1, 1, 14, 0, 0, 999999, tzinfo=timezone(timedelta(hours=2))), "2026-01-01T12:00:00.999Z"),
        (datetime(2026, 1, 1, 7, 30, tzinfo=timezone(timedelta(hours=-5, minutes=-30))), "2026-01-01T13:00:00.000Z"),
        (datetime(2026, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))), "2025-12-31T23:30:00.000Z"),
        (datetime(2026, 1, 1, 12, 0, tzinfo=UTC), "2026-01-01T12:00:00.000Z"),
    ],
)
def test_rfc3339_converts_to_utc(moment: datetime, expected: str) -> None:
    """Aware datetimes in any zone are written in UTC with milliseconds and a Z."""
    assert rfc3339(moment) == expected
    assert datetime.fromisoformat(expected) == moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def test_delivery_item() -> None:
    """Devices see only id and payload of an outstanding command."""
    assert delivery_item(pending(payload={"delay": 5})) == {"id": 7, "payload": {"delay": 5}}


def test_a_commands_log_is_bounded_but_its_final_result_always_lands() -> None:
    """Progress reports past MAX_LOG_ENTRIES, or past MAX_LOG_BYTES of payload, are refused with a
    413 naming the command; the final result is taken all the same."""
    command = pending()
    for n in range(MAX_LOG_ENTRIES):
        command = apply_report(command, report(102, after_s=1 + n / 1000, payload=n))
    with pytest.raises(PayloadTooLarge, match="already has 100 reports"):
        apply_report(command, report(102, after_s=2))
    done = apply_report(command, report(200, after_s=2))
    assert (done.state, len(done.log)) == (CommandState.EXECUTED, MAX_LOG_ENTRIES + 1)
    big = "x" * (MAX_LOG_BYTES // 2)
    halfway = apply_report(pending(), report(102, payload=big))
    with pytest.raises(PayloadTooLarge, match="would exceed"):
        apply_report(halfway, report(102, after_s=2, payload=big))
    outcome = resolve_report(halfway, halfway.target, halfway.id, report(102, after_s=2, payload=big))
    assert outcome.error is not None
    assert (outcome.error.status_code, outcome.changed) == (413, False)
