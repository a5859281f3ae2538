"""The FastAPI application: the routers, the error shape, and what they share."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker_bridge import __version__
from broker_bridge.api import docs, errors, kaa, kp1, ops, rollouts, v3
from broker_bridge.api.auth import ADMIN_PREFIXES, check_key
from broker_bridge.api.errors import error_response
from broker_bridge.broker_auth import AccessControl
from broker_bridge.console import rollout_routes as console_rollouts
from broker_bridge.console import routes as console_routes
from broker_bridge.console.live import LiveEvents
from broker_bridge.errors import BridgeError, PayloadTooLarge
from broker_bridge.keys import name_of
from broker_bridge.metrics import Metrics
from broker_bridge.service import CommandService
from broker_bridge.topics import TopicScheme

DESCRIPTION = """\
Command execution for device fleets. Devices poll and report over the KP1 HTTP binding (`/kp1/...`,
authenticated by their endpoint token); operators use the Enapter-style `/v3` API or Kaa's
`/api/v1` REST API with an API key (`Authorization: Bearer <key>` or `X-Enapter-Auth-Token: <key>`).
Every error is `{"statusCode": ..., "reasonPhrase": ...}`."""


class Gate:
    """Runs before FastAPI reads a body: refuses admin requests without a valid key (401) and bodies
    over ``max_payload_bytes`` (413), and reads ``curl -d`` bodies (labelled as forms, as in Enapter's
    and Kaa's examples) as JSON. The API has no form endpoints, so the relabelling only ever turns a
    refusal into the intended request."""

    def __init__(
        self, app: ASGIApp, *, api_keys: tuple[str, ...], key_names: Mapping[str, str], max_payload_bytes: int
    ) -> None:
        self.app = app
        self.api_keys = api_keys
        self.key_names = key_names
        self.max_payload_bytes = max_payload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        try:
            key = self._check(scope["path"], headers)
        except BridgeError as exc:
            extra = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
            await error_response(exc.status_code, exc.reason, extra)(scope, receive, send)
            return
        if scope["path"].startswith(CONSOLE):  # the console's forms are forms
            await self.app(scope, self._limited(receive), send)
            return
        relabelled = [
            (n, b"application/json" if n == b"content-type" and v.startswith(FORM) else v) for n, v in scope["headers"]
        ]
        changed: dict[str, Any] = {"headers": relabelled}
        if key is not None:  # who asks: request.state.invoked_by (recorded as a command's invokedBy)
            changed["state"] = {**scope.get("state", {}), "invoked_by": name_of(key, self.key_names)}
        await self.app({**scope, **changed}, self._limited(receive), send)

    def _check(self, path: str, headers: dict[str, str]) -> str | None:
        """The admin key of an admin request (None for the others); the errors that refuse it."""
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_payload_bytes:
            raise PayloadTooLarge(f"body of {length} bytes exceeds the limit of {self.max_payload_bytes}")
        if path.startswith(ADMIN_PREFIXES):
            return check_key(self.api_keys, headers.get("authorization"), headers.get("x-enapter-auth-token"))
        return None

    def _limited(self, receive: Receive) -> Receive:
        """Also bound bodies sent without Content-Length (chunked)."""
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_payload_bytes:
                # An HTTPException: FastAPI re-raises it from body parsing (413), where any other
                # error became 400 "There was an error parsing the body" on the /v3 routes.
                raise HTTPException(413, f"body exceeds the limit of {self.max_payload_bytes} bytes")
            return message

        return limited


FORM = b"application/x-www-form-urlencoded"
CONSOLE = "/console/"


def create_app(
    service: CommandService,
    *,
    api_keys: Sequence[str],
    key_names: Mapping[str, str] | None = None,
    scheme: TopicScheme,
    max_payload_bytes: int,
    metrics: Metrics,
    broker_connected: Callable[[], bool],
    live: LiveEvents | None = None,
    device_access: AccessControl | None = None,
) -> FastAPI:
    """``live``: the announcer the console's live views listen to (one that hears nothing if None).
    ``key_names``: the names of the keys (by ``keys.fingerprint``; see ``keys.name_by_print``)."""
    app = FastAPI(
        title="broker-bridge", version=__version__, description=DESCRIPTION, docs_url=None, redoc_url=None
    )
    app.state.service = service
    app.state.api_keys = tuple(api_keys)
    app.state.key_names = dict(key_names or {})
    app.state.device_access = device_access  # logins the KP1 HTTP binding requires (None: none)
    app.state.scheme = scheme
    app.state.max_payload_bytes = max_payload_bytes
    app.state.metrics = metrics
    app.state.broker_connected = broker_connected
    app.state.live = live if live is not None else LiveEvents()
    errors.install(app)
    app.add_middleware(
        Gate, api_keys=tuple(api_keys), key_names=app.state.key_names, max_payload_bytes=max_payload_bytes
    )
    for router in (kp1.router, v3.router, rollouts.router, kaa.router, ops.router):
        app.include_router(router)
    docs.install(app)
    console_routes.install(app)
    app.include_router(console_rollouts.router)
    return app
