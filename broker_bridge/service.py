"""The one entry point for invoke, poll, result, cancel and history: MQTT, HTTP and CLI all call it.

Every method commits through the store first and announces afterwards, so nothing is acknowledged
or published that is not durable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import structlog

from broker_bridge import commands
from broker_bridge.commands import Command, NewCommand, Report
from broker_bridge.devices import Device, PresenceChange, resolve
from broker_bridge.errors import BadRequest, CommandNotFound, Conflict, StoreUnavailable
from broker_bridge.protocol import ResultItem, check_document
from broker_bridge.registry import Registry, RegistryMode
from broker_bridge.rollouts import Rollout
from broker_bridge.store import CommandQuery, CommandStore, Delivery, ReportOutcome
from broker_bridge.topics import Format, Target, parse_positive_int

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]
DAY_S = 86_400.0
EPHEMERAL_S = DAY_S  # Enapter: ephemeral executions are deleted 24 hours after creation
RECHECK_S = 1.0


def utc_now() -> datetime:
    return datetime.now(UTC)


class Announcer(Protocol):
    """Tells the outside world about committed changes (the MQTT bridge implements it)."""

    def command_changed(self, command: Command) -> None:
        """A command record changed: publish its event."""

    def outstanding_changed(self, target: Target, *, added: bool, delivery: Delivery | None = None) -> None:
        """A target's outstanding list changed: a command was added (or the device reappeared,
        ``added=True``) or one left it (``added=False``). The bridge decides what to push;
        ``delivery``, when given, is the list as the change committed it, in its delivery window (no
        need to read it again). A command added behind a full window is not announced here."""

    def commands_expired(self, expired: Sequence[tuple[int, Target]]) -> None:
        """These commands expired; their records are fetched when their events are published."""

    def presence_changed(self, change: PresenceChange) -> None:
        """An endpoint connected or disconnected (committed for a registered device)."""

    def rollout_changed(self, rollout: Rollout) -> None:
        """A rollout's state or counters changed (committed): at most once per step."""


class NullAnnouncer:
    """Announces nothing: for a CLI without a broker and for tests of the service alone."""

    def command_changed(self, command: Command) -> None:
        pass

    def outstanding_changed(self, target: Target, *, added: bool, delivery: Delivery | None = None) -> None:
        pass

    def commands_expired(self, expired: Sequence[tuple[int, Target]]) -> None:
        pass

    def presence_changed(self, change: PresenceChange) -> None:
        pass

    def rollout_changed(self, rollout: Rollout) -> None:
        pass


