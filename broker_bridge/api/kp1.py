"""The KP1 HTTP binding, for devices that cannot keep a connection: poll and report over POST.

Devices authenticate by their endpoint token, as in Kaa (no API key); in closed registry mode an
unknown token gets 404. Errors carry the KP1 error body with the matching HTTP status.
"""

from __future__ import annotations

import base64
import contextlib
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response
from starlette.background import BackgroundTask

from broker_bridge import cep, protocol
from broker_bridge.broker_auth import Access, AccessControl
from broker_bridge.errors import BridgeError, CommandNotFound, Forbidden, PayloadTooLarge, Unauthorized
from broker_bridge.service import CommandService
from broker_bridge.topics import Codec, Format, Resource, make_target

log = structlog.get_logger(__name__)
BASIC = {"WWW-Authenticate": 'Basic realm="kp1 devices"'}

MSGPACK_TYPE = "application/msgpack"
router = APIRouter(prefix="/kp1/{app_version}/{extension}/{token}", tags=["KP1 device binding"])

Level = Annotated[str, Path(min_length=1, max_length=256)]
FormatLevel = Annotated[str, Path(pattern="^(json|msgpack)$", description="KP1 payload format")]
# The body is read raw, so that JSON and MessagePack go through the same codec (and errors) as MQTT.
BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {"schema": {}},
            MSGPACK_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


async def _body(request: Request) -> bytes:
    data = await request.body()
    limit: int = request.app.state.max_payload_bytes
    if len(data) > limit:
        raise PayloadTooLarge(f"body of {len(data)} bytes exceeds the limit of {limit}")
    return data


def _check_extension(request: Request, extension: str) -> None:
    if extension != request.app.state.scheme.extension:
        raise CommandNotFound(f"unknown extension {extension!r}")


async def _delivered(service: CommandService, command_ids: list[int]) -> None:
    service.handed(command_ids, received=True)


def _reply(body: Any, fmt: Format, status: int = 200) -> Response:
    headers = BASIC if status == Unauthorized.status_code else None
    if fmt.codec is Codec.MSGPACK:
        encoded = protocol.encode(body, Codec.MSGPACK)
        return Response(encoded, status_code=status, media_type=MSGPACK_TYPE, headers=headers)
    return JSONResponse(body, status_code=status, headers=headers)


async def _device_login(request: Request, topic: str) -> None:
    """With MQTT logins configured, an HTTP device proves who it is as over MQTT: HTTP Basic with
    its account of the password file, and the ACL must let that account publish the equivalent
    KP1 topic. The token alone is not a secret (it is also the MQTT user name)."""
    access: AccessControl | None = request.app.state.device_access
    if access is None:
        return
    scheme, _, encoded = (request.headers.get("authorization") or "").partition(" ")
    username = password = None
    if scheme.lower() == "basic":
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            username, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    if username is None:
        raise Unauthorized("this service requires device logins: send HTTP Basic with the device's MQTT account")
    principal = await access.login(client_id=f"http-{username}", username=username, password=password)
    if principal is None:
        log.warning("http_device_login_refused", username=username[:64])
        raise Unauthorized("bad device credentials")
    if not access.permits(principal, Access.PUBLISH, topic):
        log.warning("http_device_access_refused", username=username[:64], topic=topic[:200])
        raise Forbidden(f"account {username!r} may not use this endpoint")


async def _command(request: Request, app_version: str, extension: str, token: str, kind: str, fmt: Format) -> Response:
    try:
        _check_extension(request, extension)
        service: CommandService = request.app.state.service
        target = make_target(app_version, token, kind)
        await _device_login(request, request.app.state.scheme.device_topic(Resource.COMMAND, target, fmt))
        items = await cep.poll(service, target, fmt, await _body(request))
        response = _reply(items, fmt)
        # Once the response is written, the device has them: their proof of delivery.
        response.background = BackgroundTask(_delivered, service, [item["id"] for item in items])
        return response
    except BridgeError as exc:  # every body on a /msgpack path is MessagePack, errors too
        return _reply(protocol.error_body(exc.status_code, exc.reason), fmt, exc.status_code)


async def _result(request: Request, app_version: str, extension: str, token: str, kind: str, fmt: Format) -> Response:
    try:
        _check_extension(request, extension)
        service: CommandService = request.app.state.service
        target = make_target(app_version, token, kind)
        await _device_login(request, request.app.state.scheme.device_topic(Resource.RESULT, target, fmt))
        reply = await cep.results(service, target, fmt, await _body(request))
    except BridgeError as exc:
        reply = protocol.error_body(exc.status_code, exc.reason)
    return _reply(reply, fmt, reply["statusCode"])


@router.post(
    "/command/{command_type}",
    summary='Poll outstanding commands (body {} or {"observe": bool})',
    openapi_extra=BODY_DOC,
)
async def poll(request: Request, app_version: Level, extension: Level, token: Level, command_type: Level) -> Response:
    return await _command(request, app_version, extension, token, command_type, Format.PLAIN)


@router.post("/command/{command_type}/{fmt}", summary="Poll, with an explicit payload format", openapi_extra=BODY_DOC)
async def poll_format(
    request: Request,
    app_version: Level,
    extension: Level,
    token: Level,
    command_type: Level,
    fmt: FormatLevel,
) -> Response:
    return await _command(request, app_version, extension, token, command_type, Format(fmt))


@router.post(
    "/result/{command_type}", summary="Report results (an array, or one result object)", openapi_extra=BODY_DOC
)
async def report(request: Request, app_version: Level, extension: Level, token: Level, command_type: Level) -> Response:
    return await _result(request, app_version, extension, token, command_type, Format.PLAIN)


@router.post(
    "/result/{command_type}/{fmt}", summary="Report results, with an explicit payload format", openapi_extra=BODY_DOC
)
async def report_format(
    request: Request,
    app_version: Level,
    extension: Level,
    token: Level,
    command_type: Level,
    fmt: FormatLevel,
) -> Response:
    return await _result(request, app_version, extension, token, command_type, Format(fmt))
