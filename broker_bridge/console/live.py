"""What the console's live views hear: every committed change this instance announces, fanned out
to the open server-sent-event streams (commands by device, rollouts by id). An Announcer
(``service.Announcers`` includes it)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from broker_bridge.commands import Command
from broker_bridge.devices import PresenceChange
from broker_bridge.rollouts import Rollout
from broker_bridge.store import Delivery
from broker_bridge.topics import Target

QUEUE = 256  # a stream that falls this far behind is told to reload instead


@dataclass(eq=False)
class Listener:
    """One open stream: the device it watches (None: every device) and what it has not sent yet."""

    endpoint: tuple[str, str] | None
    queue: asyncio.Queue[int] = field(default_factory=lambda: asyncio.Queue(QUEUE))

    def offer(self, target: Target, command_id: int) -> None:
        if self.endpoint is not None and self.endpoint != (target.app_version, target.endpoint_token):
            return
        if self.queue.full():  # behind: one "reload everything" (0) is enough
            return
        self.queue.put_nowait(command_id)


@dataclass(eq=False)
class RolloutListener:
    """One open stream of rollout changes: the rollout it watches (None: every rollout)."""

    rollout_id: int | None
    queue: asyncio.Queue[int] = field(default_factory=lambda: asyncio.Queue(QUEUE))

    def offer(self, rollout_id: int) -> None:
        if self.rollout_id is not None and self.rollout_id != rollout_id:
            return
        if self.queue.full():  # behind: what it holds already makes the page refresh
            return
        self.queue.put_nowait(rollout_id)


class LiveEvents:
    def __init__(self) -> None:
        self.listeners: set[Listener] = set()
        self.rollout_listeners: set[RolloutListener] = set()

    def listen(self, endpoint: tuple[str, str] | None) -> Listener:
        listener = Listener(endpoint)
        self.listeners.add(listener)
        return listener

    def forget(self, listener: Listener) -> None:
        self.listeners.discard(listener)

    def listen_rollouts(self, rollout_id: int | None) -> RolloutListener:
        listener = RolloutListener(rollout_id)
        self.rollout_listeners.add(listener)
        return listener

    def forget_rollouts(self, listener: RolloutListener) -> None:
        self.rollout_listeners.discard(listener)

    # -- Announcer ----------------------------------------------------------------------------
    def command_changed(self, command: Command) -> None:
        for listener in self.listeners:
            listener.offer(command.target, command.id)

    def outstanding_changed(self, target: Target, *, added: bool, delivery: Delivery | None = None) -> None:
        pass

    def commands_expired(self, expired: Sequence[tuple[int, Target]]) -> None:
        for command_id, target in expired:
            for listener in self.listeners:
                listener.offer(target, command_id)

    def presence_changed(self, change: PresenceChange) -> None:
        pass

    def rollout_changed(self, rollout: Rollout) -> None:
        for listener in self.rollout_listeners:
            listener.offer(rollout.id)
