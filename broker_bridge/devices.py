"""Devices and their command manifests (Enapter calls them blueprints). Pure: no I/O.

A manifest lists the commands a device supports, their aliases and each argument's type, required
flag, bounds or allowed values. ``resolve`` checks an execution request against it before anything
is stored or sent, and names the offending field when it refuses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from broker_bridge.errors import BadRequest, Unprocessable
from broker_bridge.topics import check_command_type

ArgumentType = Literal["string", "integer", "float", "boolean", "object", "array"]


class ArgumentSpec(BaseModel):
    """One argument of a manifest command."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: ArgumentType = "string"
    required: bool = False
    min: int | float | None = Field(default=None, allow_inf_nan=False)
    max: int | float | None = Field(default=None, allow_inf_nan=False)
    enum: list[str | int | float | bool] | None = None
    description: str | None = None


class CommandSpec(BaseModel):
    """One command of a manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    aliases: list[str] = Field(default_factory=list)
    arguments: dict[str, ArgumentSpec] = Field(default_factory=dict)
    description: str | None = None
    dangerous: bool = False  # the console asks for a confirmation before running it


class Manifest(BaseModel):
    """The commands a device supports; the keys are the KP1 command types."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    commands: dict[str, CommandSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names_are_unique_command_types(self) -> Manifest:
        seen: set[str] = set()
        for name, spec in self.commands.items():
            for alias in (name, *spec.aliases):
                check_command_type(alias)
                if alias in seen:
                    raise ValueError(f"command name or alias {alias!r} is used twice")
                seen.add(alias)
        return self

    def command_for(self, name: str) -> str | None:
        """The manifest name a command name or alias stands for."""
        if name in self.commands:
            return name
        return next((n for n, spec in self.commands.items() if name in spec.aliases), None)


def parse_manifest(value: Any) -> Manifest:
    try:
        return Manifest.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise Unprocessable(f"invalid manifest: {where}: {first['msg']}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Device:
    """A registered device: its id, KP1 identity, labels and optional manifest."""

    device_id: str
    app_version: str
    endpoint_token: str
    labels: dict[str, str] = field(default_factory=dict)
    manifest: Manifest | None = None
    created_at: datetime
    updated_at: datetime
    last_seen_at: datetime | None = None  # its last KP1 message (MQTT or HTTP), to about a second
    # Presence, where the broker tells it (embedded broker sessions, a presence topic): None unknown.
    connected: bool | None = None
    connected_at: datetime | None = None
    disconnected_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """An endpoint's device connected or disconnected, as the broker (or its presence topic) told."""

    app_version: str
    endpoint_token: str
    connected: bool
    at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolved:
    """An execution request after the manifest check."""

    command_type: str  # the manifest name: what the device receives as its KP1 command type
    arguments: Any


def resolve(manifest: Manifest | None, name: str, arguments: Any) -> Resolved:
    """Check a command name and its arguments against a manifest (no manifest: anything goes)."""
    if manifest is None:
        check_command_type(name)
        return Resolved(command_type=name, arguments=arguments)
    command_type = manifest.command_for(name)
    if command_type is None:
        known = ", ".join(sorted(manifest.commands)) or "none"
        raise Unprocessable(f"name: command {name!r} is not in the device's manifest (known: {known})")
    _check_arguments(manifest.commands[command_type], arguments)
    return Resolved(command_type=command_type, arguments=arguments if arguments is not None else {})


def _check_arguments(spec: CommandSpec, arguments: Any) -> None:
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise Unprocessable("arguments: must be an object of argument names to values")
    for name in arguments:
        if name not in spec.arguments:
            raise Unprocessable(f"arguments.{name}: not an argument of this command")
    for name, argument in spec.arguments.items():
        if name in arguments:
            _check_value(f"arguments.{name}", argument, arguments[name])
        elif argument.required:
            raise Unprocessable(f"arguments.{name}: required")


_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "float": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def _check_value(where: str, spec: ArgumentSpec, value: Any) -> None:
    is_bool = isinstance(value, bool)
    if not isinstance(value, _PYTHON_TYPES[spec.type]) or (is_bool and spec.type != "boolean"):
        raise Unprocessable(f"{where}: must be of type {spec.type}")
    if spec.enum is not None and value not in spec.enum:
        raise Unprocessable(f"{where}: must be one of {spec.enum}")
    if isinstance(value, int | float) and not is_bool:
        _check_bounds(where, spec, value)


def _check_bounds(where: str, spec: ArgumentSpec, value: float) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise Unprocessable(f"{where}: must be a finite number")
    if spec.min is not None and value < spec.min:
        raise Unprocessable(f"{where}: must be at least {spec.min:g}")
    if spec.max is not None and value > spec.max:
        raise Unprocessable(f"{where}: must be at most {spec.max:g}")


def check_labels(labels: Any) -> dict[str, str]:
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise BadRequest("labels: must be an object of strings")
    return labels
