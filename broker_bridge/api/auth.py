"""Admin API keys: ``Authorization: Bearer <key>`` or Enapter's ``X-Enapter-Auth-Token: <key>``."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from broker_bridge.errors import Unauthorized

_bearer = HTTPBearer(auto_error=False, description="An API key from the service's settings")
_enapter = APIKeyHeader(name="X-Enapter-Auth-Token", auto_error=False, description="The same key, Enapter style")


def valid_key(candidate: str, keys: tuple[str, ...]) -> bool:
    """Whether ``candidate`` is one of the keys: compared with every key in constant time, so timing
    tells nothing about near misses."""
    return any([hmac.compare_digest(candidate.encode(), key.encode()) for key in keys])


ADMIN_PREFIXES = ("/v3/", "/api/v1/")


def check_key(keys: tuple[str, ...], authorization: str | None, enapter: str | None) -> None:
    """Unauthorized unless one of the headers carries a valid key."""
    bearer = None
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        bearer = credentials.strip() if scheme.lower() == "bearer" else None
    offered = [k for k in (bearer, enapter) if k]
    if not offered:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-Enapter-Auth-Token: <key>'")
    if not any(valid_key(k, keys) for k in offered):
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
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]
