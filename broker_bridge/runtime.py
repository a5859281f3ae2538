"""Composition root: store, embedded broker, bridge and sweepers under one TaskGroup."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import structlog

from broker_bridge import http_server
from broker_bridge.api import create_app
from broker_bridge.bridge import Bridge
from broker_bridge.broker import EmbeddedBroker, InProcessLink
from broker_bridge.config import Settings, parse_listen
from broker_bridge.errors import StoreUnavailable
from broker_bridge.metrics import Metrics
from broker_bridge.outbox import Outbox
from broker_bridge.service import Announcers, CommandService
from broker_bridge.store.sqlite import SqliteStore

log = structlog.get_logger(__name__)

RETENTION_SWEEP_S = 60.0
SWEEP_BATCH = 1000
# SQLite's cost per expired row falls with the batch size (measured: 100k rows in 3.1 s by 1000,
# 0.9 s by 10000 and more), so the expiry sweep takes big bites.
EXPIRE_BATCH = 10_000
SHUTDOWN_GRACE_S = 10.0


async def serve(settings: Settings, on_ready: Callable[[CommandService], None] | None = None) -> None:
    """Run the service until cancelled; ``on_ready`` is called once the bridge is subscribed."""
    scheme = settings.topics.scheme()
    metrics = Metrics()
    async with SqliteStore(settings.db, synchronous=settings.db_synchronous) as store, AsyncExitStack() as stack:
        http_socket = http_server.bind(*parse_listen(settings.http_listen))
        stack.callback(http_socket.close)
        keys = http_server.api_keys(settings.api_keys, settings.api_key_file)
        store.on_commit = metrics.batch_size.observe
        service = CommandService(
            store, limits=settings.limits(), registry_mode=settings.registry_mode, retained_pushes=settings.retain
        )
        outbox = Outbox(service, scheme, retain=settings.retain)
        service.announcer = Announcers(outbox, metrics)
        address = settings.broker_address()
        local: InProcessLink | None = None
        if settings.embedded:
            # The bridge's session is in-process (no login); no connection may use its client id.
            embedded = await stack.enter_async_context(
                EmbeddedBroker(
                    host=address.host,
                    port=address.port,
                    bridge_client_id=settings.client_id,
                    on_endpoint_seen=service.endpoint_seen,
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
            client_id=settings.client_id,
            persistent_session=not settings.embedded,
            mqtt5=settings.use_mqtt5,
            max_payload_bytes=settings.max_payload_bytes,
            on_reconnect=metrics.reconnects.inc,
            on_received=metrics.count_received,
            on_refused=metrics.refused.inc,
            local=local,
        )
        app = create_app(
            service,
            api_keys=keys,
            scheme=scheme,
            max_payload_bytes=settings.max_payload_bytes,
            metrics=metrics,
            broker_connected=bridge.connected.is_set,
        )
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(bridge.run(), name="mqtt-bridge")
            tasks.create_task(http_server.serve(app, http_socket), name="http")
            tasks.create_task(
                _sweep(service.expire_due, settings.sweep_interval_s, EXPIRE_BATCH), name="expiry-sweeper"
            )
            tasks.create_task(_sweep(service.purge_finished, RETENTION_SWEEP_S), name="retention-sweeper")
            tasks.create_task(_announce_ready(settings, bridge, lambda: on_ready and on_ready(service)), name="ready")


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


async def _announce_ready(settings: Settings, bridge: Bridge, ready: Callable[[], object]) -> None:
    await bridge.connected.wait()
    ready()
    address = settings.broker_address()
    log.info(
        "service_ready",
        mqtt=f"{address.host}:{address.port}",
        http=f"http://{settings.http_listen}",
        broker="embedded" if settings.embedded else "external",
        db=str(settings.db),
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
