"""Fleet rollouts: one command to many devices at a controlled rate, with abort rules. Pure: no I/O.

A rollout is a spec (what to send, to whom, how fast, when to stop) and one row per targeted device.
The store advances it in ``step`` transactions: ``plan`` (here) reads a snapshot of the rollout and
decides what the step does (which finished device commands settle into which state, whether a rule
aborts it, how many queued devices get their command now); the store applies that decision, the new
commands included, in the same transaction. A device's command and its move to ``sent`` therefore
commit together: after a crash (kill -9 included) a step is either wholly done or not at all, and a
device never gets two commands for one attempt.

Rate: ``max_per_minute`` (steady), or AWS IoT Jobs' exponential rollout: ``base_per_minute`` at
first, multiplied by ``factor`` each time ``every`` more devices were sent (or succeeded), up to
``max_per_minute``. What a step may send is what the rate allowed since the current rate began,
plus one, minus what was sent since; ``max_in_flight`` caps the commands open at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from broker_bridge.commands import Command, CommandState, NewCommand
from broker_bridge.devices import Device

MAX_TARGETS = 100_000  # devices in one rollout


class RolloutState(StrEnum):
    SCHEDULED = "scheduled"
    IN_PROGRESS = "in_progress"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    CANCELLED = "cancelled"


ACTIVE = frozenset({RolloutState.SCHEDULED, RolloutState.IN_PROGRESS, RolloutState.PAUSED})
FINISHED = frozenset({RolloutState.COMPLETED, RolloutState.ABORTED, RolloutState.CANCELLED})
# Which states an operator may pause, resume or cancel from (the service refuses the rest: 409),
# so that a page offers only the moves the service will take.
CAN_PAUSE = frozenset({RolloutState.IN_PROGRESS, RolloutState.SCHEDULED})
CAN_RESUME = frozenset({RolloutState.PAUSED})
CAN_CANCEL = ACTIVE


class DeviceState(StrEnum):
    QUEUED = "queued"
    SENT = "sent"  # its command is pending
    IN_PROGRESS = "in_progress"  # its command had a progress report
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"  # deleted, or its manifest refuses the command


IN_FLIGHT = frozenset({DeviceState.SENT, DeviceState.IN_PROGRESS})
DONE = frozenset(
    {DeviceState.SUCCEEDED, DeviceState.FAILED, DeviceState.TIMED_OUT, DeviceState.CANCELLED, DeviceState.SKIPPED}
)


# -- the spec (what POST /v3/rollouts takes; the same body over MQTT and from the CLI) ---------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CommandSpec(_Strict):
    name: str = Field(min_length=1, max_length=128, description="A manifest command name or alias")
    arguments: Any = None
    ttl: float | None = Field(default=None, gt=0, description="Seconds each device's command stays deliverable")


class TargetSpec(_Strict):
    device_ids: list[str] = Field(default_factory=list, max_length=MAX_TARGETS)
    labels: dict[str, str] = Field(default_factory=dict, description="Every one must match")

    @model_validator(mode="after")
    def _some(self) -> TargetSpec:
        if not self.device_ids and not self.labels:
            raise ValueError("give device_ids, labels or both")
        return self


class RampSpec(_Strict):
    base_per_minute: float = Field(gt=0)
    factor: float = Field(gt=1, le=100)
    every: int = Field(gt=0, description="Step the rate up after this many more devices")
    counting: Literal["sent", "succeeded"] = "sent"


class RateSpec(_Strict):
    max_per_minute: float | None = Field(default=None, gt=0, le=1_000_000, description="None: no limit")
    ramp: RampSpec | None = None
    max_in_flight: int | None = Field(default=None, gt=0, description="Open commands of this rollout at once")

    @model_validator(mode="after")
    def _ramp_needs_ceiling(self) -> RateSpec:
        if self.ramp is not None and self.max_per_minute is None:
            raise ValueError("ramp needs max_per_minute, the rate it climbs to")
        if (
            self.ramp is not None
            and self.max_per_minute is not None
            and self.ramp.base_per_minute > self.max_per_minute
        ):
            raise ValueError("ramp.base_per_minute must not exceed max_per_minute")
        return self


class AbortRule(_Strict):
    outcome: Literal["ERROR", "TIMEOUT", "ANY_FAILURE"]
    threshold_percent: float = Field(gt=0, le=100)
    min_executed: int = Field(default=1, gt=0)


class RetrySpec(_Strict):
    max_attempts: int = Field(default=1, ge=1, le=10)
    on: list[Literal["ERROR", "TIMEOUT"]] = Field(default=["ERROR", "TIMEOUT"], min_length=0)


class RolloutSpec(_Strict):
    command: CommandSpec
    target: TargetSpec
    rate: RateSpec = Field(default_factory=RateSpec)
    abort: list[AbortRule] = Field(default_factory=list, max_length=10)
    retry: RetrySpec = Field(default_factory=RetrySpec)
    timeout_s: float | None = Field(default=None, gt=0, description="Per device command (its TTL)")
    start_at: AwareDatetime | None = Field(default=None, description="With a timezone (Z or +hh:mm)")
    dry_run: bool = False

    def command_ttl(self) -> float | None:
        return self.timeout_s if self.timeout_s is not None else self.command.ttl


# -- the rollout as stored ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Pace:
    """Where the rate stands: the current rate (per minute; None: unlimited), since when, and how
    many had been sent (or succeeded, for a ramp counting successes) when it began."""

    per_minute: float | None
    since: datetime
    sent_before: int = 0
    next_step: int | None = None  # the count at which a ramp steps up next


@dataclass(frozen=True, slots=True, kw_only=True)
class Rollout:
    id: int
    spec: RolloutSpec
    state: RolloutState
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    aborted_by: str | None = None  # the rule that tripped, as text
    pace: Pace
    counts: dict[DeviceState, int] = field(default_factory=dict)
    invoked_by: str | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def sent_total(self) -> int:
        """Devices that were sent a command (or are done after one): all but queued and skipped."""
        return self.total - self.counts.get(DeviceState.QUEUED, 0) - self.counts.get(DeviceState.SKIPPED, 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    """One targeted device of a rollout (``position``: its place in the rollout, from 0)."""

    position: int
    device_id: str
    app_version: str
    endpoint_token: str
    state: DeviceState
    attempt: int = 0  # commands sent so far
    command_id: int | None = None  # the latest attempt's
    updated_at: datetime


def draft(spec: RolloutSpec, now: datetime, targets: int, invoked_by: str | None) -> Rollout:
    """A new rollout of ``targets`` queued devices, before the store gives it its id."""
    counts = {DeviceState.QUEUED: targets} if targets else {}
    return Rollout(
        id=0, spec=spec, state=start_state(spec, now), created_at=now, updated_at=now,
        pace=first_pace(spec, now), counts=counts, invoked_by=invoked_by,
    )  # fmt: skip


def first_pace(spec: RolloutSpec, now: datetime) -> Pace:
    ramp = spec.rate.ramp
    if ramp is None:
        return Pace(per_minute=spec.rate.max_per_minute, since=now)
    return Pace(per_minute=ramp.base_per_minute, since=now, next_step=ramp.every)


def start_state(spec: RolloutSpec, now: datetime) -> RolloutState:
    return RolloutState.SCHEDULED if spec.start_at is not None and spec.start_at > now else RolloutState.IN_PROGRESS


# -- one step ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """What a step reads: the rollout, and each in-flight member with its command as stored now."""

    rollout: Rollout
    in_flight: list[tuple[Member, Command | None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What a step does, applied by the store in one transaction."""

    settle: list[tuple[Member, DeviceState]]  # member and its new state (QUEUED: tried again)
    send: int  # how many queued members get their command now (oldest first)
    rollout: Rollout  # the rollout after the step (state, counters before sending, pace)
    cancel_open: bool = False  # aborted: cancel the open commands of the rollout, skip the queued ones


