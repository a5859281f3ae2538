"""Fleet rollouts over HTTP: ``/v3/rollouts`` (our extension, in the /v3 style)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from broker_bridge.api.auth import AdminKey, invoker
from broker_bridge.rollout_service import Preview, RolloutService, parse_spec
from broker_bridge.rollouts import DeviceState, member_record, to_record

router = APIRouter(prefix="/v3/rollouts", dependencies=[AdminKey], tags=["fleet rollouts"])

RolloutId = Annotated[int, Path(ge=1, le=2**63 - 1)]
SPEC_EXAMPLE = {
    "command": {"name": "reboot", "arguments": {"delay_s": 5}},
    "target": {"labels": {"site": "lab"}},
    "rate": {"max_per_minute": 100, "max_in_flight": 20},
    "abort": [{"outcome": "ANY_FAILURE", "threshold_percent": 10, "min_executed": 50}],
    "retry": {"max_attempts": 2, "on": ["TIMEOUT"]},
    "timeout_s": 300,
}


def _rollouts(request: Request) -> RolloutService:
    return RolloutService(request.app.state.service)


@router.post("", status_code=201, summary="Create a rollout (dry_run: resolve its devices only)")
async def create_rollout(
    request: Request, body: Annotated[dict[str, Any], Body(examples=[SPEC_EXAMPLE])]
) -> Response:
    made = await _rollouts(request).create(parse_spec(body), invoked_by=invoker(request))
    if isinstance(made, Preview):
        return JSONResponse(made.record(), status_code=200)
    return JSONResponse({"rollout": to_record(made)}, status_code=201)


@router.get("", summary="List rollouts, newest first")
async def list_rollouts(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> dict[str, Any]:
    found, total = await _rollouts(request).page(limit, offset)
    return {"rollouts": [to_record(r) for r in found], "total_count": total}


@router.get("/{rollout_id}", summary="Get a rollout: counters per state, rate now, abort rule tripped")
async def get_rollout(request: Request, rollout_id: RolloutId) -> dict[str, Any]:
    return {"rollout": to_record(await _rollouts(request).get(rollout_id))}


@router.get("/{rollout_id}/devices", summary="A page of a rollout's devices and their states")
async def rollout_devices(
    request: Request,
    rollout_id: RolloutId,
    state: Annotated[list[DeviceState] | None, Query(description="Only these states (repeatable)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> dict[str, Any]:
    found, total = await _rollouts(request).members(rollout_id, frozenset(state or ()), limit, offset)
    return {"devices": [member_record(m) for m in found], "total_count": total}


@router.post("/{rollout_id}/pause", summary="Pause: nothing more is sent; what is in flight goes on")
async def pause_rollout(request: Request, rollout_id: RolloutId) -> dict[str, Any]:
    return {"rollout": to_record(await _rollouts(request).pause(rollout_id))}


@router.post("/{rollout_id}/resume", summary="Resume a paused rollout")
async def resume_rollout(request: Request, rollout_id: RolloutId) -> dict[str, Any]:
    return {"rollout": to_record(await _rollouts(request).resume(rollout_id))}


@router.post("/{rollout_id}/cancel", summary="Cancel: its open commands are cancelled, nothing more is sent")
async def cancel_rollout(request: Request, rollout_id: RolloutId) -> dict[str, Any]:
    return {"rollout": to_record(await _rollouts(request).cancel(rollout_id))}
