"""Operations endpoints: liveness, readiness and Prometheus metrics. No API key needed."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from broker_bridge.errors import BridgeError

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


PROBE_S = 1.0  # one write probe per second at most, however often /readyz is asked


@router.get("/readyz", summary="The store commits a write and the broker is connected")
async def readyz(request: Request) -> JSONResponse:
    broker = "connected" if request.app.state.broker_connected() else "disconnected"
    checks = {"store": await _store_check(request), "broker": broker}
    ready = checks == {"store": "ok", "broker": "connected"}
    return JSONResponse({"status": "ready" if ready else "not ready", **checks}, status_code=200 if ready else 503)


async def _store_check(request: Request) -> str:
    """"ok" if the store committed a write (it read fine while every write failed, measured: disk
    full, unwritable WAL, a malformed database); cached for PROBE_S."""
    state = request.app.state
    cached: tuple[float, str] | None = getattr(state, "store_probe", None)
    now = time.monotonic()
    if cached is not None and now - cached[0] < PROBE_S:
        return cached[1]
    service = state.service
    try:
        await service.store.check_writable(service.clock())
        verdict = "ok"
    except BridgeError as exc:
        verdict = exc.reason
    state.store_probe = (now, verdict)
    return verdict


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