@dataclass(frozen=True, slots=True, kw_only=True)
class Stepped:
    """What a step did: the rollout after it, the commands it created and the ones it cancelled."""

    rollout: Rollout
    created: list[Command]
    cancelled: list[Command]
    settled: int


Decide = Callable[[Snapshot], Plan]
# A member's command, from the rollout's spec and the device as registered now (None: deleted);
# None: the member is skipped.
Build = Callable[[RolloutSpec, Member, Device | None], NewCommand | None]


def outcome_of(command: Command | None) -> DeviceState | None:
    """A member's state from its command; None: still open as it was."""
    if command is None:  # purged or deleted: nothing will come
        return DeviceState.FAILED
    if command.state is CommandState.PENDING:
        return None
    if command.state is CommandState.IN_PROGRESS:
        return DeviceState.IN_PROGRESS
    if command.state is CommandState.EXPIRED:
        return DeviceState.TIMED_OUT
    if command.state is CommandState.CANCELLED:
        return DeviceState.CANCELLED
    return DeviceState.SUCCEEDED if 200 <= (command.status_code or 0) < 300 else DeviceState.FAILED


_RETRY_ON = {"ERROR": DeviceState.FAILED, "TIMEOUT": DeviceState.TIMED_OUT}


def plan(snapshot: Snapshot, now: datetime) -> Plan:
    """Decide one step of an active rollout."""
    rollout = snapshot.rollout
    spec = rollout.spec
    counts = dict(rollout.counts)
    settle: list[tuple[Member, DeviceState]] = []
    retry_on = {_RETRY_ON[o] for o in spec.retry.on}
    for member, command in snapshot.in_flight:
        outcome = outcome_of(command)
        if outcome is None or outcome is member.state:
            continue
        again = outcome in retry_on and member.attempt < spec.retry.max_attempts
        new_state = DeviceState.QUEUED if again else outcome
        settle.append((member, new_state))
        counts[member.state] = counts.get(member.state, 0) - 1
        counts[new_state] = counts.get(new_state, 0) + 1
    counts = {s: n for s, n in counts.items() if n}
    rollout = replace(rollout, counts=counts, updated_at=now if settle else rollout.updated_at)
    if rollout.state is RolloutState.SCHEDULED:
        if spec.start_at is not None and spec.start_at > now:
            return Plan(settle=settle, send=0, rollout=rollout)
        rollout = replace(
            rollout, state=RolloutState.IN_PROGRESS, pace=replace(rollout.pace, since=now), updated_at=now
        )
    if (tripped := tripped_rule(spec.abort, counts)) is not None:
        aborted = replace(rollout, state=RolloutState.ABORTED, aborted_by=tripped, finished_at=now, updated_at=now)
        return Plan(settle=settle, send=0, rollout=aborted, cancel_open=True)
    if rollout.started_at is None:
        rollout = replace(rollout, started_at=now, updated_at=now)
    if rollout.state is RolloutState.PAUSED:
        return Plan(settle=settle, send=0, rollout=rollout)
    rollout = replace(rollout, pace=ramp_up(spec, rollout.pace, counts, now))
    send = allowance(spec, rollout.pace, counts, now)
    if send == 0 and not counts.get(DeviceState.QUEUED) and not any(counts.get(s) for s in IN_FLIGHT):
        rollout = replace(rollout, state=RolloutState.COMPLETED, finished_at=now, updated_at=now)
    return Plan(settle=settle, send=send, rollout=rollout)


