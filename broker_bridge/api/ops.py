"""Operations endpoints: liveness, readiness and Prometheus metrics. No API key needed."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from broker_bridge.errors import BridgeError

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get("/readyz", summary="The store answers and the broker is connected")
async def readyz(request: Request) -> JSONResponse:
    checks = {"store": "ok", "broker": "connected" if request.app.state.broker_connected() else "disconnected"}
    try:
        await request.app.state.service.store.count_devices()
    except BridgeError as exc:
        checks["store"] = exc.reason
    ready = checks == {"store": "ok", "broker": "connected"}
    return JSONResponse({"status": "ready" if ready else "not ready", **checks}, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
