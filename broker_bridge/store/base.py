"""The store contract. Implementations: ``memory.MemoryStore`` (tests), ``sqlite.SqliteStore``.

Rules every implementation keeps:
- a method returns only after its change is durable (committed);
- state moves follow ``commands.TRANSITIONS`` and are compare-and-set, so two writers never both win;
- operations submitted by one task complete in submission order (a progress report sent before a
  final result is applied before it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from broker_bridge.commands import (
    Command,
    CommandState,
    NewCommand,
    Report,
    apply_report,
    expire,
    log_late_report,
    rfc3339,
)
from broker_bridge.devices import Device
from broker_bridge.errors import BridgeError, CommandFinished, CommandNotFound, LimitExceeded, PayloadTooLarge
from broker_bridge.rollouts import Build, Decide, DeviceState, Member, Rollout, Stepped
from broker_bridge.topics import Format, Target

# The expiry sweep takes its batch from the EXPIRE_WINDOW x limit earliest deadlines, lowest ids
# first. Ids follow creation order, so a batch then shares table pages: on 1M rows with 100k due
# scattered over the table, the sweep rewrote nearly every page once per batch in deadline order
# (bench/README.md, "Expiry in id order").
EXPIRE_WINDOW = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandQuery:
    """Filters and page of a history listing; newest first unless ``oldest_first``."""

    app_version: str | None = None
    endpoint_token: str | None = None
    command_type: str | None = None
    states: frozenset[CommandState] = field(default_factory=frozenset)
    ephemeral: bool | None = None  # None: both; False: hide ephemeral executions
    limit: int = 50
    offset: int = 0
    oldest_first: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportOutcome:
    """What one reported result did."""

    command_id: int
    command: Command | None  # the stored record after the report; None if refused as unknown
    error: BridgeError | None  # why it was refused; None if applied
    changed: bool  # the stored record changed and must be announced


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    """What to push to one target: its outstanding commands and how the device wants them."""

    target: Target
    observe: bool  # False once the device asked {"observe": false}
    format: Format  # the format the device last polled with
    commands: tuple[Command, ...]
    # A non-empty list may still be retained on the broker for this target, on this format's topic.
    retained_format: Format | None = None

    @property
    def retained(self) -> bool:
        return self.retained_format is not None

    @property
    def retained_elsewhere(self) -> Format | None:
        """The format of a retained list left on another format's topic (the device switched)."""
        return None if self.retained_format == self.format else self.retained_format


@dataclass(frozen=True, slots=True, kw_only=True)
class Polled:
    """What a poll returns: the outstanding commands, and whether a retained list of the target sits
    on another format's topic than the one just polled with (it must be moved)."""

    commands: tuple[Command, ...]
    moved: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Created:
    """What ``submit`` did, and the target's outstanding list as that transaction left it."""

    command: Command
    created: bool  # False: the idempotency key was used before; ``command`` is that earlier command
    delivery: Delivery | None  # None when nothing was created, or none was asked for


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenSummary:
    """The open commands of the whole store (every instance's, the CLI's), for the metrics."""

    counts: dict[tuple[str, str], int]  # (state, command type): how many
    oldest_pending: datetime | None  # created_at of the oldest pending command


class RolloutStore(Protocol):
    """Fleet rollouts (``broker_bridge.rollouts``): what every store keeps of them."""

    async def create_rollout(self, draft: Rollout, members: Sequence[tuple[str, str, str]]) -> Rollout:
        """Store a new rollout (``draft``, from ``rollouts.draft``; its id is assigned here) and its
        members (device id, app version, token), all queued, in one write."""
        ...

    async def get_rollout(self, rollout_id: int) -> Rollout | None: ...

    async def rollouts(self, limit: int, offset: int) -> tuple[list[Rollout], int]:
        """A page of rollouts, newest first, and how many there are."""
        ...

    async def rollout_members(
        self, rollout_id: int, states: frozenset[DeviceState], limit: int, offset: int
    ) -> tuple[list[Member], int]:
        """A page of a rollout's members in their order (only these states, if any), and the count."""
        ...

    async def active_rollouts(self) -> list[int]:
        """Ids of the rollouts that are scheduled, in progress or paused."""
        ...

    async def step_rollout(
        self, rollout_id: int, now: datetime, decide: Decide, build: Build, *, wait: bool = True
    ) -> Stepped | None:
        """One step, in one transaction: read the snapshot, ``decide`` (pure; may refuse with a
        BridgeError before anything is written), settle members, cancel (``cancel_open``) or create
        the commands of the members sent now (``build``: None skips the member), save the rollout.
        RolloutNotFound if there is none. Without ``wait``, None if another instance is stepping it."""
        ...


