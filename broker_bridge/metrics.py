"""Prometheus metrics: command transitions by state and type, invoke-to-executed latency, MQTT
reconnects and store commit batch sizes. One private registry per service instance."""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from broker_bridge import __version__
from broker_bridge.commands import Command, CommandState
from broker_bridge.devices import PresenceChange
from broker_bridge.rollouts import Rollout
from broker_bridge.store import Delivery
from broker_bridge.store.base import OpenSummary
from broker_bridge.topics import Target


class _StoreCollector(Collector):
    """Gauges of the shared store, as last read (the service refreshes them every few seconds)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        open_commands = GaugeMetricFamily(
            "broker_bridge_commands_open",
            "Open commands in the store (all instances and the CLI), by state and command type",
            labels=["state", "command_type"],
        )
        oldest = GaugeMetricFamily(
            "broker_bridge_oldest_pending_age_seconds", "Age of the oldest pending command in the store (0: none)"
        )
        connected = GaugeMetricFamily(
            "broker_bridge_devices_connected",
            "Registered devices the broker reports connected (embedded broker sessions, presence topics)",
        )
        if self.metrics._summary is not None:
            summary, read_at = self.metrics._summary
            connected.add_metric([], self.metrics._connected)
            for (state, command_type), count in sorted(summary.counts.items()):
                open_commands.add_metric([state, self.metrics._type_label(command_type)], count)
            age = 0.0 if summary.oldest_pending is None else (read_at - summary.oldest_pending).total_seconds()
            oldest.add_metric([], max(0.0, age))
        yield open_commands
        yield oldest
        yield connected


MAX_TYPES = 200  # command types get their own label up to this many; the rest count as "other"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The service's metrics; also an Announcer, so it sees every committed change."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.transitions = Counter(
            "broker_bridge_command_transitions",
            "Commands entering a state, by state and command type",
            ["state", "command_type"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "broker_bridge_invoke_to_executed_seconds",
            "Time from invoke to the final result being committed",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.reconnects = Counter(
            "broker_bridge_mqtt_reconnects", "Times the bridge lost its broker connection", registry=self.registry
        )
        self.refused = Counter(
            "broker_bridge_mqtt_publishes_refused",
            "Publishes the broker refused in its PUBACK (MQTT 5; e.g. its ACL denies the bridge a topic)",
            registry=self.registry,
        )
        self.received = Counter(
            "broker_bridge_mqtt_received",
            "MQTT messages the bridge received: device requests, admin requests, ignored (replies)",
            ["kind"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "broker_bridge_store_commit_batch_size",
            "Operations per store commit (group commit)",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        # The standard process, GC and platform figures, as the default registry has them.
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.build_info = Gauge(
            "broker_bridge_build_info",
            "Always 1; the labels say which broker-bridge and Python run",
            ["version", "python"],
            registry=self.registry,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.mqtt_connected = Gauge(
            "broker_bridge_mqtt_connected",
            "1 while the bridge's MQTT session is up (in-process with the embedded broker), else 0",
            registry=self.registry,
        )
        self._types: set[str] = set()
        self._last_state: dict[int, CommandState] = {}
        self._summary: tuple[OpenSummary, datetime] | None = None
        self._connected = 0
        self.registry.register(_StoreCollector(self))

    def show_store(self, summary: OpenSummary, now: datetime, connected: int = 0) -> None:
        """The latest figures read from the shared store (every instance's and the CLI's commands)."""
        self._summary = (summary, now)
        self._connected = connected

    def watch_connection(self, connected: Callable[[], bool]) -> None:
        """Read the bridge's connection state at every scrape."""
        self.mqtt_connected.set_function(lambda: 1.0 if connected() else 0.0)

    def _type_label(self, command_type: str) -> str:
        if command_type in self._types or len(self._types) < MAX_TYPES:
            self._types.add(command_type)
            return command_type
        return "other"

    def command_changed(self, command: Command) -> None:
        if self._last_state.get(command.id) is command.state:
            return  # another progress report: no transition
        self.transitions.labels(command.state.value, self._type_label(command.target.command_type)).inc()
        if command.is_open:
            self._last_state[command.id] = command.state
            return
        self._last_state.pop(command.id, None)
        if command.state is CommandState.EXECUTED:
            self.latency.observe((command.updated_at - command.created_at).total_seconds())

    def outstanding_changed(self, target: Target, *, added: bool, delivery: Delivery | None = None) -> None:
        pass

    def commands_expired(self, expired: Sequence[tuple[int, Target]]) -> None:
        for command_id, target in expired:
            self._last_state.pop(command_id, None)
            self.transitions.labels(CommandState.EXPIRED.value, self._type_label(target.command_type)).inc()

    def presence_changed(self, change: PresenceChange) -> None:
        pass  # connected devices are counted in the store (show_store), for every instance's view

    def rollout_changed(self, rollout: Rollout) -> None:
        pass

    def count_received(self, kind: str) -> None:
        self.received.labels(kind).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
