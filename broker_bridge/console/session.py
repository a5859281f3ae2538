"""Console sign-in: an API key exchanged for a signed session cookie, and CSRF tokens.

The cookie is ``<session id>.<key fingerprint>.<expiry>.<signature>``, HMAC-SHA256 under a secret
derived from the configured API keys, so every instance with the same keys accepts it and removing
a key ends the sessions opened with it. Pure functions: no I/O."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from broker_bridge.keys import fingerprint

COOKIE = "bb_session"
SESSION_S = 12 * 3600


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    csrf: str
    key_print: str  # the fingerprint of the key it was opened with: who acts through it


def _secret(keys: tuple[str, ...]) -> bytes:
    return hashlib.sha256(b"broker-bridge console\0" + b"\0".join(k.encode() for k in sorted(keys))).digest()


def _sign(keys: tuple[str, ...], text: str) -> str:
    return hmac.new(_secret(keys), text.encode(), hashlib.sha256).hexdigest()


def open_session(keys: tuple[str, ...], key: str, now: float | None = None) -> str:
    """The cookie value for a session opened with ``key`` (already checked against ``keys``)."""
    expires = int((now if now is not None else time.time()) + SESSION_S)
    body = f"{secrets.token_hex(16)}.{fingerprint(key)}.{expires}"
    return f"{body}.{_sign(keys, body)}"


def read_session(keys: tuple[str, ...], cookie: str | None, now: float | None = None) -> Session | None:
    """The session a cookie carries, or None: forged, expired, or its key no longer configured."""
    if not cookie or not keys:
        return None
    body, _, signature = cookie.rpartition(".")
    parts = body.split(".")
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    if not hmac.compare_digest(signature, _sign(keys, body)):
        return None
    sid, key_print, expires = parts
    if int(expires) < (now if now is not None else time.time()):
        return None
    if key_print not in {fingerprint(k) for k in keys}:
        return None
    return Session(sid=sid, csrf=_sign(keys, f"csrf:{sid}")[:32], key_print=key_print)


def csrf_ok(session: Session, offered: str | None) -> bool:
    return offered is not None and hmac.compare_digest(session.csrf, offered)
