"""Composition root: ``build_service`` assembles store, service and outbox for every entry point;
``serve`` adds the embedded broker, the bridge, the HTTP API and the sweepers under one TaskGroup."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import os
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import structlog

from broker_bridge import http_server
from broker_bridge.api import create_app
from broker_bridge.bridge import Bridge
from broker_bridge.broker import EmbeddedBroker, InProcessLink
from broker_bridge.broker_auth import AccessControl
from broker_bridge.config import Settings, parse_listen
from broker_bridge.console.live import LiveEvents
from broker_bridge.errors import StartupError, StoreUnavailable
from broker_bridge.metrics import Metrics
from broker_bridge.outbox import Outbox
from broker_bridge.rollout_service import RolloutService
from broker_bridge.service import Announcers, CommandService
from broker_bridge.store import CommandStore
from broker_bridge.store.postgres import InstanceLease, PostgresStore, PushLocks
from broker_bridge.store.postgres_sql import API_KEY_QUERY
from broker_bridge.store.sqlite import SqliteStore

log = structlog.get_logger(__name__)

RETENTION_SWEEP_S = 60.0
SWEEP_BATCH = 1000
# Devices' last-seen times, and commands' sent and delivered times, are written this often (one
# write for all of them).
SEEN_FLUSH_S = 1.0
# Every instance steps the active rollouts this often (one it finds locked is another's to step):
# the lag between a device's result and the next command a rate or window lets out.
ROLLOUT_STEP_S = 0.25
STORE_GAUGES_S = 5.0  # the metrics' store figures (open commands, oldest pending) are read this often
# SQLite's cost per expired row falls with the batch size (measured: 100k rows in 3.1 s by 1000,
# 0.9 s by 10000 and more), so the expiry sweep takes big bites.
EXPIRE_BATCH = 10_000
SHUTDOWN_GRACE_S = 10.0
ORPHAN_SWEEP_S = 30.0


@dataclass(frozen=True, slots=True)
class Parts:
    """What ``build_service`` assembled: the store, the service and the outbox that announces its
    changes (events and outstanding-list pushes, published by whoever holds the broker link)."""

    settings: Settings
    store: CommandStore
    service: CommandService
    outbox: Outbox
    metrics: Metrics
    postgres: PostgresStore | None
    lease: InstanceLease | None
    live: LiveEvents  # what the console's live views hear


@contextlib.asynccontextmanager
async def build_service(settings: Settings, *, serving: bool = False) -> AsyncIterator[Parts]:
    """The one place the service is put together, for ``serve``, the CLI and the device tools.

    ``serving``: a long-running instance. On SQLite it takes the database file for itself (a second
    ``serve`` on it is refused); on PostgreSQL it claims its instance name (a second instance of that
    name is refused) and its changes name it as their announcer. One-shot CLI runs do neither."""
    metrics = Metrics()
    async with AsyncExitStack() as stack:
        postgres: PostgresStore | None = None
        lease: InstanceLease | None = None
        locks: PushLocks | None = None
        store: CommandStore
        if settings.postgres:
            postgres = PostgresStore(settings.db, instance=settings.instance if serving else None)
            store = await stack.enter_async_context(postgres)
            if serving:
                lease = await stack.enter_async_context(
                    InstanceLease(settings.db, settings.instance, embedded_broker=settings.embedded)
                )
                locks = PushLocks(settings.db)
                stack.push_async_callback(locks.close)
        else:
            if serving:
                stack.enter_context(claim_sqlite(settings.db_path))
            sqlite = SqliteStore(settings.db_path, synchronous=settings.db_synchronous)
            store = await stack.enter_async_context(sqlite)
            sqlite.on_commit = metrics.batch_size.observe
        if postgres is not None:
            postgres.on_commit = metrics.batch_size.observe
        service = CommandService(
            store,
            limits=settings.limits(),
            registry_mode=settings.registry_mode,
            retained_pushes=settings.retain,
            committed_lists=locks is None,
        )
        outbox = Outbox(
            service,
            settings.topics.scheme(),
            retain=settings.retain,
            locks=locks,
            max_push_bytes=settings.max_push_bytes,
        )
        live = LiveEvents()
        service.announcer = Announcers(outbox, metrics, live)
        if postgres is not None:
            postgres.on_finished = service.finished_elsewhere
        yield Parts(settings, store, service, outbox, metrics, postgres, lease, live)


@contextlib.contextmanager
def claim_sqlite(path: Path) -> Iterator[None]:
    """Hold ``<db>.lock`` exclusively while serving: two processes serving one SQLite file would
    each take the same device messages and announce each other's changes (measured: one admin
    publish became two commands). Several instances need PostgreSQL."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot open {lock_path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(
            f"another broker-bridge is already serving {path} (it holds {lock_path}); one SQLite database "
            "serves one instance: stop the other, or run several instances on PostgreSQL "
            "(--db postgresql://..., README 'Scaling out')"
        ) from None
    try:
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a starting instance)