class CommandStore(RolloutStore, Protocol):
    """Durable command history. All times are timezone-aware UTC."""

    async def create(self, new: NewCommand) -> Command:
        """Store a new pending command and assign its service-wide unique id.

        Conflict if another command of the same endpoint already has the idempotency key."""
        ...

    async def submit(
        self,
        new: NewCommand,
        *,
        max_open: int,
        mark_retained: bool,
        with_delivery: bool = True,
        window: int | None = None,
    ) -> Created:
        """An operator's invoke, in one transaction (one round trip to the database):

        the endpoint's command with the same idempotency key if there is one (nothing is created);
        else LimitExceeded if the endpoint already has ``max_open`` open commands; else ``create``.
        With ``mark_retained`` (pushes are retained on the broker) a target whose device observes is
        marked retained before the push that follows can happen. Returns the target's delivery as
        committed, so the push needs no further read; without ``with_delivery`` (the push reads the
        list itself) the list is not read (``delivery`` is None), and the mark is made all the same.
        ``window`` as for ``delivery``."""
        ...

    async def find_idempotent(self, target: Target, key: str) -> Command | None:
        """The command of this endpoint created with this idempotency key, if any."""
        ...

    async def get(self, command_id: int) -> Command | None: ...

    async def history(self, query: CommandQuery) -> list[Command]: ...

    async def count(self, query: CommandQuery) -> int: ...

    async def report(self, target: Target, reports: Sequence[tuple[int, Report]]) -> list[ReportOutcome]:
        """Apply device reports in order; refuses ids of other targets without touching them."""
        ...

    async def cancel(self, command_id: int, now: datetime, target: Target | None = None) -> Command:
        """Cancel an open command; CommandNotFound / CommandFinished otherwise."""
        ...

    async def poll(
        self, target: Target, now: datetime, observe: bool | None, fmt: Format, window: int | None = None
    ) -> Polled:
        """The outstanding commands of a target, remembering the device's observe flag and format
        (``window`` as for ``delivery``).

        A retained list stays recorded under the format it was published in (``Delivery.retained_format``)."""
        ...

    async def delivery(self, target: Target, now: datetime, window: int | None = None) -> Delivery:
        """What to push to a target. ``window``: only its oldest that many outstanding commands
        (``delivery.window``: the lowest ids), read no further; None: all of them."""
        ...

    async def deliveries(self, targets: Sequence[Target], now: datetime, window: int | None = None) -> list[Delivery]:
        """``delivery`` of each target, in the order given, in one read (a push loop's whole chunk)."""
        ...

    async def mark_retained_many(self, marks: Sequence[tuple[Target, bool, Format | None]]) -> None:
        """``mark_retained`` for each (target, retained, fmt), in order, in one transaction."""
        ...

    async def mark_retained(self, target: Target, retained: bool, fmt: Format | None = None) -> None:
        """Remember whether a non-empty outstanding list is retained on the broker for a target, and
        on which format's topic (``fmt``; None: the device's current format).

        Clearing (after the empty list or its deletion was published) leaves the mark while the
        target has an open command and its device observes: an invoke since then marked it in its
        own transaction and its push may be out."""
        ...

    async def retained_targets(self) -> list[Target]: ...

    async def open_targets(self, now: datetime, app_version: str, endpoint_token: str) -> list[Target]:
        """Every command type of one endpoint that has outstanding commands."""
        ...

    async def all_open_targets(self, now: datetime) -> list[Target]: ...

    async def expire_due(self, now: datetime, limit: int) -> list[tuple[int, Target]]:
        """Expire up to ``limit`` open commands whose deadline passed.

        Which ones: of the ``EXPIRE_WINDOW * limit`` oldest deadlines, the lowest ids; a backlog
        therefore goes oldest deadlines first, window by window.

        Returns their ids and targets only: decoding whole records would cost more than the sweep
        itself; ``get_many`` fetches them when they are announced."""
        ...

    async def get_many(self, command_ids: Sequence[int]) -> list[Command]:
        """The commands with these ids that exist, in id order."""
        ...

    async def purge_finished(self, before: datetime, limit: int) -> int:
        """Delete up to ``limit`` finished commands last updated before ``before``."""
        ...

    async def mark_announced(self, announced: Sequence[tuple[int, datetime]]) -> None:
        """Record that the events of these (command id, updated_at) versions reached the broker."""
        ...

    async def unannounced(self, after_id: int, limit: int) -> list[Command]:
        """Commands whose latest change has no acknowledged event yet, by id, after ``after_id``."""
        ...

    async def purge_ephemeral(self, before: datetime, limit: int) -> int:
        """Delete up to ``limit`` ephemeral commands created before ``before``, whatever their state."""
        ...

    async def check_writable(self, now: datetime) -> None:
        """Prove the store can commit a write (readiness): StoreUnavailable with the reason if not,
        also when its files are no longer the ones on disk."""
        ...

    # -- the device registry --------------------------------------------------------------------
    async def add_device(self, device: Device) -> Device:
        """Register a device; Conflict if its id or its (app version, token) is taken."""
        ...

    async def replace_device(self, device: Device) -> Device:
        """Store a changed device; DeviceNotFound if it is not registered, Conflict as add_device."""
        ...

    async def get_device(self, device_id: str) -> Device | None: ...

    async def device_for(self, app_version: str, endpoint_token: str) -> Device | None: ...

    async def devices(
        self, limit: int, offset: int, labels: Mapping[str, str] | None = None, connected: bool | None = None
    ) -> list[Device]:
        """Registered devices, oldest first; with ``labels``, only those carrying every one of them;
        with ``connected``, only those known to be (True) or known not to be (False) connected."""
        ...

    async def count_devices(self, labels: Mapping[str, str] | None = None, connected: bool | None = None) -> int: ...

    async def delete_device(self, device_id: str) -> bool:
        """Unregister a device (its command history stays); False if there was none."""
        ...

    async def open_summary(self) -> OpenSummary:
        """How many commands are open, by state and type, and when the oldest pending one was made."""
        ...

    async def mark_seen(self, seen: Sequence[tuple[str, str, datetime]]) -> None:
        """Record when endpoints (app version, token) were last heard from, all in one write. A
        device's time never goes back; endpoints of no registered device are left out."""
        ...

    async def mark_presence(self, changes: Sequence[tuple[str, str, bool, datetime]]) -> None:
        """Record (app version, token, connected, at) presence changes in order, in one write. A change
        older than the device's last one is ignored; endpoints of no registered device are left out."""
        ...

    async def disconnect_all(self, now: datetime) -> int:
        """Every device recorded as connected is not (the embedded broker starts with no sessions)."""
        ...

    async def mark_delivery(
        self, sent: Sequence[tuple[int, datetime]], delivered: Sequence[tuple[int, datetime]]
    ) -> None:
        """Record when commands were handed to their device (``sent``: (id, at)) or proven received by
        it (``delivered``, which implies sent), in one write. A time once set is never changed; the
        record's version (``updated_at``) stays, so no state change races with it."""
        ...


