"""The one place HTTP errors are shaped: every 4xx/5xx is ``{"statusCode", "reasonPhrase"}``."""

from __future__ import annotations

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker_bridge.errors import BridgeError, StoreUnavailable
from broker_bridge.protocol import error_body

log = structlog.get_logger(__name__)


def error_response(status_code: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status_code, reason), status_code=status_code, headers=headers)


async def _bridge_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BridgeError)
    if isinstance(exc, StoreUnavailable):
        log.error("store_unavailable", path=request.url.path, reason=exc.reason)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return error_response(exc.status_code, exc.reason, headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
    where = ".".join(str(p) for p in first["loc"])
    status = 400 if first["type"] == "json_invalid" else 422
    return error_response(status, f"{where}: {first['msg']}")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("http_handler_failed", path=request.url.path)
    return error_response(500, "internal error; see the service log")


def install(app: FastAPI) -> None:
    app.add_exception_handler(BridgeError, _bridge_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
