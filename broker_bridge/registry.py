"""The device registry: who may talk to the bridge, and which commands each device supports.

``open`` mode (default) registers an unknown endpoint on its first contact so the zero-config
quickstart works; ``closed`` mode refuses unknown endpoints before anything is stored.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from typing import Any

import structlog

from broker_bridge.devices import Device, Manifest, check_labels, parse_manifest
from broker_bridge.errors import BadRequest, Conflict, DeviceNotFound
from broker_bridge.store import CommandStore
from broker_bridge.topics import check_app_version, check_endpoint_token

log = structlog.get_logger(__name__)

KNOWN_FOR_S = 10.0  # how long a positive lookup is trusted (other instances may delete devices)


class RegistryMode(StrEnum):
    """How the bridge treats endpoints nobody registered."""

    OPEN = "open"  # register them on first contact
    CLOSED = "closed"  # refuse them (404) before anything is stored


class Registry:
    """Device CRUD plus the admission check every device and invoke path goes through."""

    def __init__(self, store: CommandStore, mode: RegistryMode, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.mode = mode
        self.clock = clock
        self._known: dict[tuple[str, str], tuple[float, Device]] = {}

    async def admit(self, app_version: str, endpoint_token: str) -> Device:
        """The device behind an endpoint; registers it in open mode, DeviceNotFound in closed mode."""
        key = (app_version, endpoint_token)
        cached = self._known.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        device = await self.store.device_for(app_version, endpoint_token)
        if device is None:
            device = await self._first_contact(app_version, endpoint_token)
        self._known[key] = (time.monotonic() + KNOWN_FOR_S, device)
        return device

    async def _first_contact(self, app_version: str, endpoint_token: str) -> Device:
        if self.mode is RegistryMode.CLOSED:
            raise DeviceNotFound(f"endpoint {endpoint_token!r} of {app_version!r} is not registered")
        try:
            device = await self.add(app_version=app_version, endpoint_token=endpoint_token)
        except Conflict:  # registered concurrently by another request
            found = await self.store.device_for(app_version, endpoint_token)
            if found is None:
                raise
            return found
        log.info("device_registered", device_id=device.device_id, app_version=app_version, token=endpoint_token)
        return device

    def forget(self, device: Device) -> None:
        self._known.pop((device.app_version, device.endpoint_token), None)

    # -- CRUD -----------------------------------------------------------------------------------
    async def add(
        self,
        *,
        app_version: str,
        endpoint_token: str,
        device_id: str | None = None,
        labels: dict[str, str] | None = None,
        manifest: Manifest | dict[str, Any] | None = None,
    ) -> Device:
        check_app_version(app_version)
        check_endpoint_token(endpoint_token)
        now = self.clock()
        device = Device(
            device_id=_check_id(device_id) if device_id is not None else str(uuid.uuid4()),
            app_version=app_version,
            endpoint_token=endpoint_token,
            labels=check_labels(labels or {}),
            manifest=_manifest(manifest),
            created_at=now,
            updated_at=now,
        )
        return await self.store.add_device(device)

    async def get(self, device_id: str) -> Device:
        device = await self.store.get_device(device_id)
        if device is None:
            raise DeviceNotFound(f"no device {device_id!r}")
        return device

    async def update(self, device_id: str, **changes: Any) -> Device:
        """Change some of app_version, endpoint_token, labels, manifest (None clears the manifest)."""
        current = await self.get(device_id)
        if "app_version" in changes:
            check_app_version(changes["app_version"])
        if "endpoint_token" in changes:
            check_endpoint_token(changes["endpoint_token"])
        if "labels" in changes:
            changes["labels"] = check_labels(changes["labels"])
        if "manifest" in changes:
            changes["manifest"] = _manifest(changes["manifest"])
        updated = dataclasses.replace(current, **changes, updated_at=self.clock())
        self.forget(current)
        return await self.store.replace_device(updated)

    async def delete(self, device_id: str) -> None:
        device = await self.get(device_id)
        self.forget(device)
        await self.store.delete_device(device_id)

    async def page(
        self, limit: int, offset: int, labels: dict[str, str] | None = None, connected: bool | None = None
    ) -> tuple[list[Device], int]:
        """A page of devices, oldest first, and how many there are; with ``labels``, only the
        devices carrying all of them; with ``connected``, only those known (not) to be connected."""
        found = await self.store.devices(limit, offset, labels, connected)
        return found, await self.store.count_devices(labels, connected)


def _manifest(value: Manifest | dict[str, Any] | None) -> Manifest | None:
    if value is None or isinstance(value, Manifest):
        return value
    return parse_manifest(value)


def _check_id(device_id: str) -> str:
    if not device_id or len(device_id) > 128 or "/" in device_id or not device_id.isprintable():
        raise BadRequest(f"invalid device id {device_id!r}: 1-128 printable characters without '/'")
    return device_id