def check_topology(settings: Settings) -> None:
    """Refuse combinations that cannot work or would be open to anyone, naming the fix."""
    if settings.embedded and settings.mqtt_password_file is None:
        host = settings.broker_address().host
        if not _loopback(host) and not settings.allow_anonymous:
            raise StartupError(
                f"the embedded broker would listen on {host} without logins: anyone who reaches it can "
                "read every device's commands and forge results. Set mqtt_password_file (and "
                "mqtt_acl_file), or allow_anonymous = true if this network is yours alone"
            )
        log.warning(
            "mqtt_without_logins",
            listen=settings.mqtt_listen,
            hint="development only: any client can read and forge; set mqtt_password_file",
        )
    if settings.shared and settings.embedded:
        raise StartupError(
            "shared_subscriptions needs an external MQTT 5 broker (--broker-url); the embedded broker "
            "serves one instance"
        )
    if settings.shared and not settings.use_mqtt5:
        raise StartupError("shared_subscriptions needs MQTT 5 (mqtt5 = true)")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def serve(settings: Settings, on_ready: Callable[[CommandService], None] | None = None) -> None:
    """Run the service until cancelled; ``on_ready`` is called once the bridge is subscribed."""
    check_topology(settings)
    scheme = settings.topics.scheme()
    async with build_service(settings, serving=True) as parts, AsyncExitStack() as stack:
        service, outbox, metrics = parts.service, parts.outbox, parts.metrics
        http_socket = http_server.bind(*parse_listen(settings.http_listen))
        stack.callback(http_socket.close)
        keys = await _api_keys(settings, parts.postgres)
        address = settings.broker_address()
        local: InProcessLink | None = None
        if settings.embedded:
            # Our broker has no sessions yet (and none after it stops): nobody is connected.
            await _disconnect_all(service)
            stack.push_async_callback(_disconnect_all, service)
            # The bridge's session is in-process (no login); no connection may use its client id.
            embedded = await stack.enter_async_context(
                EmbeddedBroker(
                    host=address.host,
                    port=address.port,
                    bridge_client_id=settings.bridge_client_id,
                    on_endpoint_seen=service.endpoint_seen,
                    on_presence=service.presence,
                    kp1_prefix=scheme.kp1_prefix,
                    extension=scheme.extension,
                    password_file=settings.mqtt_password_file,
                    acl_file=settings.mqtt_acl_file,
                    in_process_bridge=True,
                )
            )
            local = embedded.link
        bridge = Bridge(
            service,
            outbox,
            address=address,
            scheme=scheme,
            client_id=settings.bridge_client_id,
            persistent_session=not settings.embedded,
            mqtt5=settings.use_mqtt5,
            max_payload_bytes=settings.max_payload_bytes,
            max_push_bytes=settings.max_push_bytes,
            on_reconnect=metrics.reconnects.inc,
            on_received=metrics.count_received,
            on_refused=metrics.refused.inc,
            local=local,
            share_group=settings.share_group if settings.shared else None,
        )
        metrics.watch_connection(bridge.connected.is_set)
        device_access = None
        if settings.mqtt_password_file is not None and settings.http_device_logins:
            device_access = AccessControl.from_files(
                bridge_client_id=settings.bridge_client_id,
                bridge_password=None,
                password_file=settings.mqtt_password_file,
                acl_file=settings.mqtt_acl_file,
            )
            if device_access is not None:
                stack.callback(device_access.close)
        app = create_app(
            service,
            device_access=device_access,
            api_keys=keys,
            key_names=settings.key_names,
            scheme=scheme,
            max_payload_bytes=settings.max_payload_bytes,
            metrics=metrics,
            broker_connected=bridge.connected.is_set,
            live=parts.live,
        )
        # Last: what was heard since the last flush (the store closes after this stack).
        stack.push_async_callback(_final_seen_flush, service)
        async with asyncio.TaskGroup() as tasks:
            _spawn(tasks, bridge.run(), "mqtt-bridge")
            _spawn(tasks, http_server.serve(app, http_socket), "http")
            _spawn(tasks, _sweep(service.expire_due, settings.sweep_interval_s, EXPIRE_BATCH), "expiry-sweeper")
            _spawn(tasks, _sweep(service.purge_finished, RETENTION_SWEEP_S), "retention-sweeper")
            _spawn(tasks, _every(service.flush_seen, SEEN_FLUSH_S), "last-seen")
            _spawn(tasks, _every(service.flush_delivery, SEEN_FLUSH_S), "delivery-times")
            _spawn(tasks, _every(RolloutService(service).step_all, ROLLOUT_STEP_S), "rollouts")
            _spawn(tasks, _every(partial(_read_store_gauges, service, metrics), STORE_GAUGES_S), "store-gauges")
            if parts.postgres is not None:
                _spawn(tasks, parts.postgres.listen(), "postgres-listen")
                _spawn(tasks, _adopt_orphans(parts.postgres, parts.outbox, service), "orphan-events")
            if parts.lease is not None:
                _spawn(tasks, parts.lease.keep(), "instance-lease")
            _spawn(tasks, _announce_ready(settings, bridge, lambda: on_ready and on_ready(service)), "ready")


