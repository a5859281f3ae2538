"""The one exception tree of broker-bridge.

    BridgeError                      root; carries an HTTP-style ``status_code`` and a ``reason``
     +-- BadRequest (400)            malformed payload, wrong shape, bad topic, bad argument
     |    +-- PayloadTooLarge (413)  body over the configured size limit
     |    +-- Unprocessable (422)    well-formed, but the device's manifest does not allow it
     +-- Unauthorized (401)          no valid API key
     +-- CommandNotFound (404)       no such command for this endpoint and type
     +-- DeviceNotFound (404)        no such device (or, in closed registry mode, an unknown token)
     +-- Conflict (409)              the change contradicts what is stored
     |    +-- CommandFinished (409)  the command already reached a final state
     +-- LimitExceeded (429)         a configured limit (e.g. outstanding commands per endpoint) is reached
     +-- StoreUnavailable (503)      the database cannot be read or written right now
     +-- StartupError                the service cannot start (port taken, bad configuration)

Library errors (sqlite3, aiomqtt, amqtt, pydantic) are translated into this tree at exactly one
boundary each; the edges (MQTT, CLI) map it to KP1 error bodies and exit messages.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Root of every error broker-bridge raises on purpose."""

    status_code: int = 500

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadRequest(BridgeError):
    """The request is malformed: bad JSON/MessagePack, wrong shape, bad topic or value."""

    status_code = 400


class PayloadTooLarge(BadRequest):
    """The body is larger than the configured maximum."""

    status_code = 413


class Unprocessable(BadRequest):
    """The request is well-formed but the device's manifest does not allow it."""

    status_code = 422


class Unauthorized(BridgeError):
    """The request carries no valid API key."""

    status_code = 401


class Forbidden(BridgeError):
    """Logged in, but not allowed this (the ACL refuses the account the endpoint)."""

    status_code = 403


class RolloutNotFound(BridgeError):
    """No such rollout."""

    status_code = 404


class DeviceNotFound(BridgeError):
    """No such device; in closed registry mode also an endpoint token nobody registered."""

    status_code = 404


class Conflict(BridgeError):
    """The change contradicts what is stored (a duplicate device id or endpoint, say)."""

    status_code = 409


class CommandNotFound(BridgeError):
    """No command with this id exists for the endpoint and command type in the request."""

    status_code = 404


class CommandFinished(Conflict):
    """The command is already executed, expired or cancelled; nothing was changed."""

    status_code = 409


class LimitExceeded(BridgeError):
    """A configured limit is reached; the reason names the setting."""

    status_code = 429


class StoreUnavailable(BridgeError):
    """The store failed (locked, read-only, disk full); the request changed nothing."""

    status_code = 503


class StartupError(BridgeError):
    """The service cannot start; the reason names the fix."""
