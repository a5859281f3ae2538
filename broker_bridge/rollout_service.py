"""Fleet rollouts as a service: create, read, steer, and the step every instance runs.

The rules are in ``rollouts`` (pure) and each step is one store transaction (``step_rollout``); this
layer resolves targets, builds each member's command (the device's manifest decides: a refusal
skips the member), announces what a step created or cancelled, and publishes the rollout's event.
HTTP, MQTT, the CLI and the console call it; ``serve`` runs ``step_all`` periodically on every
instance (a rollout another instance is stepping is skipped, so none is driven twice).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from pydantic import ValidationError

from broker_bridge import rollouts
from broker_bridge.commands import NewCommand
from broker_bridge.devices import Device, resolve
from broker_bridge.errors import BadRequest, BridgeError, Conflict, RolloutNotFound, StoreUnavailable, Unprocessable
from broker_bridge.protocol import check_document
from broker_bridge.rollouts import (
    ACTIVE,
    CAN_CANCEL,
    CAN_PAUSE,
    CAN_RESUME,
    MAX_TARGETS,
    DeviceState,
    Member,
    Plan,
    Rollout,
    RolloutSpec,
    RolloutState,
    Snapshot,
    Stepped,
)
from broker_bridge.service import CommandService
from broker_bridge.topics import Target

log = structlog.get_logger(__name__)

PREVIEW = 1000  # device ids a dry run lists (it counts them all)


@dataclass(frozen=True, slots=True, kw_only=True)
class Preview:
    """A dry run: the devices a rollout would target, and how many."""

    count: int
    device_ids: list[str]

    def record(self) -> dict[str, Any]:
        return {"dry_run": True, "count": self.count, "device_ids": self.device_ids}


def parse_spec(value: Any) -> RolloutSpec:
    """A rollout body (HTTP, MQTT, CLI file) as a spec; Unprocessable naming the first bad field."""
    if not isinstance(value, dict):
        raise BadRequest('a rollout is an object: {"command": {...}, "target": {...}, ...}')
    try:
        return RolloutSpec.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "rollout"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise Unprocessable(f"{where}: {message}") from None


class RolloutService:
    def __init__(self, service: CommandService) -> None:
        self.service = service
        self.store = service.store

    # -- create and read ------------------------------------------------------------------------
    async def create(self, spec: RolloutSpec, *, invoked_by: str | None = None) -> Rollout | Preview:
        check_document(spec.command.arguments)
        ttl = spec.command_ttl()
        if ttl is not None and ttl > self.service.limits.max_ttl_s:
            raise Unprocessable(f"timeout_s: at most max_ttl_s ({self.service.limits.max_ttl_s:g} seconds)")
        devices = await self._resolve(spec)
        if spec.dry_run:
            return Preview(count=len(devices), device_ids=[d.device_id for d in devices[:PREVIEW]])
        now = self.service.clock()
        rollout = await self.store.create_rollout(
            rollouts.draft(spec, now, len(devices), invoked_by),
            [(d.device_id, d.app_version, d.endpoint_token) for d in devices],
        )
        log.info("rollout_created", id=rollout.id, devices=len(devices), invoked_by=invoked_by)
        self.service.announcer.rollout_changed(rollout)
        stepped = await self.step(rollout.id)  # the first commands go out at once
        return stepped.rollout if stepped is not None else rollout

    async def _resolve(self, spec: RolloutSpec) -> list[Device]:
        """The targeted devices: the listed ids (each must exist), then those carrying the labels."""
        found: dict[str, Device] = {}
        missing = []
        for device_id in spec.target.device_ids:
            device = await self.store.get_device(device_id)
            if device is None:
                missing.append(device_id)
            else:
                found.setdefault(device.device_id, device)
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise Unprocessable(f"target.device_ids: no device {shown} ({len(missing)} unknown)")
        if spec.target.labels:
            labelled = await self.store.devices(MAX_TARGETS + 1, 0, spec.target.labels)
            if not labelled:
                pairs = ", ".join(f"{k}:{v}" for k, v in spec.target.labels.items())
                raise Unprocessable(f"target.labels: no device carries {pairs}")
            for device in labelled:
                found.setdefault(device.device_id, device)
        if len(found) > MAX_TARGETS:
            raise Unprocessable(f"target: more than {MAX_TARGETS} devices; split the rollout")
        return list(found.values())

    async def get(self, rollout_id: int) -> Rollout:
        found = await self.store.get_rollout(rollout_id)
        if found is None:
            raise RolloutNotFound(f"no rollout {rollout_id}")
        return found

    async def page(self, limit: int, offset: int) -> tuple[list[Rollout], int]:
        return await self.store.rollouts(limit, offset)

    async def members(
        self, rollout_id: int, states: frozenset[DeviceState], limit: int, offset: int
    ) -> tuple[list[Member], int]:
        await self.get(rollout_id)
        return await self.store.rollout_members(rollout_id, states, limit, offset)

    # -- steer ----------------------------------------------------------------------------------
    async def pause(self, rollout_id: int) -> Rollout:
        return await self._steer(rollout_id, _pause)

    async def resume(self, rollout_id: int) -> Rollout:
        return await self._steer(rollout_id, _resume)

    async def cancel(self, rollout_id: int) -> Rollout:
        return await self._steer(rollout_id, _cancel)

    async def _steer(self, rollout_id: int, change: Any) -> Rollout:
        now = self.service.clock()
        stepped = await self.store.step_rollout(
            rollout_id, now, lambda snapshot: change(snapshot, now), self._builder(rollout_id, now)
        )
        assert stepped is not None  # waited for the lock
        self._announce(stepped, steered=True)
        log.info("rollout_steered", id=rollout_id, state=stepped.rollout.state.value)
        if stepped.rollout.state is RolloutState.IN_PROGRESS:  # resumed: send what is due now
            again = await self.step(rollout_id)
            return again.rollout if again is not None else stepped.rollout
        return stepped.rollout

    # -- the step -------------------------------------------------------------------------------
    async def step(self, rollout_id: int, *, wait: bool = True) -> Stepped | None:
        now = self.service.clock()
        stepped = await self.store.step_rollout(
            rollout_id, now, lambda snapshot: _active_step(snapshot, now), self._builder(rollout_id, now), wait=wait
        )
        if stepped is not None:
            self._announce(stepped)
        return stepped

    async def step_all(self) -> int:
        """Step every active rollout this instance can lock now; returns how many it stepped."""
        stepped = 0
        for rollout_id in await self.store.active_rollouts():
            try:
                if await self.step(rollout_id, wait=False) is not None:
                    stepped += 1
            except RolloutNotFound:
                continue
            except StoreUnavailable:
                raise
            except BridgeError as exc:  # one rollout's trouble must not stop the others
                log.warning("rollout_step_refused", id=rollout_id, reason=exc.reason)
        return stepped

    def _builder(self, rollout_id: int, now: datetime) -> rollouts.Build:
        """How a member's command is made: the device as registered now, its manifest checked."""
        invoked_by = f"rollout:{rollout_id}"
        limits = self.service.limits

        def build(spec: RolloutSpec, member: Member, device: Device | None) -> NewCommand | None:
            if device is None:
                return None  # deleted since the rollout was made
            try:
                resolved = resolve(device.manifest, spec.command.name, spec.command.arguments)
            except BridgeError:
                return None  # its manifest refuses the command: skipped
            ttl = spec.command_ttl() or limits.default_ttl_s
            target = Target(
                app_version=device.app_version, endpoint_token=device.endpoint_token, command_type=resolved.command_type
            )
            name = spec.command.name
            return NewCommand(
                target=target,
                payload=resolved.arguments,
                created_at=now,
                expires_at=now + timedelta(seconds=ttl),
                request_name=name if name != resolved.command_type else None,
                invoked_by=invoked_by,
            )

        return build

    def _announce(self, stepped: Stepped, *, steered: bool = False) -> None:
        """``steered``: paused, resumed or cancelled, a change of state even when nothing else moved."""
        announcer = self.service.announcer
        for command in stepped.created:
            announcer.command_changed(command)
            announcer.outstanding_changed(command.target, added=True)
        for command in stepped.cancelled:
            announcer.command_changed(command)
            announcer.outstanding_changed(command.target, added=False)
        if steered or stepped.created or stepped.cancelled or stepped.settled or stepped.rollout.state not in ACTIVE:
            announcer.rollout_changed(stepped.rollout)