def counted(rollout: Rollout, *, sent: int, skipped: int, now: datetime) -> Rollout:
    """The rollout after a step sent ``sent`` queued members their command and skipped ``skipped``."""
    if not (sent or skipped):
        return rollout
    counts = dict(rollout.counts)
    counts[DeviceState.QUEUED] = counts.get(DeviceState.QUEUED, 0) - sent - skipped
    counts[DeviceState.SENT] = counts.get(DeviceState.SENT, 0) + sent
    counts[DeviceState.SKIPPED] = counts.get(DeviceState.SKIPPED, 0) + skipped
    return replace(rollout, counts={s: n for s, n in counts.items() if n}, updated_at=now)


def allowance(spec: RolloutSpec, pace: Pace, counts: dict[DeviceState, int], now: datetime) -> int:
    """How many queued members may be sent a command now."""
    queued = counts.get(DeviceState.QUEUED, 0)
    in_flight = sum(counts.get(s, 0) for s in IN_FLIGHT)
    room = queued
    if spec.rate.max_in_flight is not None:
        room = min(room, max(0, spec.rate.max_in_flight - in_flight))
    if pace.per_minute is not None:
        elapsed_min = max(0.0, (now - pace.since).total_seconds()) / 60
        allowed = math.floor(pace.per_minute * elapsed_min + 1e-9) + 1  # the first one at once
        room = min(room, max(0, pace.sent_before + allowed - attempts_sent(counts)))
    return max(0, room)