def _spawn(tasks: asyncio.TaskGroup, coro: Coroutine[Any, Any, Any], name: str) -> None:
    """Start a service task whose failure is logged the moment it happens: the TaskGroup then stops
    the others, and the exception itself surfaces only once they all have (up to the grace)."""
    tasks.create_task(coro, name=name).add_done_callback(_report_failure)


def _report_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        error = task.exception()
        log.error("service_task_failed", task=task.get_name(), error=f"{type(error).__name__}: {error}")


async def _api_keys(settings: Settings, postgres: PostgresStore | None) -> list[str]:
    """The configured keys; without any, one generated once: in the database with PostgreSQL, so
    every instance takes the same key; next to the SQLite file otherwise."""
    if settings.api_keys or postgres is None:
        return http_server.api_keys(settings.keys, settings.api_key_file)
    key, made = await postgres.shared_secret("api_key", lambda: secrets.token_urlsafe(32))
    if made:
        read_it_with = f'psql "$DB_URL" -tAc "{API_KEY_QUERY}"'
        log.warning("api_key_generated", stored_in="the database", read_it_with=read_it_with)
    return [key]


async def _adopt_orphans(postgres: PostgresStore, outbox: Outbox, service: CommandService) -> None:
    """Publish the events an instance left unannounced when it died and did not come back (it
    would publish them itself on its return)."""
    while True:
        await asyncio.sleep(ORPHAN_SWEEP_S)
        try:
            while True:
                grace = service.clock() - timedelta(seconds=ORPHAN_SWEEP_S)
                adopted = await postgres.adopt_orphans(grace, SWEEP_BATCH)
                for command in adopted:
                    outbox.command_changed(command)
                if adopted:
                    log.info("orphan_events_adopted", count=len(adopted))
                if len(adopted) < SWEEP_BATCH:
                    break
        except StoreUnavailable as exc:
            log.error("sweep_failed", sweep="orphan-events", reason=exc.reason, retry_in_s=ORPHAN_SWEEP_S)


