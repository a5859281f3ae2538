"""The console's pages and actions, under /console (``/`` leads there).

Every page and action needs a session (``session.py``); actions are POSTs carrying the session's CSRF
token (a form field ``csrf`` or the ``X-CSRF-Token`` header that htmx sends). Actions call the same
``CommandService`` as every other path, so refusals are the same errors, shown in the page verbatim.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.templating import Jinja2Templates

from broker_bridge import protocol
from broker_bridge.api import views
from broker_bridge.api.auth import valid_key
from broker_bridge.commands import Command, CommandState, rfc3339
from broker_bridge.console import session as sessions
from broker_bridge.console.live import LiveEvents
from broker_bridge.devices import CommandSpec, Device
from broker_bridge.errors import BadRequest, BridgeError, Conflict
from broker_bridge.keys import name_by_print
from broker_bridge.service import CommandService
from broker_bridge.store import CommandQuery
from broker_bridge.topics import Codec, Target

TEMPLATES = Jinja2Templates(directory=Path(__file__).resolve().parent / "templates")
TEMPLATES.env.filters["rfc3339"] = rfc3339
PAGE = 25
KEEPALIVE_S = 15.0
router = APIRouter(include_in_schema=False)


class SignInRequired(Exception):
    """No valid session: pages redirect to the sign-in form, htmx and stream requests get 401."""


class CsrfRefused(Exception):
    pass


def _service(request: Request) -> CommandService:
    service: CommandService = request.app.state.service
    return service


def _keys(request: Request) -> tuple[str, ...]:
    keys: tuple[str, ...] = request.app.state.api_keys
    return keys


def _session(request: Request) -> sessions.Session:
    found = sessions.read_session(_keys(request), request.cookies.get(sessions.COOKIE))
    if found is None:
        raise SignInRequired
    return found


def _invoker(request: Request, session: sessions.Session) -> str:
    """Who acts through a console session: the name of the key it was opened with."""
    return name_by_print(session.key_print, request.app.state.key_names)


def _checked(request: Request, csrf: str | None) -> sessions.Session:
    """The session of a state-changing request, whose CSRF token must match it."""
    found = _session(request)
    if not sessions.csrf_ok(found, csrf or request.headers.get("x-csrf-token")):
        raise CsrfRefused
    return found


def _page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    found = sessions.read_session(_keys(request), request.cookies.get(sessions.COOKIE))
    context.setdefault("csrf", found.csrf if found else "")
    return TEMPLATES.TemplateResponse(request, name, context, status_code=status_code)


def _problem(request: Request, exc: BridgeError) -> HTMLResponse:
    """A refusal shown where the action's result would have gone, with the server's reason."""
    return _page(request, "_problem.html", exc.status_code, error=exc)


# -- sign in ---------------------------------------------------------------------------------------
@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/console/devices", status_code=303)


@router.get("/console/login")
async def login_form(request: Request) -> HTMLResponse:
    return _page(request, "login.html")


@router.post("/console/login")
async def login(request: Request, api_key: Annotated[str, Form(max_length=512)] = "") -> Response:
    keys = _keys(request)
    if not api_key or not valid_key(api_key, keys):
        return _page(request, "login.html", 401, error="That API key is not valid.")
    response = RedirectResponse("/console/devices", status_code=303)
    response.set_cookie(
        sessions.COOKIE,
        sessions.open_session(keys, api_key),
        max_age=sessions.SESSION_S,
        httponly=True,
        secure=True,
        samesite="strict",
        path="/",
    )
    return response


@router.post("/console/logout")
async def logout(request: Request, csrf: Annotated[str | None, Form()] = None) -> Response:
    _checked(request, csrf)
    response = RedirectResponse("/console/login", status_code=303)
    response.delete_cookie(sessions.COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


# -- devices ---------------------------------------------------------------------------------------
@router.get("/console/devices")
async def devices(request: Request, q: Annotated[str, Query(max_length=200)] = "") -> HTMLResponse:
    _session(request)
    found, total = await _service(request).registry.page(1000, 0)
    needle = q.strip().lower()
    if needle:
        found = [d for d in found if needle in _searchable(d)]
    return _page(request, "devices.html", devices=found, q=q, total=total)


def _searchable(device: Device) -> str:
    labels = " ".join(f"{k}={v}" for k, v in device.labels.items())
    return f"{device.device_id} {device.app_version} {device.endpoint_token} {labels}".lower()


@router.post("/console/devices")
async def register(
    request: Request,
    app_version: Annotated[str, Form(max_length=256)],
    endpoint_token: Annotated[str, Form(max_length=256)],
    device_id: Annotated[str, Form(max_length=128)] = "",
    labels: Annotated[str, Form(max_length=10_000)] = "",
    manifest: Annotated[str, Form(max_length=200_000)] = "",
    csrf: Annotated[str | None, Form()] = None,
) -> Response:
    _checked(request, csrf)
    try:
        device = await _service(request).registry.add(
            app_version=app_version,
            endpoint_token=endpoint_token,
            device_id=device_id or None,
            labels=_labels(labels),
            manifest=_json_field(manifest, "manifest") if manifest.strip() else None,
        )
    except BridgeError as exc:
        return _problem(request, exc)
    return RedirectResponse(f"/console/devices/{device.device_id}", status_code=303)


@router.post("/console/devices/{device_id}/delete")
async def delete(request: Request, device_id: str, csrf: Annotated[str | None, Form()] = None) -> Response:
    _checked(request, csrf)
    try:
        await _service(request).registry.delete(device_id)
    except BridgeError as exc:
        return _problem(request, exc)
    return RedirectResponse("/console/devices", status_code=303)


@router.post("/console/devices/{device_id}/edit")
async def edit(
    request: Request,
    device_id: str,
    labels: Annotated[str, Form(max_length=10_000)] = "",
    manifest: Annotated[str, Form(max_length=200_000)] = "",
    csrf: Annotated[str | None, Form()] = None,
) -> Response:
    _checked(request, csrf)
    changes: dict[str, Any] = {"labels": _labels(labels)}
    try:
        changes["manifest"] = _json_field(manifest, "manifest") if manifest.strip() else None
        await _service(request).registry.update(device_id, **changes)
    except BridgeError as exc:
        return _problem(request, exc)
    return RedirectResponse(f"/console/devices/{device_id}", status_code=303)


def _labels(text: str) -> dict[str, str]:
    """``key=value`` pairs, one per line or comma-separated."""
    pairs = [p.strip() for chunk in text.splitlines() for p in chunk.split(",") if p.strip()]
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BadRequest(f"labels are key=value pairs, got {pair!r}")
        labels[key.strip()] = value.strip()
    return labels


def _json_field(text: str, name: str) -> Any:
    try:
        return protocol.decode(text.encode(), Codec.JSON)
    except BridgeError as exc:
        raise BadRequest(f"{name} is not valid JSON: {exc.reason}") from None


@router.get("/console/devices/{device_id}")
async def device_page(request: Request, device_id: str) -> HTMLResponse:
    _session(request)
    try:
        device = await _service(request).registry.get(device_id)
    except BridgeError as exc:
        return _page(request, "_problem.html", exc.status_code, error=exc, standalone=True)
    commands = sorted(device.manifest.commands) if device.manifest else []
    first = commands[0] if commands else ""
    return _page(
        request,
        "device.html",
        device=device,
        commands=commands,
        manifest=_manifest_text(device),
        command_type=first,
        spec=_spec(device, first),
    )


def _spec(device: Device, command_type: str) -> CommandSpec | None:
    if device.manifest is None:
        return None
    name = device.manifest.command_for(command_type)
    return device.manifest.commands.get(name) if name else None


@router.get("/console/devices/{device_id}/arguments")
async def arguments(
    request: Request, device_id: str, command_type: Annotated[str, Query(max_length=128)] = ""
) -> HTMLResponse:
    """The argument fields of one manifest command (the form follows the chosen command type)."""
    _session(request)
    try:
        device = await _service(request).registry.get(device_id)
    except BridgeError as exc:
        return _problem(request, exc)
    return _page(request, "_arguments.html", spec=_spec(device, command_type), command_type=command_type)


def _manifest_text(device: Device) -> str:
    if device.manifest is None:
        return ""
    return json.dumps(device.manifest.model_dump(exclude_defaults=True), indent=2)


@router.post("/console/devices/{device_id}/run")
async def run(
    request: Request,
    device_id: str,
    command_type: Annotated[str, Form(max_length=128)] = "",
    body: Annotated[str, Form(max_length=1_000_000)] = "",
    ttl: Annotated[str, Form(max_length=32)] = "",
    csrf: Annotated[str | None, Form()] = None,
) -> HTMLResponse:
    """Kaa's "Run": invoke, then show the new command (its row also appears in the history)."""
    session = _checked(request, csrf)
    service = _service(request)
    try:
        device = await service.registry.get(device_id)
        spec = _spec(device, command_type)
        form = await request.form()
        if body.strip():
            payload = _json_field(body, "Command body")
        elif spec is not None:
            payload = _arguments(spec, {k[4:]: str(v) for k, v in form.multi_items() if k.startswith("arg:")})
        else:
            payload = None
        if spec is not None and spec.dangerous and form.get("confirmed") != "yes":
            raise Conflict(f"{command_type} is marked dangerous in the manifest: confirm to run it")
        ttl_s = _seconds(ttl)
        target = Target(app_version=device.app_version, endpoint_token=device.endpoint_token, command_type=command_type)
        command = await service.invoke(target, payload, ttl_s, invoked_by=_invoker(request, session))
    except BridgeError as exc:
        return _problem(request, exc)
    return _page(request, "_created.html", 201, command=command)