def attempts_sent(counts: dict[DeviceState, int]) -> int:
    """Members past queued (sent, open or done after a command), as the rate counts them."""
    return sum(n for s, n in counts.items() if s not in (DeviceState.QUEUED, DeviceState.SKIPPED))


def ramp_up(spec: RolloutSpec, pace: Pace, counts: dict[DeviceState, int], now: datetime) -> Pace:
    """The pace after a ramp's step(s): each ``every`` more devices multiplies the rate by ``factor``."""
    ramp = spec.rate.ramp
    if ramp is None or pace.next_step is None or spec.rate.max_per_minute is None:
        return pace
    reached = counts.get(DeviceState.SUCCEEDED, 0) if ramp.counting == "succeeded" else attempts_sent(counts)
    per_minute, next_step = pace.per_minute or ramp.base_per_minute, pace.next_step
    if reached < next_step:
        return pace
    while reached >= next_step and per_minute < spec.rate.max_per_minute:
        per_minute = min(spec.rate.max_per_minute, per_minute * ramp.factor)
        next_step += ramp.every
    return Pace(per_minute=per_minute, since=now, sent_before=attempts_sent(counts), next_step=next_step)


def tripped_rule(rules: list[AbortRule], counts: dict[DeviceState, int]) -> str | None:
    """The first abort rule the outcomes so far break, as text; None if none does."""
    failed, timed_out = counts.get(DeviceState.FAILED, 0), counts.get(DeviceState.TIMED_OUT, 0)
    executed = counts.get(DeviceState.SUCCEEDED, 0) + failed + timed_out
    for rule in rules:
        bad = {"ERROR": failed, "TIMEOUT": timed_out, "ANY_FAILURE": failed + timed_out}[rule.outcome]
        if executed >= rule.min_executed and bad * 100 >= rule.threshold_percent * executed:
            return (
                f"{rule.outcome} {bad} of {executed} executed ({bad * 100 / executed:.1f}%) >= "
                f"{rule.threshold_percent:g}% (min_executed {rule.min_executed})"
            )
    return None


# -- the record (HTTP, events, CLI --json) ------------------------------------------------------------
def to_record(rollout: Rollout) -> dict[str, Any]:
    from broker_bridge.commands import rfc3339

    def when(moment: datetime | None) -> str | None:
        return None if moment is None else rfc3339(moment)

    return {
        "id": rollout.id,
        "state": rollout.state.value,
        "command": rollout.spec.command.model_dump(),
        "target": rollout.spec.target.model_dump(),
        "rate": rollout.spec.rate.model_dump(),
        "abort": [rule.model_dump() for rule in rollout.spec.abort],
        "retry": rollout.spec.retry.model_dump(),
        "timeout_s": rollout.spec.timeout_s,
        "start_at": when(rollout.spec.start_at),
        "counts": {s.value: rollout.counts.get(s, 0) for s in DeviceState},
        "total": rollout.total,
        "rate_per_minute_now": rollout.pace.per_minute,
        "created_at": when(rollout.created_at),
        "updated_at": when(rollout.updated_at),
        "started_at": when(rollout.started_at),
        "finished_at": when(rollout.finished_at),
        "aborted_by": rollout.aborted_by,
        "invoked_by": rollout.invoked_by,
    }


def member_record(member: Member) -> dict[str, Any]:
    from broker_bridge.commands import rfc3339

    return {
        "device_id": member.device_id,
        "app_version": member.app_version,
        "endpoint_token": member.endpoint_token,
        "state": member.state.value,
        "attempt": member.attempt,
        "command_id": member.command_id,
        "updated_at": rfc3339(member.updated_at),
    }
