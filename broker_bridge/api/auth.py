"""Admin API keys: ``Authorization: Bearer <key>`` or Enapter's ``X-Enapter-Auth-Token: <key>``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from broker_bridge.errors import Unauthorized
from broker_bridge.keys import matching

_bearer = HTTPBearer(auto_error=False, description="An API key from the service's settings")
_enapter = APIKeyHeader(name="X-Enapter-Auth-Token", auto_error=False, description="The same key, Enapter style")


def valid_key(candidate: str, keys: tuple[str, ...]) -> bool:
    """Whether ``candidate`` is one of the keys (``keys.matching``: constant time)."""
    return matching(candidate, keys) is not None


ADMIN_PREFIXES = ("/v3/", "/api/v1/")


def check_key(keys: tuple[str, ...], authorization: str | None, enapter: str | None) -> str:
    """The valid key one of the headers carries; Unauthorized if none does."""
    bearer = None
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        bearer = credentials.strip() if scheme.lower() == "bearer" else None
    offered = [k for k in (bearer, enapter) if k]
    if not offered:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-Enapter-Auth-Token: <key>'")
    for candidate in offered:
        if (key := matching(candidate, keys)) is not None:
            return key
    raise Unauthorized("invalid API key")


async def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    enapter: Annotated[str | None, Depends(_enapter)],
) -> None:
    # The gate in app.py already checked the raw headers before the body was read; this dependency
    # documents the security schemes in the OpenAPI document and checks again for direct use.
    keys: tuple[str, ...] = request.app.state.api_keys
    check_key(keys, request.headers.get("authorization"), enapter)


AdminKey = Depends(require_api_key)


def invoker(request: Request) -> str | None:
    """The name of the key an admin request was made with (set by the gate in app.py)."""
    name: str | None = getattr(request.state, "invoked_by", None)
    return name
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]