def _arguments(spec: CommandSpec, fields: dict[str, str]) -> dict[str, Any]:
    """The payload from the generated fields: each converted to its manifest type (the manifest
    check in ``invoke`` then applies its bounds and enums, with its own errors); empty ones left out."""
    payload: dict[str, Any] = {}
    for name, text in fields.items():
        arg = spec.arguments.get(name)
        if arg is None or text == "":
            continue
        try:
            if arg.enum or arg.type in ("object", "array", "boolean"):
                payload[name] = protocol.decode(text.encode(), Codec.JSON)
            elif arg.type == "integer":
                payload[name] = int(text)
            elif arg.type == "float":
                payload[name] = float(text)
            else:
                payload[name] = text
        except (ValueError, BridgeError):
            raise BadRequest(f"{name}: expected {arg.type}, got {text!r}") from None
    return payload


def _seconds(text: str) -> float | None:
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"Maximum command retention for delivery must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise BadRequest("Maximum command retention for delivery must be more than 0 seconds")
    return value


@router.get("/console/devices/{device_id}/history")
async def history(
    request: Request,
    device_id: str,
    state: Annotated[str, Query(max_length=20)] = "",
    command_type: Annotated[str, Query(alias="type", max_length=128)] = "",
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> HTMLResponse:
    _session(request)
    service = _service(request)
    try:
        device = await service.registry.get(device_id)
        query = _query(device.app_version, device.endpoint_token, state, command_type, offset)
    except BridgeError as exc:
        return _problem(request, exc)
    found = await service.history(query)
    total = await service.count(query)
    return _page(request, "_history.html", rows=[_row(c) for c in found], device=device, total=total,
                 offset=offset, page=PAGE, state=state, type=command_type, base=f"/console/devices/{device_id}/history")


def _query(app_version: str | None, token: str | None, state: str, command_type: str, offset: int) -> CommandQuery:
    states: frozenset[CommandState] = frozenset()
    if state:
        try:
            states = frozenset({CommandState(state)})
        except ValueError:
            raise BadRequest(f"unknown state {state!r}; one of {', '.join(s.value for s in CommandState)}") from None
    return CommandQuery(
        app_version=app_version,
        endpoint_token=token,
        command_type=command_type or None,
        states=states,
        limit=PAGE,
        offset=offset,
    )


def _row(command: Command) -> dict[str, Any]:
    return {
        "id": command.id,
        "type": command.target.command_type,
        "state": command.state.value,
        "kaa_state": views.kaa_state(command),
        "created": rfc3339(command.created_at),
        "updated": rfc3339(command.updated_at),
        "status_code": command.status_code,
        "reason": command.reason_phrase,
        "token": command.target.endpoint_token,
        "app_version": command.target.app_version,
    }


@router.get("/console/executions")
async def executions(
    request: Request,
    state: Annotated[str, Query(max_length=20)] = "",
    command_type: Annotated[str, Query(alias="type", max_length=128)] = "",
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    partial: bool = False,
) -> HTMLResponse:
    """Every device's commands in one live table."""
    _session(request)
    service = _service(request)
    try:
        query = _query(None, None, state, command_type, offset)
    except BridgeError as exc:
        return _problem(request, exc)
    found = await service.history(query)
    context: dict[str, Any] = {
        "rows": [_row(c) for c in found],
        "total": await service.count(query),
        "offset": offset,
        "page": PAGE,
        "state": state,
        "type": command_type,
        "base": "/console/executions?partial=1",
        "fleet": True,
    }
    return _page(request, "_history.html" if partial else "executions.html", 200, **context)


# -- one command -----------------------------------------------------------------------------------
async def _device_command(service: CommandService, command_id: int) -> tuple[Command, Device | None]:
    command = await service.get(command_id)
    device = await service.store.device_for(command.target.app_version, command.target.endpoint_token)
    return command, device


def _command_view(request: Request, command: Command, device: Device | None, status_code: int = 200) -> HTMLResponse:
    record = views.execution(command, with_log=True)
    log = [
        {"at": rfc3339(r.received_at), "code": r.status_code, "reason": r.reason_phrase,
         "payload": json.dumps(r.payload, indent=2, ensure_ascii=False)}
        for r in command.log
    ]  # fmt: skip
    return _page(
        request,
        "_command.html",
        status_code,
        command=command,
        row=_row(command),
        record=record,
        device=device,
        request_payload=json.dumps(command.payload, indent=2, ensure_ascii=False),
        result_payload=json.dumps(command.result_payload, indent=2, ensure_ascii=False),
        expires=rfc3339(command.expires_at),
        ttl_s=round((command.expires_at - command.created_at).total_seconds(), 3),
        log=log,
    )


@router.get("/console/commands/{command_id}")
async def command(request: Request, command_id: int) -> HTMLResponse:
    _session(request)
    try:
        found, device = await _device_command(_service(request), command_id)
    except BridgeError as exc:
        return _problem(request, exc)
    return _command_view(request, found, device)


@router.post("/console/commands/{command_id}/rerun")
async def rerun(request: Request, command_id: int, csrf: Annotated[str | None, Form()] = None) -> HTMLResponse:
    session = _checked(request, csrf)
    service = _service(request)
    try:
        again = await service.rerun(command_id, invoked_by=_invoker(request, session))
        _, device = await _device_command(service, again.id)
    except BridgeError as exc:
        return _problem(request, exc)
    return _command_view(request, again, device, status_code=201)


@router.post("/console/commands/{command_id}/cancel")
async def cancel(request: Request, command_id: int, csrf: Annotated[str | None, Form()] = None) -> HTMLResponse:
    _checked(request, csrf)
    service = _service(request)
    try:
        cancelled = await service.cancel(command_id)
        _, device = await _device_command(service, command_id)
    except BridgeError as exc:
        return _problem(request, exc)
    return _command_view(request, cancelled, device)


# -- live updates ----------------------------------------------------------------------------------
@router.get("/console/events")
async def events(request: Request, device: Annotated[str, Query(max_length=128)] = "") -> Response:
    """Server-sent events: ``changed`` (data: a command id) whenever a command of this device (or of
    any device) changes on this instance; a comment every 15 s keeps proxies from closing it."""
    _session(request)
    service = _service(request)
    endpoint: tuple[str, str] | None = None
    if device:
        try:
            found = await service.registry.get(device)
        except BridgeError as exc:
            return _problem(request, exc)
        endpoint = (found.app_version, found.endpoint_token)
    live: LiveEvents = request.app.state.live
    listener = live.listen(endpoint)

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield b": connected\n\n"
            while True:
                try:
                    command_id = await asyncio.wait_for(listener.queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                yield f"event: changed\ndata: {command_id}\n\n".encode()
        finally:
            live.forget(listener)

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


# -- refusals ----------------------------------------------------------------------------------------
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)


def install(app: FastAPI) -> None:
    """The console's routes, its refusals and its security headers (nothing loads from elsewhere)."""
    app.include_router(router)

    @app.exception_handler(SignInRequired)
    async def sign_in(request: Request, exc: SignInRequired) -> Response:
        if request.headers.get("hx-request") or request.url.path.startswith("/console/events"):
            return Response("sign in first", status_code=401, headers={"HX-Redirect": "/console/login"})
        return RedirectResponse("/console/login", status_code=303)

    @app.exception_handler(CsrfRefused)
    async def csrf_refused(request: Request, exc: CsrfRefused) -> Response:
        return HTMLResponse(
            '<p role="alert" class="error">Error 403: the form is stale (CSRF token missing or wrong); '
            "reload the page and try again.</p>",
            status_code=403,
        )

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        if request.url.path == "/" or request.url.path.startswith("/console"):
            response.headers["Content-Security-Policy"] = CSP
            response.headers["X-Content-Type-Options"] = "nosniff"
            response.headers["Referrer-Policy"] = "same-origin"
            response.headers.setdefault("Cache-Control", "no-store")
        return response