class Announcers:
    """Several announcers as one (the MQTT outbox, metrics)."""

    def __init__(self, *members: Announcer) -> None:
        self.members = members

    def command_changed(self, command: Command) -> None:
        for member in self.members:
            member.command_changed(command)

    def outstanding_changed(self, target: Target, *, added: bool, delivery: Delivery | None = None) -> None:
        for member in self.members:
            member.outstanding_changed(target, added=added, delivery=delivery)

    def commands_expired(self, expired: Sequence[tuple[int, Target]]) -> None:
        for member in self.members:
            member.commands_expired(expired)

    def presence_changed(self, change: PresenceChange) -> None:
        for member in self.members:
            member.presence_changed(change)

    def rollout_changed(self, rollout: Rollout) -> None:
        for member in self.members:
            member.rollout_changed(rollout)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Time limits on commands."""

    default_ttl_s: float = DAY_S
    max_ttl_s: float = 30 * DAY_S
    retention_s: float = 30 * DAY_S
    max_outstanding_per_endpoint: int = 1000
    # Commands handed out per target at once, oldest first (None: every outstanding one, as Kaa).
    max_in_flight_per_target: int | None = None


PRESENCE_RETRY_S = 1.0  # a presence write the store refused is tried again after this long
EXPIRY_GRACE_S = 2.0  # execute: how long a command past its wait may take to be seen expired


class CommandService:
    """Command execution: the rules, with the store and the announcer plugged in."""

    def __init__(
        self,
        store: CommandStore,
        *,
        announcer: Announcer | None = None,
        limits: Limits | None = None,
        clock: Clock = utc_now,
        registry_mode: RegistryMode = RegistryMode.OPEN,
        retained_pushes: bool = False,
        committed_lists: bool = True,
    ) -> None:
        """``retained_pushes``: the bridge retains each target's outstanding list on the broker, so
        an invoke marks the target retained in its own transaction (before the push can happen).

        ``committed_lists``: an invoke's push may use the list as its transaction committed it. False
        when several instances push (each list is read again under its target's lock): the invoke
        then reads no list (it still marks the target retained)."""
        self.store = store
        self.retained_pushes = retained_pushes
        self.committed_lists = committed_lists
        self.announcer: Announcer = announcer or NullAnnouncer()
        self.limits = limits or Limits()
        self.clock = clock
        self.registry = Registry(store, registry_mode, clock)
        self._waiters: dict[int, set[asyncio.Future[Command]]] = {}
        self._lookups: set[asyncio.Task[None]] = set()  # reads for waiters woken by another instance
        self._seen: dict[tuple[str, str], datetime] = {}  # endpoints heard from since the last flush
        self._sent: dict[int, datetime] = {}  # commands handed to their devices since the last flush
        self._delivered: dict[int, datetime] = {}  # commands their devices proved they received
        self._presence: list[PresenceChange] = []  # connections and disconnections not written yet
        self._presence_writer: asyncio.Task[None] | None = None

    # -- operator side ------------------------------------------------------------------------
    async def invoke(
        self,
        target: Target,
        payload: Any,
        ttl_s: float | None = None,
        *,
        ephemeral: bool = False,
        idempotency_key: str | None = None,
        rerun_of: int | None = None,
        invoked_by: str | None = None,
    ) -> Command:
        """Create a pending command and push it to the device.

        ``target.command_type`` may be a manifest alias; the payload is checked against the device's
        manifest. With an idempotency key already used by this endpoint, the existing command is
        returned and nothing new is created. ``invoked_by``: who asks (recorded as ``invokedBy``).
        The command records whether its endpoint had ever been heard from (``deviceSeen``).
        """
        ttl = self._ttl(ttl_s)
        check_document(payload)  # HTTP bodies and CLI arguments were not decoded by our codecs
        device = await self.registry.admit(target.app_version, target.endpoint_token)
        resolved = resolve(device.manifest, target.command_type, payload)
        real = dataclasses.replace(target, command_type=resolved.command_type)
        now = self.clock()
        new = NewCommand(
            target=real,
            payload=resolved.arguments,
            created_at=now,
            expires_at=commands.expires_at(now, ttl),
            request_name=target.command_type if target.command_type != real.command_type else None,
            ephemeral=ephemeral,
            idempotency_key=idempotency_key,
            rerun_of=rerun_of,
            invoked_by=invoked_by,
            device_seen=await self._was_seen(device),
        )
        command = await self._create(new)
        if not command.device_seen:
            log.info("invoked_for_unseen_endpoint", id=command.id, target=_key(real))
        return command

    async def _was_seen(self, device: Device) -> bool:
        """Whether the device's endpoint ever sent a KP1 message (registered, it may never have)."""
        endpoint = (device.app_version, device.endpoint_token)
        if device.last_seen_at is not None or device.connected or endpoint in self._seen:
            return True
        fresh = await self.store.device_for(*endpoint)  # the registry's copy may predate its first message
        return fresh is not None and (fresh.last_seen_at is not None or bool(fresh.connected))

    async def execute(
        self,
        target: Target,
        payload: Any,
        *,
        wait_s: float,
        ttl_s: float | None = None,
        ephemeral: bool = False,
        idempotency_key: str | None = None,
        invoked_by: str | None = None,
    ) -> Command:
        """Invoke and wait up to ``wait_s`` for the final result (execute_command, Kaa's awaitTimeout).

        Synchronous by nature: without ``ttl_s`` (and with a wait) the command is deliverable only
        while the caller waits. One that did not finish in time expires (Enapter's TIMEOUT) before
        the answer, and never fires later. With ``ttl_s`` it stays deliverable that long."""
        bounded = ttl_s is None and wait_s > 0
        command = await self.invoke(
            target,
            payload,
            wait_s if bounded else ttl_s,
            ephemeral=ephemeral,
            idempotency_key=idempotency_key,
            invoked_by=invoked_by,
        )
        if wait_s > 0:
            command = await self.wait_final(command.id, wait_s)
        if bounded and command.is_open:
            await asyncio.sleep(max(0.0, (command.expires_at - self.clock()).total_seconds()))
            await self.expire_due()
            # Another instance may be the one sweeping now: its expiry wakes us (NOTIFY) or a re-read.
            command = await self.wait_final(command.id, EXPIRY_GRACE_S)
        return command

    async def rerun(
        self,
        command_id: int,
        ttl_s: float | None = None,
        *,
        target: Target | None = None,
        invoked_by: str | None = None,
    ) -> Command:
        """Invoke a command again: a new command with the same device, type and payload, and the
        original's TTL unless ``ttl_s`` is given; it records ``rerun_of``, the original is left as it
        is. The device's manifest is checked as for any invoke. ``target``: the original must be
        this device's (and type's), else CommandNotFound, as for a cancel."""
        original = await self.store.get(command_id)
        if original is None or (target is not None and original.target != target):
            raise CommandNotFound(f"no command {command_id}" + (f" for {_key(target)}" if target else ""))
        if ttl_s is None:  # the original's, within today's max_ttl_s
            ttl_s = min((original.expires_at - original.created_at).total_seconds(), self.limits.max_ttl_s)
        # By the name the operator used (a manifest alias), so the re-run records it too.
        asked = dataclasses.replace(original.target, command_type=original.request_name or original.target.command_type)
        command = await self.invoke(asked, original.payload, ttl_s, rerun_of=original.id, invoked_by=invoked_by)
        log.info("command_rerun", id=command.id, rerun_of=original.id)
        return command

    async def _create(self, new: NewCommand) -> Command:
        """Idempotency, the outstanding limit and the insert in one transaction; then announce."""
        limit = self.limits.max_outstanding_per_endpoint
        try:
            created = await self.store.submit(
                new,
                max_open=limit,
                mark_retained=self.retained_pushes,
                with_delivery=self.committed_lists,
                window=self.limits.max_in_flight_per_target,
            )
        except Conflict:  # the same idempotency key, concurrently (a store with several writers)
            assert new.idempotency_key is not None
            found = await self.store.find_idempotent(new.target, new.idempotency_key)
            if found is None:
                raise
            return _same_request(found, new)
        if created.created:
            log.debug("command_invoked", id=created.command.id, target=_key(new.target))
            delivery = created.delivery
            # Queued behind the window: what the device is handed has not changed, nothing to push.
            queued = delivery is not None and all(c.id != created.command.id for c in delivery.commands)
            self._announce(created.command, added=None if queued else True, delivery=delivery)
            return created.command
        return _same_request(created.command, new)

    def _ttl(self, ttl_s: float | None) -> float:
        if ttl_s is None:
            return self.limits.default_ttl_s
        if not 0 < ttl_s <= self.limits.max_ttl_s:
            raise BadRequest(f"ttl must be > 0 and at most {self.limits.max_ttl_s:g} seconds, got {ttl_s:g}")
        return ttl_s

    async def cancel(self, command_id: int, target: Target | None = None) -> Command:
        """Cancel an open command; it is never delivered again."""
        command = await self.store.cancel(command_id, self.clock(), target)
        log.info("command_cancelled", id=command.id)
        self._announce(command, added=False)
        return command

    async def get(self, command_id: int) -> Command:
        command = await self.store.get(command_id)
        if command is None:
            raise CommandNotFound(f"no command {command_id}")
        return command

    async def device_command(self, device: Device, command_id: str, command_type: str | None = None) -> Command:
        """The command whose id (as text, from a URL) belongs to this device (and type); else 404."""
        number = parse_positive_int(command_id)  # ASCII digits only: '²'.isdigit() is True
        command = await self.store.get(number) if number is not None else None
        t = command.target if command is not None else None
        if (
            command is None
            or t is None
            or (t.app_version, t.endpoint_token) != (device.app_version, device.endpoint_token)
            or (command_type is not None and t.command_type != command_type)
        ):
            kind = f"{command_type!r} command" if command_type else "command"
            raise CommandNotFound(f"no {kind} {command_id!r} for device {device.device_id!r}")
        return command

    async def history(self, query: CommandQuery) -> list[Command]:
        return await self.store.history(query)

    async def count(self, query: CommandQuery) -> int:
        return await self.store.count(query)

    # -- device side --------------------------------------------------------------------------
    async def poll(self, target: Target, observe: bool | None, fmt: Format = Format.PLAIN) -> tuple[Command, ...]:
        """The outstanding commands of a target in its window (oldest first); remembers the observe
        flag and format."""
        await self.registry.admit(target.app_version, target.endpoint_token)
        self._saw(target)
        polled = await self.store.poll(target, self.clock(), observe, fmt, self.limits.max_in_flight_per_target)
        if polled.moved:  # the device switched formats: its retained list must follow it
            self.announcer.outstanding_changed(target, added=True)
        return polled.commands

    async def report(self, target: Target, results: Sequence[ResultItem]) -> list[ReportOutcome]:
        """Apply a device's results in order; each refused one carries its error."""
        await self.registry.admit(target.app_version, target.endpoint_token)
        self._saw(target)
        now = self.clock()
        reports = [(item.id, _to_report(item, now)) for item in results]
        outcomes = await self.store.report(target, reports)
        for outcome in outcomes:
            self._log_outcome(outcome)
            if outcome.changed and outcome.command is not None:
                self._announce(outcome.command, added=None if outcome.command.is_open else False)
        return outcomes

    @staticmethod
    def _log_outcome(outcome: ReportOutcome) -> None:
        if outcome.error is not None:
            log.info("result_refused", id=outcome.command_id, reason=outcome.error.reason)
        elif outcome.command is not None:
            log.debug("result_applied", id=outcome.command_id, state=outcome.command.state.value)

    def _saw(self, target: Target) -> None:
        self._seen[(target.app_version, target.endpoint_token)] = self.clock()

    async def flush_seen(self) -> int:
        """Write when devices were last heard from, all gathered since the last flush in one write
        (a write per message would double the store's work); returns how many. On a store error
        they stay gathered (a later sighting of the same device wins) for the next flush."""
        seen, self._seen = self._seen, {}
        if not seen:
            return 0
        try:
            await self.store.mark_seen([(av, token, at) for (av, token), at in seen.items()])
        except BaseException:
            for key, at in seen.items():
                self._seen[key] = max(at, self._seen.get(key, at))
            raise
        return len(seen)

    def handed(self, command_ids: Sequence[int], *, received: bool = False) -> None:
        """These commands were just handed to their device (a push to its live session, a poll's
        reply) and, with ``received``, it proved it has them (its PUBACK, an HTTP poll's response).
        Written by ``flush_delivery``; the first time of each counts."""
        now = self.clock()
        marks = self._delivered if received else self._sent
        for command_id in command_ids:
            marks.setdefault(command_id, now)

    async def flush_delivery(self) -> int:
        """Write the sent and delivered times gathered since the last flush, in one write (a write
        per push would double the store's work); returns how many. Kept for the next flush on a
        store error."""
        sent, self._sent = self._sent, {}
        delivered, self._delivered = self._delivered, {}
        if not (sent or delivered):
            return 0
        try:
            await self.store.mark_delivery(list(sent.items()), list(delivered.items()))
        except BaseException:
            self._sent = {**sent, **self._sent}
            self._delivered = {**delivered, **self._delivered}
            raise
        return len(sent) + len(delivered)

    def presence(self, app_version: str, endpoint_token: str, connected: bool) -> None:
        """An endpoint's device connected or disconnected (the embedded broker's sessions, or the
        device's presence topic). Written at once, with whatever else changed meanwhile in the same
        write, then announced (``cex/events/presence/...``)."""
        self._presence.append(PresenceChange(app_version, endpoint_token, connected, self.clock()))
        if self._presence_writer is None or self._presence_writer.done():
            self._presence_writer = asyncio.get_running_loop().create_task(self._write_presence(), name="presence")

    async def _write_presence(self) -> None:
        while self._presence:
            changes, self._presence = self._presence, []
            try:
                await self.store.mark_presence([(c.app_version, c.endpoint_token, c.connected, c.at) for c in changes])
            except StoreUnavailable as exc:  # kept, in order, for the next try
                self._presence[:0] = changes
                log.error("presence_not_written", reason=exc.reason, changes=len(changes), retry_in_s=PRESENCE_RETRY_S)
                await asyncio.sleep(PRESENCE_RETRY_S)
                continue
            for change in changes:
                self.announcer.presence_changed(change)

    async def flush_presence(self) -> None:
        """Wait until every presence change so far is written (shutdown, tests)."""
        while self._presence_writer is not None and not self._presence_writer.done():
            await asyncio.shield(self._presence_writer)

    async def delivery(self, target: Target) -> Delivery:
        """What to push to a target: its outstanding commands in its window (the rest are not read)."""
        return await self.store.delivery(target, self.clock(), self.limits.max_in_flight_per_target)

    async def deliveries(self, targets: Sequence[Target]) -> list[Delivery]:
        return await self.store.deliveries(targets, self.clock(), self.limits.max_in_flight_per_target)

    async def endpoint_seen(self, app_version: str, endpoint_token: str) -> None:
        """A device (re)appeared: push everything outstanding for it."""
        for target in await self.store.open_targets(self.clock(), app_version, endpoint_token):
            self.announcer.outstanding_changed(target, added=True)

    # -- sweeps -------------------------------------------------------------------------------
    async def expire_due(self, limit: int = 1000) -> int:
        """Expire commands past their deadline; returns how many."""
        expired = await self.store.expire_due(self.clock(), limit)
        if not expired:
            return 0
        self.announcer.commands_expired(expired)
        for target in dict.fromkeys(t for _, t in expired):
            self.announcer.outstanding_changed(target, added=False)
        waited = [command_id for command_id, _ in expired if command_id in self._waiters]
        for command in await self.store.get_many(waited) if waited else []:
            self._wake_waiters(command)
        log.info("commands_expired", count=len(expired), ids=[i for i, _ in expired[:20]])
        return len(expired)

    async def purge_finished(self, limit: int = 1000) -> int:
        """Delete finished commands past retention and ephemeral ones past a day; returns how many."""
        now = self.clock()
        finished = await self.store.purge_finished(now - timedelta(seconds=self.limits.retention_s), limit)
        ephemeral = await self.store.purge_ephemeral(now - timedelta(seconds=EPHEMERAL_S), limit)
        return max(finished, ephemeral)

    # -- waiting for a result -------------------------------------------------------------------
    async def wait_final(self, command_id: int, timeout_s: float) -> Command:
        """The command once it is final, or as it stands when the timeout is up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        waiter: asyncio.Future[Command] = loop.create_future()
        self._waiters.setdefault(command_id, set()).add(waiter)
        try:
            command = await self.get(command_id)
            while command.is_open and (remaining := deadline - loop.time()) > 0:
                # Re-read now and then: another bridge instance may have taken the result.
                await asyncio.wait({waiter}, timeout=min(remaining, RECHECK_S))
                command = waiter.result() if waiter.done() else await self.get(command_id)
            return command
        finally:
            self._drop_waiter(command_id, waiter)

    def finished_elsewhere(self, command_ids: Sequence[int]) -> None:
        """Another instance finished these commands (PostgreSQL NOTIFY): wake whoever waits here.

        Only a wake-up: waiters also re-read every RECHECK_S, so a lost notification costs time only."""
        waited = [command_id for command_id in command_ids if command_id in self._waiters]
        if waited:
            task = asyncio.ensure_future(self._wake_from_store(waited))
            self._lookups.add(task)
            task.add_done_callback(self._lookups.discard)

    async def _wake_from_store(self, command_ids: list[int]) -> None:
        try:
            found = await self.store.get_many(command_ids)
        except StoreUnavailable:
            return
        for command in found:
            if not command.is_open:
                self._wake_waiters(command)

    def _drop_waiter(self, command_id: int, waiter: asyncio.Future[Command]) -> None:
        waiters = self._waiters.get(command_id)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[command_id]

    def _announce(self, command: Command, *, added: bool | None, delivery: Delivery | None = None) -> None:
        """Publish the event; ``added`` None: the outstanding list itself did not change."""
        self.announcer.command_changed(command)
        if added is not None:
            self.announcer.outstanding_changed(command.target, added=added, delivery=delivery)
        if not command.is_open:
            self._wake_waiters(command)

    def _wake_waiters(self, command: Command) -> None:
        for waiter in self._waiters.get(command.id, ()):
            if not waiter.done():
                waiter.set_result(command)


def _to_report(item: ResultItem, now: datetime) -> Report:
    return Report(status_code=item.status_code, reason_phrase=item.reason_phrase, payload=item.payload, received_at=now)


def _same_request(first: Command, new: NewCommand) -> Command:
    """A retry with an idempotency key gets the first command; a different command type or payload
    under the same key is a mistake the caller must hear of (AWS IoT: a reused client token with
    other parameters is a conflict), not silently the first command."""
    same_payload = _canonical(first.payload) == _canonical(new.payload)
    if first.target.command_type != new.target.command_type or not same_payload:
        raise Conflict(
            f"idempotency key {new.idempotency_key!r} was used for command {first.id} "
            f"({first.target.command_type} with another payload or type); use a new key for a new command"
        )
    return first


def _canonical(payload: Any) -> str:
    """JSON with sorted keys: equal for equal documents (1 and true and 1.0 stay apart)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=repr)


def _key(target: Target) -> str:
    return f"{target.app_version}/{target.endpoint_token}/{target.command_type}"