def resolve_report(current: Command | None, target: Target, command_id: int, report: Report) -> ReportOutcome:
    """Decide what one report does to the stored command; shared by every store.

    A report for an id of another endpoint or type is refused as unknown (it must not reveal or
    touch that command). A report that arrives after the deadline is kept in the log of the
    expired command, and refused.
    """
    if current is None or current.target != target:
        reason = (
            f"no command {command_id} for endpoint {target.endpoint_token!r} and command type {target.command_type!r}"
        )
        return ReportOutcome(command_id=command_id, command=None, error=CommandNotFound(reason), changed=False)
    if current.state is CommandState.EXPIRED or current.is_due(report.received_at):
        expired = current if current.state is CommandState.EXPIRED else expire(current, report.received_at)
        error = CommandFinished(f"command {command_id} expired at {rfc3339(expired.expires_at)}")
        return ReportOutcome(command_id=command_id, command=log_late_report(expired, report), error=error, changed=True)
    try:
        updated = apply_report(current, report)
    except (CommandFinished, PayloadTooLarge) as exc:
        return ReportOutcome(command_id=command_id, command=current, error=exc, changed=False)
    return ReportOutcome(command_id=command_id, command=updated, error=None, changed=True)


def check_open_limit(open_count: int, max_open: int, target: Target) -> None:
    """LimitExceeded when an endpoint already has ``max_open`` open commands."""
    if open_count >= max_open:
        raise LimitExceeded(
            f"endpoint {target.endpoint_token!r} already has {max_open} outstanding commands "
            "(max_outstanding_per_endpoint); wait for results or cancel some"
        )


def check_cancel(current: Command | None, command_id: int, target: Target | None) -> Command:
    """The command a cancel applies to; CommandNotFound if the id does not match the target."""
    if current is None or (target is not None and current.target != target):
        raise CommandNotFound(f"no command {command_id}" + (f" for {_describe(target)}" if target else ""))
    return current


def _describe(target: Target) -> str:
    return f"endpoint {target.endpoint_token!r} and command type {target.command_type!r}"


def matches(command: Command, query: CommandQuery) -> bool:
    """Whether a command passes a query's filters (the reference semantics for every store)."""
    t = command.target
    return (
        (query.app_version is None or t.app_version == query.app_version)
        and (query.endpoint_token is None or t.endpoint_token == query.endpoint_token)
        and (query.command_type is None or t.command_type == query.command_type)
        and (not query.states or command.state in query.states)
        and (query.ephemeral is None or command.ephemeral == query.ephemeral)
    )
