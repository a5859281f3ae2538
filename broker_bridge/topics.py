"""Build and parse every MQTT topic broker-bridge uses. Pure: no I/O.

Device side (Kaa KP1, extension ``cex``)::

    kp1/{av}/cex/{token}/command/{type}[/{format}][/{requestId}]      device -> bridge (poll/observe)
    kp1/{av}/cex/{token}/result/{type}[/{format}][/{requestId}]       device -> bridge (results)
    <request topic>/status | /error                                   bridge -> device (replies)
    kp1/{av}/cex/{token}/command/{type}[/{format}]/status             bridge -> device (pushes)

``{format}`` is the KP1 payload format specifier: absent or ``json`` for JSON, ``msgpack`` for
MessagePack. Admin side::

    {admin}/{av}/{token}/invoke/{type}[/{requestId}]
    {admin}/{av}/{token}/cancel/{type}/{commandId}[/{requestId}]
    {events}/{av}/{token}/{type}/{commandId}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from broker_bridge.errors import BadRequest

COMMAND_TYPE_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
REPLY_LEVELS = frozenset({"status", "error"})
PRESENCE = "presence"  # kp1/{av}/cex/{token}/presence: a device's birth and death messages
ROLLOUTS = "rollouts"  # {admin}/rollouts/create[/{rid}]: a fleet rollout over MQTT
_MAX_ID_DIGITS = 18  # keeps ids inside a signed 64-bit integer


class Resource(StrEnum):
    """The two CEX resources a device addresses."""

    COMMAND = "command"  # poll / observe the outstanding commands of one type
    RESULT = "result"  # report execution results


class Codec(StrEnum):
    """Wire encodings of CEP bodies."""

    JSON = "json"
    MSGPACK = "msgpack"


class Format(StrEnum):
    """The KP1 payload format specifier as it appears in a topic (``PLAIN``: none given)."""

    PLAIN = ""  # Kaa's default topics: JSON
    JSON = "json"
    MSGPACK = "msgpack"

    @property
    def codec(self) -> Codec:
        return Codec.MSGPACK if self is Format.MSGPACK else Codec.JSON


class AdminAction(StrEnum):
    """Operations on the admin topic tree."""

    INVOKE = "invoke"
    CANCEL = "cancel"
    RERUN = "rerun"


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """Where a command goes: one command type of one endpoint of one app version."""

    app_version: str
    endpoint_token: str
    command_type: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceRequest:
    """A parsed device publish on the KP1 CEX tree."""

    topic: str
    resource: Resource
    target: Target
    format: Format
    request_id: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminRequest:
    """A parsed publish on the admin topic tree."""

    topic: str
    action: AdminAction
    target: Target
    command_id: int | None
    request_id: int | None


class TopicError(BadRequest):
    """A topic in our tree that does not follow the scheme; ``reply_topic`` if one is possible."""

    def __init__(self, reason: str, reply_topic: str | None, codec: Codec = Codec.JSON) -> None:
        super().__init__(reason)
        self.reply_topic = reply_topic
        self.codec = codec  # a /msgpack request gets its error in MessagePack even if the topic is bad


def status_topic(request_topic: str) -> str:
    return f"{request_topic}/status"


def error_topic(request_topic: str) -> str:
    return f"{request_topic}/error"


def parse_positive_int(level: str) -> int | None:
    """A KP1 request ID / command ID level: a positive decimal integer, else None."""
    if not level.isascii() or not level.isdigit() or len(level) > _MAX_ID_DIGITS:
        return None
    value = int(level)
    return value if value > 0 else None


MAX_NAME = 256  # characters of an endpoint token or app version, on every path (HTTP caps path levels so)


def check_endpoint_token(token: str) -> None:
    if len(token) > MAX_NAME:
        raise BadRequest(f"endpoint token of {len(token)} characters: at most {MAX_NAME}")
    if not token or any(ch in token for ch in "+#/.") or "\x00" in token:
        raise BadRequest(f"invalid endpoint token {token!r}: must be non-empty without + # / .")


def check_app_version(app_version: str) -> None:
    if len(app_version) > MAX_NAME:
        raise BadRequest(f"app version of {len(app_version)} characters: at most {MAX_NAME}")
    if not app_version or any(ch in app_version for ch in "+#/") or "\x00" in app_version:
        raise BadRequest(f"invalid app version {app_version!r}: must be non-empty without + # /")


def check_command_type(command_type: str) -> None:
    if not COMMAND_TYPE_RE.fullmatch(command_type):
        raise BadRequest(f"invalid command type {command_type!r}: use 1-128 of [A-Za-z0-9_-]")
    if command_type in REPLY_LEVELS:
        # kp1/.../command/status would read as the reply topic of a request.
        raise BadRequest(f"command type {command_type!r} is reserved: KP1 uses it for replies")


def make_target(app_version: str, endpoint_token: str, command_type: str) -> Target:
    """A validated Target; raises BadRequest naming the bad part."""
    check_app_version(app_version)
    check_endpoint_token(endpoint_token)
    check_command_type(command_type)
    return Target(app_version=app_version, endpoint_token=endpoint_token, command_type=command_type)


def _split_request_id(levels: list[str]) -> tuple[list[str], int | None]:
    if levels and (rid := parse_positive_int(levels[-1])) is not None:
        return levels[:-1], rid
    return levels, None


def _reply_for(topic: str, levels: list[str]) -> str | None:
    """Where an error about this topic can go: only when it carries a request ID."""
    return error_topic(topic) if levels and parse_positive_int(levels[-1]) is not None else None


def _admin_reply_for(topic: str, rest: list[str]) -> str | None:
    """In .../cancel/{type}/{id} (and rerun) the last number is the command ID; a request ID comes after it."""
    if rest[2:3] in ([AdminAction.CANCEL.value], [AdminAction.RERUN.value]) and len(rest) < 6:
        return None
    return _reply_for(topic, rest)


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicScheme:
    """The configurable prefixes of every topic tree."""

    kp1_prefix: str = "kp1"
    extension: str = "cex"
    admin_prefix: str = "cex/admin"
    events_prefix: str = "cex/events"

    # -- subscriptions -------------------------------------------------------------------------
    def bridge_filters(self, *, presence: bool = False) -> list[str]:
        """What the bridge subscribes to; with ``presence``, devices' presence topics too."""
        base = f"{self.kp1_prefix}/+/{self.extension}/+"
        filters = [f"{base}/command/#", f"{base}/result/#", f"{self.admin_prefix}/#"]
        return [*filters, f"{base}/{PRESENCE}"] if presence else filters

    def presence_topic(self, app_version: str, endpoint_token: str) -> str:
        """Where a device on an external broker says it is connected (birth) or not (Last Will)."""
        return f"{self.endpoint_base(app_version, endpoint_token)}/{PRESENCE}"

    def parse_presence(self, topic: str) -> tuple[str, str] | None:
        """(app version, token) of a device presence topic; None for any other topic."""
        levels = topic.split("/")
        prefix_levels = self.kp1_prefix.split("/")
        n = len(prefix_levels)
        if len(levels) != n + 4 or levels[:n] != prefix_levels or levels[n + 1] != self.extension:
            return None
        if levels[n + 3] != PRESENCE:
            return None
        target = make_target(levels[n], levels[n + 2], "presence")  # checks the app version and token
        return target.app_version, target.endpoint_token

    # -- device tree ---------------------------------------------------------------------------
    def endpoint_base(self, app_version: str, endpoint_token: str) -> str:
        return f"{self.kp1_prefix}/{app_version}/{self.extension}/{endpoint_token}"

    def device_topic(self, resource: Resource, target: Target, fmt: Format = Format.PLAIN) -> str:
        base = self.endpoint_base(target.app_version, target.endpoint_token)
        suffix = f"/{fmt.value}" if fmt is not Format.PLAIN else ""
        return f"{base}/{resource.value}/{target.command_type}{suffix}"

    def push_topic(self, target: Target, fmt: Format = Format.PLAIN) -> str:
        """Where outstanding-command lists are pushed (the poll reply topic without request ID)."""
        return status_topic(self.device_topic(Resource.COMMAND, target, fmt))

    def parse_device(self, topic: str) -> DeviceRequest | None:
        """Parse a publish on the KP1 tree; None for our own replies and foreign topics."""
        levels = topic.split("/")
        if levels[-1] in REPLY_LEVELS:
            return None
        prefix_levels = self.kp1_prefix.split("/")
        n = len(prefix_levels)
        if levels[:n] != prefix_levels or len(levels) < n + 5 or levels[n + 1] != self.extension:
            return None
        try:
            return self._parse_device_levels(topic, levels[n], levels[n + 2], levels[n + 3 :])
        except TopicError:
            raise
        except BadRequest as exc:
            # The format specifier is the level right after the command type.
            codec = Codec.MSGPACK if levels[n + 5 : n + 6] == [Format.MSGPACK.value] else Codec.JSON
            raise TopicError(exc.reason, _reply_for(topic, levels), codec) from None

    def _parse_device_levels(self, topic: str, av: str, token: str, rest: list[str]) -> DeviceRequest:
        resource_name, command_type, *tail = rest
        if resource_name not in (Resource.COMMAND.value, Resource.RESULT.value):
            raise BadRequest(f"unknown resource {resource_name!r}: use command or result")
        target = make_target(av, token, command_type)
        tail, request_id = _split_request_id(tail)
        fmt = Format.PLAIN
        if tail and tail[0] in (Format.JSON.value, Format.MSGPACK.value):
            fmt, tail = Format(tail[0]), tail[1:]
        if tail:
            raise BadRequest(f"unexpected topic levels {'/'.join(tail)!r}: expected [/json|/msgpack][/requestId]")
        return DeviceRequest(
            topic=topic, resource=Resource(resource_name), target=target, format=fmt, request_id=request_id
        )

    # -- admin tree ----------------------------------------------------------------------------
    def admin_topic(self, action: AdminAction, target: Target, command_id: int | None = None) -> str:
        base = f"{self.admin_prefix}/{target.app_version}/{target.endpoint_token}/{action.value}"
        tail = f"/{command_id}" if command_id is not None else ""
        return f"{base}/{target.command_type}{tail}"

    def parse_rollout_create(self, topic: str) -> tuple[bool, int | None]:
        """``{admin}/rollouts/create[/{rid}]``: (whether the topic is one, its request ID)."""
        rest = topic[len(self.admin_prefix) + 1 :].split("/") if topic.startswith(f"{self.admin_prefix}/") else []
        if rest[:2] != [ROLLOUTS, "create"] or len(rest) > 3:
            return False, None
        if len(rest) == 3 and (request_id := parse_positive_int(rest[2])) is not None:
            return True, request_id
        return len(rest) == 2, None

    def parse_admin(self, topic: str) -> AdminRequest | None:
        """Parse a publish on the admin tree; None for our own replies and foreign topics."""
        prefix = f"{self.admin_prefix}/"
        levels = topic.split("/")
        if not topic.startswith(prefix) or levels[-1] in REPLY_LEVELS:
            return None
        rest = topic[len(prefix) :].split("/")
        try:
            return self._parse_admin_levels(topic, rest)
        except BadRequest as exc:
            raise TopicError(exc.reason, _admin_reply_for(topic, rest)) from None

    def _parse_admin_levels(self, topic: str, rest: list[str]) -> AdminRequest:
        if len(rest) < 4 or rest[2] not in {a.value for a in AdminAction}:
            raise BadRequest(
                "admin topics are {av}/{token}/invoke/{type}[/{rid}], .../cancel/{type}/{id}[/{rid}] "
                "or .../rerun/{type}/{id}[/{rid}]"
            )
        av, token, action_name, command_type, *tail = rest
        target = make_target(av, token, command_type)
        action = AdminAction(action_name)
        command_id = None
        if action is not AdminAction.INVOKE:
            if not tail or (command_id := parse_positive_int(tail[0])) is None:
                raise BadRequest(f"{action} needs a positive integer command id: .../{action}/{{type}}/{{id}}")
            tail = tail[1:]
        tail, request_id = _split_request_id(tail)
        if tail:
            raise BadRequest(f"unexpected topic levels {'/'.join(tail)!r}")
        return AdminRequest(
            topic=topic, action=action, target=target, command_id=command_id, request_id=request_id
        )

    # -- events --------------------------------------------------------------------------------
    def presence_event_topic(self, app_version: str, endpoint_token: str) -> str:
        return f"{self.events_prefix}/presence/{app_version}/{endpoint_token}"

    def event_topic(self, target: Target, command_id: int) -> str:
        return (
            f"{self.events_prefix}/{target.app_version}/{target.endpoint_token}/"
            f"{target.command_type}/{command_id}"
        )
