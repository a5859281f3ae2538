"""Kaa's CEX REST API, for operators moving from Kaa. ``endpointId`` is the device id of the registry."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from broker_bridge import protocol
from broker_bridge.api import views
from broker_bridge.api.auth import AdminKey, IdempotencyKey, invoker
from broker_bridge.commands import Command
from broker_bridge.devices import Device
from broker_bridge.errors import BadRequest, CommandNotFound, PayloadTooLarge
from broker_bridge.service import CommandService
from broker_bridge.store import CommandQuery
from broker_bridge.topics import Codec, Target, check_command_type

router = APIRouter(prefix="/api/v1/endpoints", dependencies=[AdminKey], tags=["Kaa-compatible REST"])

EndpointId = Annotated[str, Path(alias="endpointId", min_length=1, max_length=128)]
CommandType = Annotated[str, Path(alias="commandType", min_length=1, max_length=128)]
MAX_AWAIT_S = 60
PUSH_ONCE_TTL_S = 1.0  # commandTtl=0 ("push once"): deliverable only to a device connected right now
LIST_LIMIT = 1000
BODY_DOC: dict[str, Any] = {
    "requestBody": {"required": False, "content": {"application/json": {"schema": {}}}},
}


def _service(request: Request) -> CommandService:
    service: CommandService = request.app.state.service
    return service


def _location(endpoint_id: str, command: Command) -> str:
    return f"/api/v1/endpoints/{endpoint_id}/commands/{command.target.command_type}/{command.id}"


async def _payload(request: Request) -> Any:
    data = await request.body()
    limit: int = request.app.state.max_payload_bytes
    if len(data) > limit:
        raise PayloadTooLarge(f"body of {len(data)} bytes exceeds the limit of {limit}")
    return protocol.decode(data, Codec.JSON) if data else None


@router.post(
    "/{endpointId}/commands/{commandType}",
    summary="Invoke a command; 200 with the result if it comes within awaitTimeout, else 202",
    openapi_extra=BODY_DOC,
    responses={202: {"description": "Accepted; the device has not answered yet (see Location)"}},
)
async def invoke(
    request: Request,
    endpoint_id: EndpointId,
    command_type: CommandType,
    idempotency_key: IdempotencyKey = None,
    await_timeout: Annotated[str | None, Query(alias="awaitTimeout", max_length=20, description="0-60 s")] = None,
    ttl_ms: Annotated[int | None, Query(alias="commandTtl", ge=0, le=10**12)] = None,
) -> JSONResponse:
    await_s = _await_seconds(await_timeout)
    service = _service(request)
    device = await service.registry.get(endpoint_id)
    ttl_s = None if ttl_ms is None else (ttl_ms / 1000 or PUSH_ONCE_TTL_S)
    target = Target(app_version=device.app_version, endpoint_token=device.endpoint_token, command_type=command_type)
    payload = await _payload(request)
    command = await service.execute(
        target, payload, wait_s=await_s, ttl_s=ttl_s, idempotency_key=idempotency_key, invoked_by=invoker(request)
    )
    body = views.kaa_command(command, endpoint_id)
    if command.is_open:
        return JSONResponse(body, status_code=202, headers={"Location": _location(endpoint_id, command)})
    return JSONResponse(body)


def _await_seconds(value: str | None) -> float:
    """Kaa answers a bad awaitTimeout with 400."""
    if value is None:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_AWAIT_S:
        raise BadRequest(f"awaitTimeout must be a number of seconds from 0 to {MAX_AWAIT_S}, got {value!r}")
    return seconds


@router.get("/commands", summary="Commands of one or more endpoints, optionally of some types")
async def list_commands(
    request: Request,
    endpoint_ids: Annotated[list[str], Query(alias="endpointId", min_length=1, max_length=100)],
    command_types: Annotated[str | None, Query(alias="commandTypes", max_length=2000)] = None,
) -> list[dict[str, Any]]:
    service = _service(request)
    types = _types(command_types)
    found: list[dict[str, Any]] = []
    for endpoint_id in _split(endpoint_ids):
        device = await service.registry.get(endpoint_id)
        for command in await _commands(service, device, types):
            found.append(views.kaa_command(command, endpoint_id))
    return found


def _split(values: list[str]) -> list[str]:
    return list(dict.fromkeys(part for value in values for part in value.split(",") if part))


def _types(command_types: str | None) -> list[str | None]:
    types = [t for t in (command_types or "").split(",") if t]
    for command_type in types:
        check_command_type(command_type)
    return list(types) or [None]


async def _commands(service: CommandService, device: Device, types: list[str | None]) -> list[Command]:
    found: list[Command] = []
    for command_type in types:
        query = CommandQuery(
            app_version=device.app_version,
            endpoint_token=device.endpoint_token,
            command_type=command_type,
            limit=LIST_LIMIT,
        )
        found.extend(await service.history(query))
    return sorted(found, key=lambda c: c.id)


@router.get("/{endpointId}/commands/{commandType}/last", summary="The newest command of a type")
async def last_command(request: Request, endpoint_id: EndpointId, command_type: CommandType) -> dict[str, Any]:
    service = _service(request)
    device = await service.registry.get(endpoint_id)
    check_command_type(command_type)
    newest = await _commands(service, device, [command_type])
    if not newest:
        raise CommandNotFound(f"no {command_type!r} command for endpoint {endpoint_id!r}")
    return views.kaa_command(newest[-1], endpoint_id)


async def _command(service: CommandService, endpoint_id: str, command_type: str, command_id: str) -> Command:
    device = await service.registry.get(endpoint_id)
    return await service.device_command(device, command_id, command_type)


@router.get("/{endpointId}/commands/{commandType}/{commandId}", summary="One command")
async def get_command(
    request: Request,
    endpoint_id: EndpointId,
    command_type: CommandType,
    command_id: Annotated[str, Path(alias="commandId", max_length=32)],
) -> dict[str, Any]:
    command = await _command(_service(request), endpoint_id, command_type, command_id)
    return views.kaa_command(command, endpoint_id)


@router.post(
    "/{endpointId}/commands/{commandType}/{commandId}/rerun",
    summary="Re-run a command: 200 with the result if it comes within awaitTimeout, else 202",
    responses={202: {"description": "Accepted; the device has not answered yet (see Location)"}},
)
async def rerun_command(
    request: Request,
    endpoint_id: EndpointId,
    command_type: CommandType,
    command_id: Annotated[str, Path(alias="commandId", max_length=32)],
    await_timeout: Annotated[str | None, Query(alias="awaitTimeout", max_length=20, description="0-60 s")] = None,
    ttl_ms: Annotated[int | None, Query(alias="commandTtl", ge=0, le=10**12)] = None,
) -> JSONResponse:
    await_s = _await_seconds(await_timeout)
    service = _service(request)
    original = await _command(service, endpoint_id, command_type, command_id)
    ttl_s = None if ttl_ms is None else (ttl_ms / 1000 or PUSH_ONCE_TTL_S)
    command = await service.rerun(original.id, ttl_s, target=original.target, invoked_by=invoker(request))
    if await_s > 0:
        command = await service.wait_final(command.id, await_s)
    body = views.kaa_command(command, endpoint_id)
    if command.is_open:
        return JSONResponse(body, status_code=202, headers={"Location": _location(endpoint_id, command)})
    return JSONResponse(body)


@router.delete(
    "/{endpointId}/commands/{commandType}/{commandId}",
    status_code=204,
    summary="Cancel a pending command (409 if it already finished)",
)
async def delete_command(
    request: Request,
    endpoint_id: EndpointId,
    command_type: CommandType,
    command_id: Annotated[str, Path(alias="commandId", max_length=32)],
) -> Response:
    service = _service(request)
    command = await _command(service, endpoint_id, command_type, command_id)
    await service.cancel(command.id, command.target)
    return Response(status_code=204)