async def _sweep(step: Callable[[int], Awaitable[int]], interval_s: float, batch: int = SWEEP_BATCH) -> None:
    """Run a sweep step repeatedly; a full batch means more is due, so go again at once."""
    while True:
        try:
            done = await step(batch)
        except StoreUnavailable as exc:
            log.error("sweep_failed", reason=exc.reason, retry_in_s=interval_s)
            done = 0
        if done < batch:
            await asyncio.sleep(interval_s)


async def _every(step: Callable[[], Awaitable[object]], interval_s: float) -> None:
    """Run a periodic store task once per interval until cancelled (a sweep without batches)."""
    while True:
        try:
            await step()
        except StoreUnavailable as exc:
            log.error("sweep_failed", reason=exc.reason, retry_in_s=interval_s)
        await asyncio.sleep(interval_s)


async def _read_store_gauges(service: CommandService, metrics: Metrics) -> None:
    """Cheap queries (open commands only, through their partial index; a count of the devices) for
    every instance's view."""
    summary = await service.store.open_summary()
    metrics.show_store(summary, service.clock(), await service.store.count_devices(connected=True))


async def _disconnect_all(service: CommandService) -> None:
    """The embedded broker's devices are all disconnected (it is starting, or it stopped)."""
    try:
        await service.flush_presence()
        if found := await service.store.disconnect_all(service.clock()):
            log.info("presence_reset", devices=found)
    except StoreUnavailable as exc:
        log.warning("presence_not_reset", reason=exc.reason)


async def _final_seen_flush(service: CommandService) -> None:
    try:
        await asyncio.gather(service.flush_seen(), service.flush_delivery())
    except StoreUnavailable as exc:
        log.warning("last_seen_not_written", reason=exc.reason)


async def _announce_ready(settings: Settings, bridge: Bridge, ready: Callable[[], object]) -> None:
    await bridge.connected.wait()
    ready()
    address = settings.broker_address()
    log.info(
        "service_ready",
        mqtt=f"{address.host}:{address.port}",
        http=f"http://{settings.http_listen}",
        broker="embedded" if settings.embedded else "external",
        db=settings.db_description(),
        instance=settings.instance,
        client_id=settings.bridge_client_id,
        shared_subscriptions=settings.share_group if settings.shared else None,
        retained_pushes=settings.retain,
    )


async def serve_until_signalled(settings: Settings) -> None:
    """Run ``serve`` until SIGINT/SIGTERM, then stop within seconds."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    service_task = asyncio.create_task(serve(settings), name="serve")
    stop_task = asyncio.create_task(stop.wait(), name="stop-signal")
    await asyncio.wait({service_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    if service_task.done():
        stop_task.cancel()
        service_task.result()  # raises what made the service stop
        return
    log.info("shutdown_requested")
    await cancel_firmly(service_task, SHUTDOWN_GRACE_S)
    log.info("shutdown_complete")


async def cancel_firmly(task: asyncio.Task[None], grace_s: float) -> None:
    """Cancel a task and keep cancelling: aiomqtt 2.5 was seen to swallow a cancellation."""
    deadline = loop_time() + grace_s
    patience_s = 3.0  # the first cancel gets time for the final flush
    while not task.done() and loop_time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=patience_s)
        patience_s = 0.5
    if not task.done():
        log.error("shutdown_stuck", grace_s=grace_s)
        os._exit(70)  # every acknowledged change is already committed; nothing is lost
    with contextlib.suppress(asyncio.CancelledError):
        task.result()


def loop_time() -> float:
    return asyncio.get_running_loop().time()
