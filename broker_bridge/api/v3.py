"""The native API, modelled on Enapter's v3 device commands API, plus the device registry."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from broker_bridge.api import views
from broker_bridge.api.auth import AdminKey, IdempotencyKey, invoker
from broker_bridge.commands import Command
from broker_bridge.devices import Device, Manifest
from broker_bridge.errors import BadRequest
from broker_bridge.service import CommandService
from broker_bridge.store import CommandQuery
from broker_bridge.topics import Target

router = APIRouter(prefix="/v3/devices", dependencies=[AdminKey], tags=["devices and command executions"])

DeviceId = Annotated[str, Path(min_length=1, max_length=128, description="The device id")]
Expand = Annotated[str | None, Query(description="Comma-separated extras; supported: log", max_length=100)]
MAX_WAIT_S = 60.0


def parse_label_filter(given: list[str]) -> dict[str, str]:
    """``site:lab`` pairs (split at the first colon) as the labels every listed device must carry."""
    labels: dict[str, str] = {}
    for pair in given:
        key, colon, value = pair.partition(":")
        if not colon or not key or len(pair) > 512:
            raise BadRequest(f"label: give key:value (for example site:lab), got {pair[:64]!r}")
        if labels.get(key, value) != value:
            raise BadRequest(f"label: {key!r} is asked for with two values; no device carries both")
        labels[key] = value
    return labels


class ExecutionRequest(BaseModel):
    """What to execute: a manifest command name (or alias) and its arguments."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128, description="Command name or alias")
    arguments: dict[str, Any] = Field(default_factory=dict, description="Argument names to values")
    ephemeral: StrictBool = Field(default=False, description="Hidden from default listings, deleted after 24 hours")
    ttl: float | None = Field(default=None, gt=0, description="Seconds the command stays deliverable (extension)")


class DeviceCreate(BaseModel):
    """A device to register."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(default=None, min_length=1, max_length=128, description="Generated if absent")
    app_version: str = Field(min_length=1, max_length=256)
    endpoint_token: str = Field(min_length=1, max_length=256)
    labels: dict[str, str] = Field(default_factory=dict)
    manifest: Manifest | None = None


class DeviceUpdate(BaseModel):
    """Fields to change; a field left out stays as it is, ``manifest: null`` removes the manifest."""

    model_config = ConfigDict(extra="forbid")
    app_version: str | None = Field(default=None, min_length=1, max_length=256)
    endpoint_token: str | None = Field(default=None, min_length=1, max_length=256)
    labels: dict[str, str] | None = None
    manifest: Manifest | None = None


def _service(request: Request) -> CommandService:
    service: CommandService = request.app.state.service
    return service


def _with_log(expand: str | None) -> bool:
    wanted = {part.strip() for part in (expand or "").split(",") if part.strip()}
    if wanted - {"log"}:
        raise BadRequest(f"expand: unsupported value(s) {sorted(wanted - {'log'})}; supported: log")
    return "log" in wanted


# -- devices -----------------------------------------------------------------------------------
@router.post("", status_code=201, summary="Register a device")
async def create_device(request: Request, body: DeviceCreate) -> dict[str, Any]:
    added = await _service(request).registry.add(
        device_id=body.id,
        app_version=body.app_version,
        endpoint_token=body.endpoint_token,
        labels=body.labels,
        manifest=body.manifest,
    )
    return {"device": views.device(added)}


@router.get("", summary="List devices")
async def list_devices(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    label: Annotated[
        list[str] | None,
        Query(max_length=20, description="key:value; several: the device carries all of them"),
    ] = None,
    connected: Annotated[
        bool | None,
        Query(description="true: only devices known to be connected; false: known not to be (unknown: neither)"),
    ] = None,
) -> dict[str, Any]:
    labels = parse_label_filter(label or [])
    found, total = await _service(request).registry.page(limit, offset, labels, connected)
    return {"devices": [views.device(d) for d in found], "total_count": total}


@router.get("/{device_id}", summary="Get a device")
async def get_device(request: Request, device_id: DeviceId) -> dict[str, Any]:
    return {"device": views.device(await _service(request).registry.get(device_id))}


@router.patch("/{device_id}", summary="Change a device")
async def update_device(request: Request, device_id: DeviceId, body: DeviceUpdate) -> dict[str, Any]:
    changes = {name: getattr(body, name) for name in body.model_fields_set}
    if any(changes.get(k, "") is None for k in ("app_version", "endpoint_token", "labels")):
        raise BadRequest("app_version, endpoint_token and labels cannot be null")
    updated = await _service(request).registry.update(device_id, **changes)
    return {"device": views.device(updated)}


@router.delete("/{device_id}", status_code=204, summary="Unregister a device (its history stays)")
async def delete_device(request: Request, device_id: DeviceId) -> Response:
    await _service(request).registry.delete(device_id)
    return Response(status_code=204)


# -- command executions ------------------------------------------------------------------------
def _target(device: Device, body: ExecutionRequest) -> Target:
    return Target(app_version=device.app_version, endpoint_token=device.endpoint_token, command_type=body.name)


async def _execute(request: Request, device: Device, body: ExecutionRequest, key: str | None) -> Command:
    return await _service(request).invoke(
        _target(device, body),
        body.arguments,
        body.ttl,
        ephemeral=body.ephemeral,
        idempotency_key=key,
        invoked_by=invoker(request),
    )


@router.post("/{device_id}/execute_command", summary="Execute a command and wait for its result")
async def execute_command(
    request: Request,
    device_id: DeviceId,
    body: ExecutionRequest,
    idempotency_key: IdempotencyKey = None,
    expand: Expand = None,
    wait_s: Annotated[
        float, Query(alias="timeout", ge=0, le=MAX_WAIT_S, description="Seconds to wait for the result")
    ] = 10.0,
) -> dict[str, Any]:
    with_log = _with_log(expand)
    service = _service(request)
    target = _target(await service.registry.get(device_id), body)
    command = await service.execute(
        target,
        body.arguments,
        wait_s=wait_s,
        ttl_s=body.ttl,
        ephemeral=body.ephemeral,
        idempotency_key=idempotency_key,
        invoked_by=invoker(request),
    )
    return {"execution": views.execution(command, with_log=with_log)}


@router.post("/{device_id}/command_executions", summary="Create a command execution")
async def create_execution(
    request: Request, device_id: DeviceId, body: ExecutionRequest, idempotency_key: IdempotencyKey = None
) -> dict[str, Any]:
    device = await _service(request).registry.get(device_id)
    command = await _execute(request, device, body, idempotency_key)
    return {"execution_id": str(command.id)}


class RerunRequest(BaseModel):
    """How to re-run: the TTL, if not the original's."""

    model_config = ConfigDict(extra="forbid")
    ttl: float | None = Field(default=None, gt=0, description="Seconds the re-run stays deliverable")


