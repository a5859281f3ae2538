"""An in-memory store: the reference implementation of the contract, for tests and experiments."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime

from broker_bridge import commands
from broker_bridge.commands import Command, CommandState, NewCommand, Report
from broker_bridge.delivery import window as delivery_window
from broker_bridge.devices import Device
from broker_bridge.errors import Conflict, DeviceNotFound, RolloutNotFound
from broker_bridge.rollouts import ACTIVE as ACTIVE_ROLLOUT_STATES
from broker_bridge.rollouts import (
    IN_FLIGHT,
    Build,
    Decide,
    DeviceState,
    Member,
    Rollout,
    Snapshot,
    Stepped,
    counted,
)
from broker_bridge.store.base import (
    EXPIRE_WINDOW,
    CommandQuery,
    Created,
    Delivery,
    OpenSummary,
    Polled,
    ReportOutcome,
    check_cancel,
    check_open_limit,
    matches,
    resolve_report,
)
from broker_bridge.topics import Format, Target


class MemoryRollouts:
    """The rollout half of ``MemoryStore``: the reference semantics of ``step_rollout``."""

    _commands: dict[int, Command]
    _devices: dict[str, Device]

    def __init__(self) -> None:
        self._rollouts: dict[int, Rollout] = {}
        self._members: dict[int, list[Member]] = {}

    def _put(self, command: Command) -> None:
        raise NotImplementedError

    async def create(self, new: NewCommand) -> Command:
        raise NotImplementedError

    async def create_rollout(self, draft: Rollout, members: Sequence[tuple[str, str, str]]) -> Rollout:
        rollout = dataclasses.replace(draft, id=len(self._rollouts) + 1)
        self._rollouts[rollout.id] = rollout
        self._members[rollout.id] = [
            Member(
                position=n, device_id=d, app_version=av, endpoint_token=t, state=DeviceState.QUEUED,
                updated_at=draft.created_at,
            )
            for n, (d, av, t) in enumerate(members)
        ]  # fmt: skip
        return rollout

    async def get_rollout(self, rollout_id: int) -> Rollout | None:
        return self._rollouts.get(rollout_id)

    async def rollouts(self, limit: int, offset: int) -> tuple[list[Rollout], int]:
        newest = sorted(self._rollouts.values(), key=lambda r: -r.id)
        return newest[offset : offset + limit], len(newest)

    async def rollout_members(
        self, rollout_id: int, states: frozenset[DeviceState], limit: int, offset: int
    ) -> tuple[list[Member], int]:
        found = [m for m in self._members.get(rollout_id, []) if not states or m.state in states]
        return found[offset : offset + limit], len(found)

    async def active_rollouts(self) -> list[int]:
        return sorted(i for i, r in self._rollouts.items() if r.state in ACTIVE_ROLLOUT_STATES)

    async def step_rollout(
        self, rollout_id: int, now: datetime, decide: Decide, build: Build, *, wait: bool = True
    ) -> Stepped | None:
        rollout = self._rollouts.get(rollout_id)
        if rollout is None:
            raise RolloutNotFound(f"no rollout {rollout_id}")
        members = self._members[rollout_id]
        # Every in-flight member: plan passes over those whose command still matches them (the SQL
        # stores leave those out of the read, CHANGED_IN_FLIGHT).
        in_flight = [
            (m, self._commands.get(m.command_id) if m.command_id is not None else None)
            for m in members
            if m.state in IN_FLIGHT
        ]
        plan = decide(Snapshot(rollout=rollout, in_flight=in_flight))
        for member, state in plan.settle:
            members[member.position] = dataclasses.replace(members[member.position], state=state, updated_at=now)
        created: list[Command] = []
        cancelled: list[Command] = []
        after = plan.rollout
        if plan.cancel_open:
            for n, member in enumerate(members):
                if member.state in IN_FLIGHT and member.command_id is not None:
                    current = self._commands.get(member.command_id)
                    if current is not None and current.is_open:
                        done = commands.cancel(current, now)
                        self._put(done)
                        cancelled.append(done)
                if member.state in IN_FLIGHT or member.state is DeviceState.QUEUED:
                    members[n] = dataclasses.replace(member, state=DeviceState.CANCELLED, updated_at=now)
            counts: dict[DeviceState, int] = {}
            for member in members:
                counts[member.state] = counts.get(member.state, 0) + 1
            after = dataclasses.replace(after, counts=counts)
        elif plan.send:
            sent = skipped = 0
            for member in [m for m in members if m.state is DeviceState.QUEUED][: plan.send]:
                new = build(rollout.spec, member, self._devices.get(member.device_id))
                if new is None:
                    members[member.position] = dataclasses.replace(member, state=DeviceState.SKIPPED, updated_at=now)
                    skipped += 1
                    continue
                command = await self.create(new)
                created.append(command)
                members[member.position] = dataclasses.replace(
                    member, state=DeviceState.SENT, attempt=member.attempt + 1, command_id=command.id, updated_at=now
                )
                sent += 1
            after = counted(after, sent=sent, skipped=skipped, now=now)
        self._rollouts[rollout_id] = after
        return Stepped(rollout=after, created=created, cancelled=cancelled, settled=len(plan.settle))


class MemoryStore(MemoryRollouts):
    """Keeps everything in dicts; nothing survives the process."""

    def __init__(self) -> None:
        super().__init__()
        self._commands: dict[int, Command] = {}
        self._next_id = 1
        self._observers: dict[Target, tuple[bool, Format]] = {}
        self._retained: dict[Target, Format] = {}  # target -> the format whose topic holds its list
        self._devices: dict[str, Device] = {}
        self._unannounced: dict[int, datetime] = {}  # command id -> updated_at of the unannounced change

    def _put(self, command: Command) -> None:
        self._commands[command.id] = command
        self._unannounced[command.id] = command.updated_at

    async def mark_announced(self, announced: Sequence[tuple[int, datetime]]) -> None:
        for command_id, updated_at in announced:
            if self._unannounced.get(command_id) == updated_at:
                del self._unannounced[command_id]

    async def unannounced(self, after_id: int, limit: int) -> list[Command]:
        ids = sorted(i for i in self._unannounced if i > after_id and i in self._commands)[:limit]
        return [self._commands[i] for i in ids]

    async def create(self, new: NewCommand) -> Command:
        if new.idempotency_key is not None and await self.find_idempotent(new.target, new.idempotency_key):
            raise Conflict(f"idempotency key {new.idempotency_key!r} is already used")
        command = commands.create(new, self._next_id)
        self._next_id += 1
        self._put(command)
        return command

    async def submit(
        self,
        new: NewCommand,
        *,
        max_open: int,
        mark_retained: bool,
        with_delivery: bool = True,
        window: int | None = None,
    ) -> Created:
        if new.idempotency_key is not None and (found := await self.find_idempotent(new.target, new.idempotency_key)):
            return Created(command=found, created=False, delivery=None)
        endpoint = (new.target.app_version, new.target.endpoint_token)
        open_count = sum(1 for c in self._commands.values() if c.is_open and _endpoint(c.target) == endpoint)
        check_open_limit(open_count, max_open, new.target)
        command = await self.create(new)
        if mark_retained and self._observes(new.target) and new.target not in self._retained:
            self._retained[new.target] = self._format(new.target)
        if not with_delivery:
            return Created(command=command, created=True, delivery=None)
        return Created(command=command, created=True, delivery=self._delivery(new.target, new.created_at, window))

    async def find_idempotent(self, target: Target, key: str) -> Command | None:
        found = (c for c in self._commands.values() if c.idempotency_key == key and _same_endpoint(c.target, target))
        return next(found, None)

    async def get(self, command_id: int) -> Command | None:
        return self._commands.get(command_id)

    def _select(self, query: CommandQuery) -> list[Command]:
        found = [c for c in self._commands.values() if matches(c, query)]
        return sorted(found, key=lambda c: c.id, reverse=not query.oldest_first)

    async def history(self, query: CommandQuery) -> list[Command]:
        return self._select(query)[query.offset : query.offset + query.limit]

    async def count(self, query: CommandQuery) -> int:
        return len(self._select(query))

    async def report(self, target: Target, reports: Sequence[tuple[int, Report]]) -> list[ReportOutcome]:
        outcomes = []
        for command_id, report in reports:
            outcome = resolve_report(self._commands.get(command_id), target, command_id, report)
            if outcome.changed and outcome.command is not None:
                self._put(outcome.command)
            outcomes.append(outcome)
        return outcomes

    async def cancel(self, command_id: int, now: datetime, target: Target | None = None) -> Command:
        current = check_cancel(self._commands.get(command_id), command_id, target)
        cancelled = commands.cancel(current, now)
        self._put(cancelled)
        return cancelled

    def _outstanding(self, target: Target, now: datetime, window: int | None) -> tuple[Command, ...]:
        found = (c for c in self._commands.values() if c.target == target and c.is_open and not c.is_due(now))
        return delivery_window(sorted(found, key=lambda c: c.id), window)

    async def poll(
        self, target: Target, now: datetime, observe: bool | None, fmt: Format, window: int | None = None
    ) -> Polled:
        self._observers[target] = (self._observes(target) if observe is None else observe, fmt)
        moved = self._retained.get(target) not in (None, fmt)
        return Polled(commands=self._outstanding(target, now, window), moved=moved)

    async def delivery(self, target: Target, now: datetime, window: int | None = None) -> Delivery:
        return self._delivery(target, now, window)

    async def deliveries(self, targets: Sequence[Target], now: datetime, window: int | None = None) -> list[Delivery]:
        return [self._delivery(target, now, window) for target in targets]

    def _observes(self, target: Target) -> bool:
        return self._observers.get(target, (True, Format.PLAIN))[0]

    def _format(self, target: Target) -> Format:
        return self._observers.get(target, (True, Format.PLAIN))[1]

    def _delivery(self, target: Target, now: datetime, window: int | None = None) -> Delivery:
        observe, fmt = self._observers.get(target, (True, Format.PLAIN))
        outstanding = self._outstanding(target, now, window)
        return Delivery(
            target=target,
            observe=observe,
            format=fmt,
            commands=outstanding,
            retained_format=self._retained.get(target),
        )

    async def mark_retained_many(self, marks: Sequence[tuple[Target, bool, Format | None]]) -> None:
        for target, retained, fmt in marks:
            await self.mark_retained(target, retained, fmt)

    async def mark_retained(self, target: Target, retained: bool, fmt: Format | None = None) -> None:
        if retained:
            self._retained[target] = self._format(target) if fmt is None else fmt
        elif not self._observes(target) or not any(c.target == target and c.is_open for c in self._commands.values()):
            self._retained.pop(target, None)

    async def retained_targets(self) -> list[Target]:
        return sorted(self._retained, key=lambda t: (t.app_version, t.endpoint_token, t.command_type))

    async def open_targets(self, now: datetime, app_version: str, endpoint_token: str) -> list[Target]:
        return [
            t
            for t in await self.all_open_targets(now)
            if (t.app_version, t.endpoint_token) == (app_version, endpoint_token)
        ]

    async def all_open_targets(self, now: datetime) -> list[Target]:
        targets = {c.target for c in self._commands.values() if c.is_open and not c.is_due(now)}
        return sorted(targets, key=lambda t: (t.app_version, t.endpoint_token, t.command_type))

    async def expire_due(self, now: datetime, limit: int) -> list[tuple[int, Target]]:
        due = sorted((c for c in self._commands.values() if c.is_due(now)), key=lambda c: c.expires_at)
        window = sorted(due[: limit * EXPIRE_WINDOW], key=lambda c: c.id)
        expired = [commands.expire(c, now) for c in window[:limit]]
        for command in expired:
            self._put(command)
        return [(c.id, c.target) for c in expired]

    async def get_many(self, command_ids: Sequence[int]) -> list[Command]:
        return [self._commands[i] for i in sorted(set(command_ids)) if i in self._commands]

    async def purge_finished(self, before: datetime, limit: int) -> int:
        old = [c.id for c in self._commands.values() if not c.is_open and c.updated_at < before][:limit]
        for command_id in old:
            del self._commands[command_id]
        return len(old)

    async def purge_ephemeral(self, before: datetime, limit: int) -> int:
        old = [c.id for c in self._commands.values() if c.ephemeral and c.created_at < before][:limit]
        for command_id in old:
            del self._commands[command_id]
        return len(old)

    async def check_writable(self, now: datetime) -> None:
        pass  # memory always takes a write

    # -- the device registry --------------------------------------------------------------------
    def _check_free(self, device: Device) -> None:
        for other in self._devices.values():
            same_endpoint = (other.app_version, other.endpoint_token) == (device.app_version, device.endpoint_token)
            if same_endpoint and other.device_id != device.device_id:
                raise Conflict(f"endpoint {device.endpoint_token!r} is already registered as {other.device_id!r}")

    async def add_device(self, device: Device) -> Device:
        if device.device_id in self._devices:
            raise Conflict(f"device {device.device_id!r} already exists")
        self._check_free(device)
        self._devices[device.device_id] = device
        return device

    async def replace_device(self, device: Device) -> Device:
        if (existing := self._devices.get(device.device_id)) is None:
            raise DeviceNotFound(f"no device {device.device_id!r}")
        self._check_free(device)
        # As in the SQL stores: an edit leaves the last-seen time and presence as they are.
        self._devices[device.device_id] = dataclasses.replace(
            device,
            last_seen_at=existing.last_seen_at,
            connected=existing.connected,
            connected_at=existing.connected_at,
            disconnected_at=existing.disconnected_at,
        )
        return device

    async def get_device(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    async def device_for(self, app_version: str, endpoint_token: str) -> Device | None:
        wanted = (app_version, endpoint_token)
        return next((d for d in self._devices.values() if (d.app_version, d.endpoint_token) == wanted), None)

    async def devices(
        self, limit: int, offset: int, labels: Mapping[str, str] | None = None, connected: bool | None = None
    ) -> list[Device]:
        ordered = sorted(self._labelled(labels, connected), key=lambda d: (d.created_at, d.device_id))
        return ordered[offset : offset + limit]

    async def count_devices(self, labels: Mapping[str, str] | None = None, connected: bool | None = None) -> int:
        return len(self._labelled(labels, connected))

    def _labelled(self, labels: Mapping[str, str] | None, connected: bool | None) -> list[Device]:
        wanted = (labels or {}).items()
        return [
            d
            for d in self._devices.values()
            if all(d.labels.get(k) == v for k, v in wanted) and (connected is None or d.connected is connected)
        ]

    async def delete_device(self, device_id: str) -> bool:
        return self._devices.pop(device_id, None) is not None

    async def open_summary(self) -> OpenSummary:
        counts: dict[tuple[str, str], int] = {}
        for c in self._commands.values():
            if c.is_open:
                key = (c.state.value, c.target.command_type)
                counts[key] = counts.get(key, 0) + 1
        pending = [c.created_at for c in self._commands.values() if c.state is CommandState.PENDING]
        return OpenSummary(counts=counts, oldest_pending=min(pending) if pending else None)

    async def mark_seen(self, seen: Sequence[tuple[str, str, datetime]]) -> None:
        for app_version, endpoint_token, at in seen:
            device = await self.device_for(app_version, endpoint_token)
            if device is not None and (device.last_seen_at is None or device.last_seen_at < at):
                self._devices[device.device_id] = dataclasses.replace(device, last_seen_at=at)

    async def mark_presence(self, changes: Sequence[tuple[str, str, bool, datetime]]) -> None:
        for app_version, endpoint_token, connected, at in changes:
            device = await self.device_for(app_version, endpoint_token)
            if device is None:
                continue
            last = max((t for t in (device.connected_at, device.disconnected_at) if t is not None), default=None)
            if last is not None and last >= at:
                continue
            self._devices[device.device_id] = dataclasses.replace(
                device,
                connected=connected,
                connected_at=at if connected else device.connected_at,
                disconnected_at=device.disconnected_at if connected else at,
            )

    async def disconnect_all(self, now: datetime) -> int:
        connected = [d for d in self._devices.values() if d.connected]
        for device in connected:
            self._devices[device.device_id] = dataclasses.replace(device, connected=False, disconnected_at=now)
        return len(connected)

    async def mark_delivery(
        self, sent: Sequence[tuple[int, datetime]], delivered: Sequence[tuple[int, datetime]]
    ) -> None:
        for command_id, at in delivered:
            if (c := self._commands.get(command_id)) is not None and c.delivered_at is None:
                self._commands[command_id] = dataclasses.replace(c, delivered_at=at, sent_at=c.sent_at or at)
        for command_id, at in sent:
            if (c := self._commands.get(command_id)) is not None and c.sent_at is None:
                self._commands[command_id] = dataclasses.replace(c, sent_at=at)


def _endpoint(target: Target) -> tuple[str, str]:
    return (target.app_version, target.endpoint_token)


def _same_endpoint(a: Target, b: Target) -> bool:
    return _endpoint(a) == _endpoint(b)

