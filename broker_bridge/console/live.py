"""What the console's live views hear: every committed change this instance announces, fanned out
to the open server-sent-event streams. An Announcer (``service.Announcers`` includes it)."""

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


class LiveEvents:
    def __init__(self) -> None:
        self.listeners: set[Listener] = set()

    def listen(self, endpoint: tuple[str, str] | None) -> Listener:
        listener = Listener(endpoint)
        self.listeners.add(listener)
        return listener

    def forget(self, listener: Listener) -> None:
        self.listeners.discard(listener)

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
        pass