def _active_step(snapshot: Snapshot, now: datetime) -> Plan:
    if snapshot.rollout.state not in ACTIVE:
        return Plan(settle=[], send=0, rollout=snapshot.rollout)
    return rollouts.plan(snapshot, now)


def _pause(snapshot: Snapshot, now: datetime) -> Plan:
    rollout = snapshot.rollout
    if rollout.state not in CAN_PAUSE:
        raise Conflict(f"rollout {rollout.id} is {rollout.state.value}: only one in progress or scheduled can pause")
    paused = dataclasses.replace(rollout, state=RolloutState.PAUSED, updated_at=now)
    return dataclasses.replace(rollouts.plan(dataclasses.replace(snapshot, rollout=paused), now), send=0)


def _resume(snapshot: Snapshot, now: datetime) -> Plan:
    rollout = snapshot.rollout
    if rollout.state not in CAN_RESUME:
        raise Conflict(f"rollout {rollout.id} is {rollout.state.value}: only a paused one can resume")
    # The rate starts again from now: the pause is no credit for a burst.
    pace = dataclasses.replace(rollout.pace, since=now, sent_before=rollouts.attempts_sent(rollout.counts))
    resumed = dataclasses.replace(rollout, state=RolloutState.IN_PROGRESS, pace=pace, updated_at=now)
    return Plan(settle=[], send=0, rollout=resumed)


def _cancel(snapshot: Snapshot, now: datetime) -> Plan:
    rollout = snapshot.rollout
    if rollout.state not in CAN_CANCEL:
        raise Conflict(f"rollout {rollout.id} is {rollout.state.value} already")
    cancelled = dataclasses.replace(rollout, state=RolloutState.CANCELLED, finished_at=now, updated_at=now)
    return Plan(settle=[], send=0, rollout=cancelled, cancel_open=True)
