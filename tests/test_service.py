"""The service layer on the memory store: limits and rules that every edge shares."""

from __future__ import annotations

import dataclasses

import pytest

from broker_bridge.errors import BadRequest, Conflict, LimitExceeded, Unprocessable
from broker_bridge.service import CommandService, Limits
from broker_bridge.store import CommandQuery
from broker_bridge.store.memory import MemoryStore
from broker_bridge.topics import Target

REBOOT = Target(app_version="app-v1", endpoint_token="dev1", command_type="reboot")


async def test_outstanding_limit_per_endpoint() -> None:
    """An endpoint with max_outstanding_per_endpoint open commands refuses more until one finishes."""
    service = CommandService(MemoryStore(), limits=Limits(max_outstanding_per_endpoint=2))
    first = await service.invoke(REBOOT, 1)
    await service.invoke(REBOOT, 2)
    with pytest.raises(LimitExceeded, match="max_outstanding_per_endpoint") as refused:
        await service.invoke(REBOOT, 3)
    assert refused.value.status_code == 429
    other = Target(app_version="app-v1", endpoint_token="dev2", command_type="reboot")
    await service.invoke(other, 4)  # another endpoint is not affected
    await service.cancel(first.id)
    await service.invoke(REBOOT, 5)


async def test_ttl_bounds() -> None:
    """ttl must be positive and at most max_ttl_s."""
    service = CommandService(MemoryStore(), limits=Limits(max_ttl_s=60))
    for ttl in (0, -1, 61):
        with pytest.raises(BadRequest, match="ttl"):
            await service.invoke(REBOOT, None, ttl)
    assert (await service.invoke(REBOOT, None, 60)).id == 1


async def test_manifest_checked_before_anything_is_stored() -> None:
    """An invoke the manifest refuses stores nothing; an alias resolves to the manifest name."""
    store = MemoryStore()
    service = CommandService(store)
    manifest = {"commands": {"reboot": {"aliases": ["restart"], "arguments": {"delay": {"type": "integer"}}}}}
    await service.registry.add(app_version="app-v1", endpoint_token="dev1", manifest=manifest)
    restart = Target(app_version="app-v1", endpoint_token="dev1", command_type="restart")
    with pytest.raises(Unprocessable, match=r"arguments\.delay"):
        await service.invoke(restart, {"delay": "soon"})
    with pytest.raises(Unprocessable, match="not in the device's manifest"):
        await service.invoke(Target(app_version="app-v1", endpoint_token="dev1", command_type="zero"), {})
    assert await store.get(1) is None
    command = await service.invoke(restart, {"delay": 3})
    assert (command.target.command_type, command.request_name) == ("reboot", "restart")


async def test_idempotency_key_returns_the_first_command() -> None:
    """The same key and request twice gives the same command and stores one (key order in the
    payload does not matter); the same key with another payload or type is a conflict."""
    service = CommandService(MemoryStore())
    first = await service.invoke(REBOOT, {"a": 1, "b": [1, 2]}, idempotency_key="abc")
    again = await service.invoke(REBOOT, {"b": [1, 2], "a": 1}, idempotency_key="abc")
    assert again == first
    other_type = dataclasses.replace(REBOOT, command_type="zero")
    for target, payload in ((REBOOT, {"a": 2, "b": [1, 2]}), (REBOOT, {"a": True, "b": [1, 2]}), (other_type, {})):
        with pytest.raises(Conflict, match="idempotency key 'abc' was used for command"):
            await service.invoke(target, payload, idempotency_key="abc")
    assert await service.store.count(CommandQuery()) == 1