@router.post(
    "/{device_id}/command_executions/{execution_id}/rerun",
    summary="Re-run a command execution: a new one with the same command and arguments",
)
async def rerun_execution(
    request: Request,
    device_id: DeviceId,
    execution_id: Annotated[str, Path(max_length=32)],
    body: RerunRequest | None = None,
    expand: Expand = None,
    wait_s: Annotated[
        float, Query(alias="wait", ge=0, le=MAX_WAIT_S, description="Seconds to wait for the re-run's result")
    ] = 0.0,
) -> dict[str, Any]:
    with_log = _with_log(expand)
    service = _service(request)
    original = await service.device_command(await service.registry.get(device_id), execution_id)
    command = await service.rerun(
        original.id, body.ttl if body else None, target=original.target, invoked_by=invoker(request)
    )
    if wait_s <= 0:
        return {"execution_id": str(command.id)}
    command = await service.wait_final(command.id, wait_s)
    return {"execution_id": str(command.id), "execution": views.execution(command, with_log=with_log)}


@router.get("/{device_id}/command_executions/{execution_id}", summary="Get a command execution")
async def get_execution(
    request: Request,
    device_id: DeviceId,
    execution_id: Annotated[str, Path(max_length=32)],
    expand: Expand = None,
) -> dict[str, Any]:
    with_log = _with_log(expand)
    service = _service(request)
    device = await service.registry.get(device_id)
    command = await service.device_command(device, execution_id)
    return {"execution": views.execution(command, with_log=with_log)}


@router.get("/{device_id}/command_executions", summary="List command executions")
async def list_executions(
    request: Request,
    device_id: DeviceId,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    show: Literal["NON_EPHEMERAL", "ALL"] = "NON_EPHEMERAL",
    order: Literal["CREATED_AT_ASC", "CREATED_AT_DESC"] = "CREATED_AT_ASC",
    expand: Expand = None,
) -> dict[str, Any]:
    with_log = _with_log(expand)
    service = _service(request)
    device = await service.registry.get(device_id)
    query = CommandQuery(
        app_version=device.app_version,
        endpoint_token=device.endpoint_token,
        ephemeral=None if show == "ALL" else False,
        limit=limit,
        offset=offset,
        oldest_first=order == "CREATED_AT_ASC",
    )
    found = await service.history(query)
    return {
        "executions": [views.execution(c, with_log=with_log) for c in found],
        "total_count": await service.count(query),
    }
