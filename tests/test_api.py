"""The HTTP API, endpoint by endpoint: ops, auth, devices, v3 executions, the KP1 binding, Kaa REST."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastapi.routing
import httpx
import msgpack
import pytest

from broker_bridge.api import create_app
from broker_bridge.api.auth import require_api_key
from broker_bridge.config import Settings
from broker_bridge.metrics import Metrics
from broker_bridge.service import CommandService
from broker_bridge.store import CommandQuery
from broker_bridge.store.memory import MemoryStore
from broker_bridge.store.sqlite import SqliteStore
from broker_bridge.topics import TopicScheme
from tests.conftest import free_port
from tests.harness import WAIT_S, make_settings, probe, running_service

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DEVICE = "dev-1"
TOKEN = "tok1"
MAX_PAYLOAD = 4096
OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
JSON_TYPE = {"Content-Type": "application/json"}
MSGPACK_TYPE = {"Content-Type": "application/msgpack"}
MANIFEST: dict[str, Any] = {
    "commands": {
        "change_lux": {
            "aliases": ["change_color_temperature"],
            "arguments": {
                "temp_kelvins": {"type": "integer", "required": True, "min": 1000, "max": 20000},
                "fade_s": {"type": "float", "min": 0, "max": 60},
                "mode": {"type": "string", "enum": ["warm", "cold"]},
            },
        },
        "reboot": {},
    }
}


@dataclass(frozen=True, slots=True)
class Api:
    """A running service, an HTTP client with the admin key, one without, and this test's app version."""

    settings: Settings
    mqtt_port: int
    client: httpx.AsyncClient
    anon: httpx.AsyncClient
    av: str

    def kp1(self, rest: str, token: str = TOKEN) -> str:
        return f"/kp1/{self.av}/cex/{token}/{rest}"

    def topic(self, rest: str, token: str = TOKEN) -> str:
        return f"kp1/{self.av}/cex/{token}/{rest}"

    def admin_topic(self, rest: str, token: str = TOKEN) -> str:
        return f"cex/admin/{self.av}/{token}/{rest}"


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, app_version: str, **overrides: Any) -> AsyncIterator[Api]:
    port = free_port()
    settings = make_settings(
        tmp_path, port, api_keys=[KEY], sweep_interval_s=0.1, max_payload_bytes=MAX_PAYLOAD, **overrides
    )
    async with running_service(settings):
        base = f"http://{settings.http_listen}"
        async with (
            httpx.AsyncClient(base_url=base, headers=AUTH, timeout=WAIT_S * 2) as client,
            httpx.AsyncClient(base_url=base, timeout=WAIT_S * 2) as anon,
        ):
            yield Api(settings, port, client, anon, app_version)


@pytest.fixture
async def api(tmp_path: Path, app_version: str) -> AsyncIterator[Api]:
    """The service in open registry mode."""
    async with serve(tmp_path, app_version) as running:
        yield running


@pytest.fixture
async def closed_api(tmp_path: Path, app_version: str) -> AsyncIterator[Api]:
    """The service in closed registry mode."""
    async with serve(tmp_path, app_version, registry_mode="closed") as running:
        yield running


async def register(
    api: Api,
    device_id: str | None = DEVICE,
    token: str = TOKEN,
    manifest: dict[str, Any] | None = MANIFEST,
    **extra: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {"app_version": api.av, "endpoint_token": token, **extra}
    if device_id is not None:
        body["id"] = device_id
    if manifest is not None:
        body["manifest"] = manifest
    response = await api.client.post("/v3/devices", json=body)
    assert response.status_code == 201, response.text
    device: dict[str, Any] = response.json()["device"]
    return device


async def create_execution(api: Api, body: dict[str, Any], device_id: str = DEVICE, **kwargs: Any) -> str:
    response = await api.client.post(f"/v3/devices/{device_id}/command_executions", json=body, **kwargs)
    assert response.status_code == 200, response.text
    execution_id: str = response.json()["execution_id"]
    return execution_id


async def get_execution(api: Api, execution_id: str, device_id: str = DEVICE, expand: str = "") -> dict[str, Any]:
    params = {"expand": expand} if expand else {}
    response = await api.client.get(f"/v3/devices/{device_id}/command_executions/{execution_id}", params=params)
    assert response.status_code == 200, response.text
    execution: dict[str, Any] = response.json()["execution"]
    return execution


async def list_executions(api: Api, device_id: str = DEVICE, **params: Any) -> dict[str, Any]:
    response = await api.client.get(f"/v3/devices/{device_id}/command_executions", params=params)
    assert response.status_code == 200, response.text
    listing: dict[str, Any] = response.json()
    return listing


async def poll_until_command(api: Api, command_type: str, token: str = TOKEN) -> int:
    """Poll the KP1 HTTP binding until a command of the type is outstanding; its id."""
    while True:
        response = await api.anon.post(api.kp1(f"command/{command_type}", token), json={})
        assert response.status_code == 200, response.text
        if items := response.json():
            command_id: int = items[0]["id"]
            return command_id
        await asyncio.sleep(0.02)


async def answer_over_http(api: Api, command_type: str, *codes: int, token: str = TOKEN, payload: Any = "done") -> int:
    """A device on the HTTP binding: wait for a command, report each status code for it; its id."""
    command_id = await poll_until_command(api, command_type, token)
    for code in codes:
        result = {"id": command_id, "statusCode": code, "reasonPhrase": "r", "payload": payload}
        response = await api.anon.post(api.kp1(f"result/{command_type}", token), json=[result])
        assert response.status_code == 200, response.text
    return command_id


async def with_device(device: Awaitable[Any], request: Awaitable[httpx.Response]) -> httpx.Response:
    """Run an HTTP request while a simulated device answers; the request's response."""
    async with asyncio.timeout(WAIT_S * 2):
        _, response = await asyncio.gather(device, request)
    assert isinstance(response, httpx.Response)
    return response


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float = WAIT_S) -> None:
    """Wait until an asynchronous check holds, failing after within_s."""
    for _ in range(int(within_s / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"still not true after {within_s}s")


def assert_error(response: httpx.Response, status: int, *reason_parts: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"statusCode", "reasonPhrase"}
    assert body["statusCode"] == status
    for part in reason_parts:
        assert part in body["reasonPhrase"]


async def stored_counts(settings: Settings) -> tuple[int, int]:
    """How many devices and commands the database holds."""
    async with SqliteStore(settings.db_path) as store:
        return await store.count_devices(), await store.count(CommandQuery())


# -- operations --------------------------------------------------------------------------------
async def test_healthz(api: Api) -> None:
    """/healthz answers 200 without a key."""
    response = await api.anon.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


async def test_readyz_reports_store_and_broker(api: Api) -> None:
    """/readyz is 200 with the store ok and the broker connected."""
    response = await api.anon.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "store": "ok", "broker": "connected"}


async def test_metrics_tell_the_build_the_connection_and_the_process(api: Api) -> None:
    """build_info names the version, mqtt_connected follows the bridge's session, and the standard
    process and GC collectors are there."""
    import broker_bridge

    text = (await api.anon.get("/metrics")).text
    lines = text.splitlines()
    assert any(
        line.startswith("broker_bridge_build_info{") and f'version="{broker_bridge.__version__}"' in line
        for line in lines
    )
    assert "broker_bridge_mqtt_connected 1.0" in lines
    assert any(line.startswith("process_cpu_seconds_total ") for line in lines)
    assert any(line.startswith("python_gc_collections_total{") for line in lines)


async def test_metrics_show_the_stores_open_commands_whoever_created_them(
    tmp_path: Path, app_version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commands invoked by the CLI (another process, the same database) are in the gauges too, with
    the age of the oldest pending one; the per-process counters only see this process's."""
    from broker_bridge import runtime
    from broker_bridge.topics import Target

    monkeypatch.setattr(runtime, "STORE_GAUGES_S", 0.2)
    async with serve(tmp_path, app_version) as api:
        # As the CLI does it (its composition root, its own store on the same file); not cli.main,
        # which would configure this test process's logging for the tests after it.
        async with runtime.build_service(api.settings, serving=False) as cli:
            await cli.service.invoke(Target(app_version=app_version, endpoint_token=TOKEN, command_type="reboot"), None)
        (device,) = (await api.client.get("/v3/devices")).json()["devices"]  # registered by that invoke
        await api.client.post(f"/v3/devices/{device['id']}/command_executions", json={"name": "reboot"})
        wanted = 'broker_bridge_commands_open{command_type="reboot",state="pending"} 2.0'
        for _ in range(100):
            text = (await api.anon.get("/metrics")).text
            if wanted in text.splitlines():
                break
            await asyncio.sleep(0.1)
        lines = text.splitlines()
        assert wanted in lines
        age = next(line for line in lines if line.startswith("broker_bridge_oldest_pending_age_seconds "))
        assert float(age.split()[1]) > 0


async def test_metrics_count_command_transitions(api: Api) -> None:
    """/metrics is Prometheus text with the command transition counter after a command."""
    await register(api)
    await create_execution(api, {"name": "reboot"})
    response = await api.anon.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert re.search(r'^broker_bridge_command_transitions_total\{.*state="pending".*\} 1\.0$', response.text, re.M)


# -- auth --------------------------------------------------------------------------------------
def _all_routes() -> list[Any]:
    """Every route of a fresh app with its effective path, methods and dependencies."""
    app = create_app(
        CommandService(MemoryStore()),
        api_keys=[KEY],
        scheme=TopicScheme(),
        max_payload_bytes=MAX_PAYLOAD,
        metrics=Metrics(),
        broker_connected=lambda: True,
    )
    # FastAPI 0.16x keeps included routers nested; iter_route_contexts flattens them (older: flat already).
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    routes = list(flatten(app.routes)) if flatten is not None else list(app.routes)
    return [route for route in routes if getattr(route, "dependant", None) is not None]


def _app_routes() -> list[Any]:
    """The API's routes: those of the OpenAPI document."""
    return [route for route in _all_routes() if _in_schema(route)]


def _in_schema(route: Any) -> bool:
    inner = getattr(route, "route", route)
    return bool(getattr(inner, "include_in_schema", True))


def test_routes_outside_the_api_are_the_docs_and_the_console() -> None:
    """What the OpenAPI document leaves out: /docs and the console (its own session sign-in,
    tests/test_console.py)."""
    hidden = {r.path for r in _all_routes() if not _in_schema(r)}
    assert hidden
    assert all(p in ("/", "/docs") or p.startswith("/console/") for p in hidden), hidden


def _needs_key(route: Any) -> bool:
    stack = [route.dependant]
    while stack:
        dependant = stack.pop()
        if dependant.call is require_api_key:
            return True
        stack.extend(dependant.dependencies)
    return False


def _operations(routes: list[Any]) -> set[tuple[str, str]]:
    return {(method, route.path) for route in routes for method in route.methods}


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


ADMIN_OPERATIONS = sorted(_operations([r for r in _app_routes() if _needs_key(r)]))
OPEN_OPERATIONS = sorted(_operations([r for r in _app_routes() if not _needs_key(r)]))


def test_every_route_is_admin_device_or_ops() -> None:
    """Each route needs the key unless it is a KP1 device route or an ops route."""
    for route in _app_routes():
        if route.path.startswith(("/v3/", "/api/v1/")):
            assert _needs_key(route), route.path
        else:
            assert route.path.startswith("/kp1/") or route.path in OPS_PATHS, route.path
            assert not _needs_key(route), route.path
    assert len(ADMIN_OPERATIONS) >= 12


async def test_openapi_lists_exactly_the_app_routes(api: Api) -> None:
    """The live OpenAPI document has the same operations as app.routes, with security on admin ones."""
    document = (await api.anon.get("/openapi.json")).json()
    live = {(m.upper(), p) for p, item in document["paths"].items() for m in item}
    assert live == set(ADMIN_OPERATIONS) | set(OPEN_OPERATIONS)
    secured = {(m.upper(), p) for p, item in document["paths"].items() for m, op in item.items() if op.get("security")}
    assert secured == set(ADMIN_OPERATIONS)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"X-Enapter-Auth-Token": "wrong"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer"},
        {"X-Enapter-Auth-Token": ""},
    ],
    ids=["none", "wrong-bearer", "wrong-enapter", "basic-scheme", "empty-bearer", "empty-enapter"],
)
async def test_admin_routes_refuse_missing_or_wrong_key(api: Api, headers: dict[str, str]) -> None:
    """Every admin operation answers 401 with the JSON error body without a valid key."""
    await register(api)
    for method, path in ADMIN_OPERATIONS:
        body = {"json": {}} if method in ("POST", "PATCH") else {}
        response = await api.anon.request(method, _concrete(path), headers=headers, **body)
        assert_error(response, 401)
        assert response.headers["www-authenticate"] == "Bearer", (method, path)
    assert (await api.client.get("/v3/devices")).json()["total_count"] == 1


async def test_admin_routes_check_the_key_before_parsing_the_body(api: Api) -> None:
    """Without a key, a malformed JSON body still gets 401, not a parser error."""
    response = await api.anon.post("/v3/devices", content=b"{bad", headers={"Content-Type": "application/json"})
    assert_error(response, 401)


@pytest.mark.parametrize("header", [{"Authorization": f"Bearer {KEY}"}, {"X-Enapter-Auth-Token": KEY}])
async def test_both_key_header_styles_work(api: Api, header: dict[str, str]) -> None:
    """Authorization: Bearer and X-Enapter-Auth-Token both admit the admin key."""
    created = await api.anon.post("/v3/devices", headers=header, json={"app_version": api.av, "endpoint_token": TOKEN})
    assert created.status_code == 201, created.text
    for path in ("/v3/devices", f"/api/v1/endpoints/commands?endpointId={created.json()['device']['id']}"):
        response = await api.anon.get(path, headers=header)
        assert response.status_code == 200, response.text


async def test_device_and_ops_routes_need_no_key(api: Api) -> None:
    """KP1 binding and ops routes answer without a key (a result body of {} is a 400, not a 401)."""
    assert OPEN_OPERATIONS
    for method, path in OPEN_OPERATIONS:
        concrete = path.format(app_version=api.av, extension="cex", token=TOKEN, command_type="reboot", fmt="json")
        body = {"json": {}} if method == "POST" else {}
        response = await api.anon.request(method, concrete, **body)
        expected = 400 if "/result/" in path else 200
        assert response.status_code == expected, (method, concrete, response.text)


# -- devices -----------------------------------------------------------------------------------
async def test_create_device_with_id_manifest_and_labels(api: Api) -> None:
    """A device is created with the given id, labels and manifest, and reads back the same."""
    device = await register(api, labels={"site": "berlin"})
    assert (device["id"], device["app_version"], device["endpoint_token"]) == (DEVICE, api.av, TOKEN)
    assert device["labels"] == {"site": "berlin"}
    assert device["manifest"]["commands"]["change_lux"]["aliases"] == ["change_color_temperature"]
    assert RFC3339.match(device["created_at"])
    assert RFC3339.match(device["updated_at"])
    assert (await api.client.get(f"/v3/devices/{DEVICE}")).json() == {"device": device}


async def test_a_device_is_last_seen_at_its_last_kp1_message_over_http_or_mqtt(api: Api) -> None:
    """last_seen_at is null until the device sends anything; each KP1 message (an HTTP poll, an
    MQTT result) moves it on, written by the once-a-second flush."""
    device = await register(api)
    assert device["last_seen_at"] is None

    async def seen_after(earlier: str | None) -> str:
        for _ in range(100):
            found = (await api.client.get(f"/v3/devices/{DEVICE}")).json()["device"]["last_seen_at"]
            if found is not None and (earlier is None or found > earlier):
                return str(found)
            await asyncio.sleep(0.1)
        raise AssertionError(f"last_seen_at stayed {earlier}")

    assert (await api.anon.post(api.kp1("command/reboot"), json={})).status_code == 200
    first = await seen_after(None)
    assert RFC3339.match(first)
    assert first >= device["created_at"]
    async with probe(api.mqtt_port) as mqtt:
        await mqtt.request(api.topic("result/reboot/1"), [{"id": 999_999, "statusCode": 200}])
    assert await seen_after(first) > first
    listed = (await api.client.get("/v3/devices")).json()["devices"]
    assert [d["last_seen_at"] for d in listed if d["id"] == DEVICE] == [await seen_after(None)]


async def test_devices_are_filtered_by_label(api: Api) -> None:
    """?label=key:value, several: all must match; a malformed one is a 400 that says how."""
    for token, labels in (("t1", {"site": "lab", "floor": "2"}), ("t2", {"site": "lab"}), ("t3", {"site": "hq"})):
        await register(api, device_id=f"dev-{token}", token=token, manifest=None, labels=labels)

    async def listed(*labels: str) -> tuple[list[str], int]:
        body = (await api.client.get("/v3/devices", params=[("label", v) for v in labels])).json()
        return [d["id"] for d in body["devices"]], body["total_count"]

    assert await listed("site:lab") == (["dev-t1", "dev-t2"], 2)
    assert await listed("site:lab", "floor:2") == (["dev-t1"], 1)
    assert await listed("site:moon") == ([], 0)
    assert (await listed())[1] == 3
    for bad in ("site", ":lab"):
        refused = await api.client.get("/v3/devices", params={"label": bad})
        assert_error(refused, 400)
        assert "key:value" in refused.json()["reasonPhrase"]
    twice = await api.client.get("/v3/devices", params=[("label", "site:lab"), ("label", "site:hq")])
    assert_error(twice, 400)


async def test_create_device_without_id_generates_one(api: Api) -> None:
    """Without an id the device gets a generated one and no manifest."""
    device = await register(api, device_id=None, manifest=None)
    assert len(device["id"]) >= 8
    assert (device["manifest"], device["labels"]) == (None, {})
    assert (await api.client.get(f"/v3/devices/{device['id']}")).status_code == 200


@pytest.mark.parametrize(
    "second",
    [{"id": DEVICE, "endpoint_token": "other"}, {"id": "dev-2", "endpoint_token": TOKEN}],
    ids=["id", "endpoint"],
)
async def test_duplicate_device_is_a_conflict(api: Api, second: dict[str, str]) -> None:
    """A duplicate device id or a duplicate endpoint gets 409 and changes nothing."""
    await register(api)
    response = await api.client.post("/v3/devices", json={"app_version": api.av, **second})
    assert_error(response, 409, "already registered")
    assert (await api.client.get("/v3/devices")).json()["total_count"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"endpoint_token": TOKEN}, "body.app_version"),
        ({"app_version": "a-v1"}, "body.endpoint_token"),
        ({"app_version": 5, "endpoint_token": TOKEN}, "body.app_version"),
        ({"app_version": "a-v1", "endpoint_token": ["t"]}, "body.endpoint_token"),
        ({"app_version": "a-v1", "endpoint_token": TOKEN, "labels": {"k": 1}}, "body.labels.k"),
        ({"app_version": "a-v1", "endpoint_token": TOKEN, "labels": ["k"]}, "body.labels"),
        ({"app_version": "a-v1", "endpoint_token": TOKEN, "id": ""}, "body.id"),
        ({"app_version": "a-v1", "endpoint_token": TOKEN, "colour": "red"}, "body.colour"),
        ({"app_version": "", "endpoint_token": TOKEN}, "body.app_version"),
    ],
)
async def test_create_device_with_missing_or_mistyped_fields(api: Api, body: dict[str, Any], field: str) -> None:
    """Missing, mistyped and unknown fields get 422 naming the field."""
    response = await api.client.post("/v3/devices", json=body)
    assert_error(response, 422, field)
    assert (await api.client.get("/v3/devices")).json()["total_count"] == 0


@pytest.mark.parametrize(
    ("manifest", "part"),
    [
        ({"commands": {"x": {"arguments": {"a": {"type": "decimal"}}}}}, "commands.x.arguments.a.type"),
        ({"commands": {"x": {"arguments": {"a": {"type": "integer", "min": "low"}}}}}, "commands.x.arguments.a.min"),
        ({"commands": {"x": {"aliases": ["y"]}, "y": {}}}, "'y' is used twice"),
        ({"commands": {"x": {"aliases": ["z", "z"]}}}, "'z' is used twice"),
        ({"commands": {"x": {"colour": 1}}}, "commands.x.colour"),
        ({"commands": []}, "manifest.commands"),
    ],
)
async def test_create_device_with_invalid_manifest(api: Api, manifest: dict[str, Any], part: str) -> None:
    """An invalid manifest (bad argument type, duplicate alias, unknown field) gets 422."""
    body = {"app_version": api.av, "endpoint_token": TOKEN, "manifest": manifest}
    assert_error(await api.client.post("/v3/devices", json=body), 422, part)
    assert (await api.client.get("/v3/devices")).json()["total_count"] == 0


@pytest.mark.parametrize(
    ("body", "part"),
    [
        ({"endpoint_token": "a.b"}, "invalid endpoint token"),
        ({"endpoint_token": "a/b"}, "invalid endpoint token"),
        ({"app_version": "a+b"}, "invalid app version"),
        ({"id": "a/b"}, "invalid device id"),
        ({"manifest": {"commands": {"status": {}}}}, "reserved"),
        ({"manifest": {"commands": {"re.boot": {}}}}, "invalid command type"),
    ],
)
async def test_create_device_with_invalid_names(api: Api, body: dict[str, Any], part: str) -> None:
    """Names the KP1 topic tree cannot carry are refused with a 4xx JSON error."""
    response = await api.client.post("/v3/devices", json={"app_version": api.av, "endpoint_token": TOKEN, **body})
    assert response.status_code in (400, 422)
    assert_error(response, response.status_code, part)


async def test_get_unknown_device(api: Api) -> None:
    """An unknown device id gets 404."""
    assert_error(await api.client.get("/v3/devices/nope"), 404, "nope")


async def test_list_devices_with_limit_offset_and_total(api: Api) -> None:
    """Listing pages with limit and offset and always reports the total count."""
    for n in range(5):
        await register(api, device_id=f"d{n}", token=f"t{n}")
    listing = (await api.client.get("/v3/devices", params={"limit": 2, "offset": 1})).json()
    assert [d["id"] for d in listing["devices"]] == ["d1", "d2"]
    assert listing["total_count"] == 5
    everything = (await api.client.get("/v3/devices")).json()
    assert [d["id"] for d in everything["devices"]] == [f"d{n}" for n in range(5)]
    beyond = (await api.client.get("/v3/devices", params={"offset": 9})).json()
    assert beyond == {"devices": [], "total_count": 5}


@pytest.mark.parametrize(
    ("name", "value"), [("limit", 0), ("limit", 1001), ("limit", -1), ("limit", "x"), ("offset", -1)]
)
async def test_list_devices_with_out_of_range_paging(api: Api, name: str, value: object) -> None:
    """limit outside 1..1000, a non-integer limit or a negative offset gets 422 naming it."""
    assert_error(await api.client.get("/v3/devices", params={name: value}), 422, f"query.{name}")


async def test_patch_device_labels_and_clear_manifest(api: Api) -> None:
    """PATCH changes only the given fields; manifest null removes the manifest."""
    await register(api, labels={"a": "1"})
    patched = await api.client.patch(f"/v3/devices/{DEVICE}", json={"labels": {"b": "2"}})
    assert patched.status_code == 200, patched.text
    device = patched.json()["device"]
    assert (device["labels"], device["manifest"] is not None, device["endpoint_token"]) == ({"b": "2"}, True, TOKEN)
    cleared = (await api.client.patch(f"/v3/devices/{DEVICE}", json={"manifest": None})).json()["device"]
    assert (cleared["manifest"], cleared["labels"]) == (None, {"b": "2"})
    assert cleared["updated_at"] >= cleared["created_at"]
    unchecked = await api.client.post(f"/v3/devices/{DEVICE}/command_executions", json={"name": "anything"})
    assert unchecked.status_code == 200, "without a manifest any command name is accepted"


async def test_patch_device_errors(api: Api) -> None:
    """PATCH of an unknown device is 404; null labels, bad manifests and taken endpoints are refused."""
    await register(api)
    await register(api, device_id="dev-2", token="tok2")
    assert_error(await api.client.patch("/v3/devices/nope", json={"labels": {}}), 404)
    assert_error(await api.client.patch(f"/v3/devices/{DEVICE}", json={"labels": None}), 400, "cannot be null")
    bad = {"manifest": {"commands": {"x": {"arguments": {"a": {"type": "nope"}}}}}}
    assert_error(await api.client.patch(f"/v3/devices/{DEVICE}", json=bad), 422, "body.manifest")
    assert_error(await api.client.patch("/v3/devices/dev-2", json={"endpoint_token": TOKEN}), 409)
    assert (await api.client.get("/v3/devices/dev-2")).json()["device"]["endpoint_token"] == "tok2"


async def test_delete_device(api: Api) -> None:
    """DELETE answers 204, then the device is gone (404) and a second DELETE is 404."""
    await register(api)
    response = await api.client.delete(f"/v3/devices/{DEVICE}")
    assert (response.status_code, response.content) == (204, b"")
    assert_error(await api.client.get(f"/v3/devices/{DEVICE}"), 404)
    assert_error(await api.client.delete(f"/v3/devices/{DEVICE}"), 404)


# -- v3 command executions -----------------------------------------------------------------------
async def test_execute_command_by_alias_names_the_alias_and_the_manifest_name(api: Api) -> None:
    """An alias is kept as request.name, the manifest name as request.manifest_name, sent as the type."""
    await register(api)
    # A ttl keeps it deliverable after the wait, for the poll below (without one it would time out).
    body = {"name": "change_color_temperature", "arguments": {"temp_kelvins": 1850}, "ttl": 60}
    response = await api.client.post(f"/v3/devices/{DEVICE}/execute_command", params={"timeout": 0.2}, json=body)
    assert response.status_code == 200, response.text
    execution = response.json()["execution"]
    assert execution["request"] == {
        "name": "change_color_temperature",
        "arguments": {"temp_kelvins": 1850},
        "manifest_name": "change_lux",
    }
    assert (execution["state"], execution["ephemeral"], "response" in execution) == ("NEW", False, False)
    assert RFC3339.match(execution["created_at"])
    polled = await api.anon.post(api.kp1("command/change_lux"), json={})
    assert polled.json() == [{"id": int(execution["id"]), "payload": {"temp_kelvins": 1850}}]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"name": "change_lux", "arguments": {"temp_kelvins": 999}}, "arguments.temp_kelvins: must be at least"),
        ({"name": "change_lux", "arguments": {"temp_kelvins": 20001}}, "arguments.temp_kelvins: must be at most"),
        ({"name": "change_lux", "arguments": {"temp_kelvins": "1850"}}, "arguments.temp_kelvins: must be of type"),
        ({"name": "change_lux", "arguments": {"temp_kelvins": 18.5}}, "arguments.temp_kelvins: must be of type"),
        ({"name": "change_lux", "arguments": {"temp_kelvins": True}}, "arguments.temp_kelvins: must be of type"),
        ({"name": "change_lux", "arguments": {"temp_kelvins": 1850, "fade_s": 61}}, "arguments.fade_s"),
        ({"name": "change_lux", "arguments": {"temp_kelvins": 1850, "mode": "hot"}}, "arguments.mode: must be one of"),
        ({"name": "change_lux", "arguments": {"temp_kelvins": 1850, "colour": 1}}, "arguments.colour: not an argument"),
        ({"name": "change_lux", "arguments": {}}, "arguments.temp_kelvins: required"),
        ({"name": "change_lux"}, "arguments.temp_kelvins: required"),
        ({"name": "dance", "arguments": {}}, "name: command 'dance' is not in the device's manifest"),
        ({"name": "change_lux", "arguments": [1850]}, "body.arguments"),
        ({"name": "", "arguments": {}}, "body.name"),
        ({"arguments": {}}, "body.name"),
        ({"name": "reboot", "ttl": "soon"}, "body.ttl"),
        ({"name": "reboot", "ttl": 0}, "body.ttl"),
        ({"name": "reboot", "colour": 1}, "body.colour"),
    ],
)
@pytest.mark.parametrize("route", ["execute_command", "command_executions"])
async def test_invalid_execution_is_refused_and_not_stored(
    api: Api, route: str, body: dict[str, Any], reason: str
) -> None:
    """Arguments out of bounds, mistyped, unknown or missing, and unknown commands get 422 and store nothing."""
    await register(api)
    response = await api.client.post(f"/v3/devices/{DEVICE}/{route}", params={"timeout": 0.1}, json=body)
    assert_error(response, 422, reason)
    assert (await list_executions(api, show="ALL"))["total_count"] == 0
    assert (await stored_counts(api.settings))[1] == 0


async def test_execution_ttl_over_the_limit_is_refused(api: Api) -> None:
    """A ttl over max_ttl_s gets 400 and stores nothing."""
    await register(api)
    response = await api.client.post(f"/v3/devices/{DEVICE}/command_executions", json={"name": "reboot", "ttl": 1e9})
    assert_error(response, 400, "ttl")
    assert (await stored_counts(api.settings))[1] == 0


@pytest.mark.parametrize(
    "raw",
    [
        b'{"name": "reboot", "arguments": {"v": NaN}}',
        b'{"name": "reboot", "arguments": {"v": -Infinity}}',
        b'{"name": "reboot", "arguments": {"v": 1000000000000000000000000000000}}',
        b'{"name": "reboot", "arguments": {"v": "\\ud800"}}',
    ],
    ids=["nan", "infinity", "int-over-64-bits", "lone-surrogate"],
)
async def test_execution_arguments_the_codecs_cannot_carry_are_refused(api: Api, raw: bytes) -> None:
    """Arguments JSON and MessagePack cannot both carry get a 4xx (as on Kaa REST and MQTT) and store nothing."""
    await register(api, manifest=None)
    url = f"/v3/devices/{DEVICE}/command_executions"
    response = await api.client.post(url, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 422), response.text
    assert (await stored_counts(api.settings))[1] == 0


@pytest.mark.parametrize("route", ["execute_command", "command_executions"])
async def test_execution_body_over_the_limit(api: Api, route: str) -> None:
    """A v3 execution body over max_payload_bytes gets 413 (as on Kaa REST and MQTT admin) and is not stored."""
    await register(api, manifest=None)
    body = {"name": "reboot", "arguments": {"pad": "x" * MAX_PAYLOAD}}
    response = await api.client.post(f"/v3/devices/{DEVICE}/{route}", params={"timeout": 0}, json=body)
    assert_error(response, 413)
    assert (await stored_counts(api.settings))[1] == 0


async def test_a_stored_nan_argument_does_not_break_polls(api: Api) -> None:
    """Whatever v3 accepted, the device's JSON and MessagePack polls still answer 200."""
    await register(api, manifest=None)
    url = f"/v3/devices/{DEVICE}/command_executions"
    await api.client.post(url, content=b'{"name": "nan", "arguments": {"v": NaN}}', headers=JSON_TYPE)
    await api.client.post(url, json={"name": "big", "arguments": {"v": 2**70}})
    assert (await api.anon.post(api.kp1("command/nan"), json={})).status_code == 200
    packed = await api.anon.post(api.kp1("command/big/msgpack"), content=msgpack.packb({}), headers=MSGPACK_TYPE)
    assert packed.status_code == 200


async def test_outstanding_commands_per_endpoint_are_limited(tmp_path: Path, app_version: str) -> None:
    """Past max_outstanding_per_endpoint an invoke gets 429 naming the setting; a result frees a slot."""
    async with serve(tmp_path, app_version, max_outstanding_per_endpoint=2) as api:
        await register(api, manifest=None)
        first = await create_execution(api, {"name": "reboot"})
        await create_execution(api, {"name": "zero"})
        refused = await api.client.post(f"/v3/devices/{DEVICE}/command_executions", json={"name": "reboot"})
        assert_error(refused, 429, "max_outstanding_per_endpoint")
        assert_error(await api.client.post(kaa("reboot"), json={}), 429, "max_outstanding_per_endpoint")
        assert (await list_executions(api, show="ALL"))["total_count"] == 2
        result = {"id": int(first), "statusCode": 200}
        assert (await api.anon.post(api.kp1("result/reboot"), json=result)).status_code == 200
        await create_execution(api, {"name": "reboot"})


async def test_execution_for_unknown_device(api: Api) -> None:
    """Executing on an unknown device gets 404."""
    for route in ("execute_command", "command_executions"):
        assert_error(await api.client.post(f"/v3/devices/nope/{route}", json={"name": "reboot"}), 404, "nope")


@pytest.mark.parametrize("wait", [-1, 61, "soon", "nan"])
async def test_execute_command_timeout_out_of_range(api: Api, wait: object) -> None:
    """A timeout outside 0..60 seconds gets 422 naming query.timeout and stores nothing."""
    await register(api)
    response = await api.client.post(
        f"/v3/devices/{DEVICE}/execute_command", params={"timeout": wait}, json={"name": "reboot"}
    )
    assert_error(response, 422, "query.timeout")
    assert (await stored_counts(api.settings))[1] == 0


async def test_unsupported_expand_is_a_bad_request(api: Api) -> None:
    """expand with anything but log gets 400 on execute, get and list."""
    await register(api)
    execute = await api.client.post(
        f"/v3/devices/{DEVICE}/execute_command", params={"expand": "bogus"}, json={"name": "reboot"}
    )
    assert_error(execute, 400, "expand", "bogus")
    assert (await stored_counts(api.settings))[1] == 0
    execution_id = await create_execution(api, {"name": "reboot"})
    for url in (f"/v3/devices/{DEVICE}/command_executions/{execution_id}", f"/v3/devices/{DEVICE}/command_executions"):
        assert_error(await api.client.get(url, params={"expand": "log,bogus"}), 400, "bogus")


async def test_execute_command_with_a_device_answering_over_mqtt(api: Api) -> None:
    """A device that gets the push and reports 200 makes execute_command return SUCCESS/SUCCEEDED."""
    await register(api)
    async with probe(api.mqtt_port, api.topic("command/change_lux/status")) as device:

        async def answer() -> None:
            push = await device.wait_for(lambda s: s.topic == api.topic("command/change_lux/status") and s.json() != [])
            result = {"id": push.json()[0]["id"], "statusCode": 200, "reasonPhrase": "OK", "payload": {"k": 1850}}
            await device.publish(api.topic("result/change_lux"), [result])

        body = {"name": "change_color_temperature", "arguments": {"temp_kelvins": 1850}}
        request = api.client.post(f"/v3/devices/{DEVICE}/execute_command", params={"expand": "log"}, json=body)
        response = await with_device(answer(), request)
    assert response.status_code == 200, response.text
    execution = response.json()["execution"]
    assert execution["state"] == "SUCCESS"
    assert execution["response"]["state"] == "SUCCEEDED"
    assert execution["response"]["payload"] == {"k": 1850}
    assert RFC3339.match(execution["response"]["received_at"])
    assert execution["log"] == [execution["response"]]


async def test_execute_command_without_an_answer_times_out_and_never_fires_later(api: Api) -> None:
    """execute_command is synchronous: with nobody answering within timeout (and no ttl) the
    execution is TIMEOUT when it returns, and a device that polls afterwards gets nothing."""
    await register(api)
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await api.client.post(
        f"/v3/devices/{DEVICE}/execute_command", params={"timeout": 0.2}, json={"name": "reboot"}
    )
    assert loop.time() - started >= 0.2
    assert response.status_code == 200, response.text
    execution = response.json()["execution"]
    assert execution["state"] == "TIMEOUT"
    assert "response" not in execution
    assert (await api.anon.post(api.kp1("command/reboot"), json={})).json() == []
    late = await api.anon.post(api.kp1("result/reboot"), json=[{"id": int(execution["id"]), "statusCode": 200}])
    assert_error(late, 409, "expired")  # refused; the record keeps TIMEOUT
    assert (await get_execution(api, execution["id"]))["state"] == "TIMEOUT"


async def test_execute_command_with_a_ttl_stays_deliverable_after_the_wait(api: Api) -> None:
    """An explicit ttl is the caller's say: NEW when the wait ends, and delivered afterwards."""
    await register(api)
    response = await api.client.post(
        f"/v3/devices/{DEVICE}/execute_command", params={"timeout": 0.2}, json={"name": "reboot", "ttl": 60}
    )
    execution = response.json()["execution"]
    assert execution["state"] == "NEW"
    polled = await api.anon.post(api.kp1("command/reboot"), json={})
    assert [item["id"] for item in polled.json()] == [int(execution["id"])]


async def test_execute_command_returns_timeout_when_the_command_expires_first(api: Api) -> None:
    """With a ttl shorter than the wait, execute_command returns TIMEOUT once the command expires."""
    await register(api)
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await api.client.post(
        f"/v3/devices/{DEVICE}/execute_command", params={"timeout": 10}, json={"name": "reboot", "ttl": 0.3}
    )
    assert response.status_code == 200, response.text
    assert response.json()["execution"]["state"] == "TIMEOUT"
    assert loop.time() - started < 5


async def test_execute_command_returns_in_progress_after_a_progress_report(api: Api) -> None:
    """A device that only reports 102 within the wait leaves the execution IN_PROGRESS."""
    await register(api)
    body = {"name": "reboot", "ttl": 60}  # without a ttl it would time out at the end of the wait
    request = api.client.post(f"/v3/devices/{DEVICE}/execute_command", params={"timeout": 1}, json=body)
    response = await with_device(answer_over_http(api, "reboot", 102), request)
    execution = response.json()["execution"]
    assert (execution["state"], execution["response"]["state"]) == ("IN_PROGRESS", "IN_PROGRESS")


async def test_create_and_get_execution(api: Api) -> None:
    """Create returns only the execution id; get shows it without log, with log when expanded."""
    await register(api)
    response = await api.client.post(
        f"/v3/devices/{DEVICE}/command_executions", json={"name": "change_lux", "arguments": {"temp_kelvins": 3000}}
    )
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"execution_id"}
    execution_id = response.json()["execution_id"]
    assert execution_id.isdigit()
    plain = await get_execution(api, execution_id)
    assert (plain["id"], plain["state"], "log" in plain) == (execution_id, "NEW", False)
    assert plain["request"] == {
        "name": "change_lux",
        "arguments": {"temp_kelvins": 3000},
        "manifest_name": "change_lux",
    }
    assert (await get_execution(api, execution_id, expand="log"))["log"] == []


async def test_log_is_newest_first(api: Api) -> None:
    """expand=log lists every response newest first: SUCCEEDED, IN_PROGRESS, STARTED."""
    await register(api)
    execution_id = await create_execution(api, {"name": "reboot"})
    await answer_over_http(api, "reboot", 100, 102, 200)
    execution = await get_execution(api, execution_id, expand="log")
    assert [r["state"] for r in execution["log"]] == ["SUCCEEDED", "IN_PROGRESS", "STARTED"]
    assert execution["response"] == execution["log"][0]
    received = [r["received_at"] for r in execution["log"]]
    assert received == sorted(received, reverse=True)


async def test_get_execution_not_found(api: Api) -> None:
    """Unknown, non-numeric and other devices' execution ids get 404."""
    await register(api)
    await register(api, device_id="dev-2", token="tok2")
    other = await create_execution(api, {"name": "reboot"}, device_id="dev-2")
    for execution_id in ("999999", "abc", "-1", "0", "1" * 19, other):
        response = await api.client.get(f"/v3/devices/{DEVICE}/command_executions/{execution_id}")
        assert_error(response, 404)
    assert_error(await api.client.get(f"/v3/devices/nope/command_executions/{other}"), 404)
    assert (await get_execution(api, other, device_id="dev-2"))["id"] == other


@pytest.mark.parametrize(
    "url", ["/v3/devices/dev-1/command_executions/{}", "/api/v1/endpoints/dev-1/commands/reboot/{}"]
)
@pytest.mark.parametrize("odd_id", ["\u00b2", "\u0661"], ids=["superscript-two", "arabic-indic-one"])
async def test_non_ascii_digit_ids_are_not_found(api: Api, url: str, odd_id: str) -> None:
    """Ids of non-ASCII digits get 404: no 500 for superscript two, and Arabic-Indic one is not id 1."""
    await register(api)
    assert await create_execution(api, {"name": "reboot"}) == "1"
    assert_error(await api.client.get(url.format(odd_id)), 404)


async def test_list_executions_filters_orders_and_pages(api: Api) -> None:
    """show hides ephemeral executions by default; order, limit, offset and total_count work."""
    await register(api)
    ids = [await create_execution(api, {"name": "reboot", "ephemeral": n % 2 == 1}) for n in range(5)]
    default = await list_executions(api)
    assert [e["id"] for e in default["executions"]] == ids[0::2]
    assert default["total_count"] == 3
    assert {e["ephemeral"] for e in default["executions"]} == {False}
    everything = await list_executions(api, show="ALL")
    assert ([e["id"] for e in everything["executions"]], everything["total_count"]) == (ids, 5)
    newest = await list_executions(api, show="ALL", order="CREATED_AT_DESC", limit=2, offset=1)
    assert ([e["id"] for e in newest["executions"]], newest["total_count"]) == ([ids[3], ids[2]], 5)
    assert await list_executions(api, show="ALL", offset=10) == {"executions": [], "total_count": 5}
    assert "log" in (await list_executions(api, expand="log"))["executions"][0]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"show": "EPHEMERAL"}, "query.show"),
        ({"order": "NEWEST"}, "query.order"),
        ({"limit": 0}, "query.limit"),
        ({"limit": 1001}, "query.limit"),
        ({"offset": -1}, "query.offset"),
    ],
)
async def test_list_executions_with_bad_parameters(api: Api, params: dict[str, Any], field: str) -> None:
    """Unknown show/order values and out-of-range paging get 422 naming the parameter."""
    await register(api)
    assert_error(await api.client.get(f"/v3/devices/{DEVICE}/command_executions", params=params), 422, field)


async def test_list_executions_of_unknown_device(api: Api) -> None:
    """Listing an unknown device's executions gets 404."""
    assert_error(await api.client.get("/v3/devices/nope/command_executions"), 404)


async def test_idempotency_key_header(api: Api) -> None:
    """The same Idempotency-Key twice gives the same execution and stores one command."""
    await register(api)
    key = {"Idempotency-Key": "order-42"}
    first = await create_execution(api, {"name": "reboot"}, headers=key)
    second = await create_execution(api, {"name": "reboot"}, headers=key)
    executed = await api.client.post(
        f"/v3/devices/{DEVICE}/execute_command", params={"timeout": 0}, json={"name": "reboot"}, headers=key
    )
    assert first == second == executed.json()["execution"]["id"]
    other = await create_execution(api, {"name": "reboot"}, headers={"Idempotency-Key": "order-43"})
    assert other != first
    assert (await list_executions(api, show="ALL"))["total_count"] == 2


async def test_a_used_idempotency_key_with_another_request_is_a_409_on_every_path(api: Api) -> None:
    """The key names one request: its retry gets the first execution; another command or other
    arguments under it are refused with 409 naming the key (HTTP and MQTT admin)."""
    await register(api)
    key = {"Idempotency-Key": "order-9"}
    first = await create_execution(api, {"name": "reboot"}, headers=key)
    assert await create_execution(api, {"name": "reboot"}, headers=key) == first
    lux = {"name": "change_lux", "arguments": {"temp_kelvins": 3000}}
    other = await api.client.post(f"/v3/devices/{DEVICE}/command_executions", json=lux, headers=key)
    assert_error(other, 409)
    assert "order-9" in other.json()["reasonPhrase"]
    async with probe(api.mqtt_port) as admin:
        reply = await admin.request(
            api.admin_topic("invoke/change_lux/1"), {"payload": {"temp_kelvins": 4000}, "idempotencyKey": "order-9"}
        )
    assert reply.topic.endswith("/error")
    assert reply.json()["statusCode"] == 409
    assert (await list_executions(api, show="ALL"))["total_count"] == 1


async def test_idempotency_key_over_mqtt_admin_invoke(api: Api) -> None:
    """An admin invoke with idempotencyKey twice (and the same key over HTTP) is one command."""
    await register(api)
    async with probe(api.mqtt_port) as admin:
        replies = [
            await admin.request(api.admin_topic(f"invoke/reboot/{rid}"), {"payload": {}, "idempotencyKey": "k-7"})
            for rid in (1, 2)
        ]
    assert [r.topic.endswith("/status") for r in replies] == [True, True]
    ids = {r.json()["id"] for r in replies}
    assert len(ids) == 1
    over_http = await create_execution(api, {"name": "reboot"}, headers={"Idempotency-Key": "k-7"})
    assert {int(over_http)} == ids
    assert (await list_executions(api, show="ALL"))["total_count"] == 1


# -- execution states (api/views.py) -------------------------------------------------------------
@pytest.mark.parametrize(
    ("codes", "state", "response_state"),
    [
        ((100,), "IN_PROGRESS", "STARTED"),
        ((102,), "IN_PROGRESS", "IN_PROGRESS"),
        ((102, 200), "SUCCESS", "SUCCEEDED"),
        ((204,), "SUCCESS", "SUCCEEDED"),
        ((302,), "ERROR", "ERROR"),
        ((404,), "ERROR", "ERROR"),
        ((102, 500), "ERROR", "ERROR"),
    ],
)
async def test_state_mapping_from_device_reports(
    api: Api, codes: tuple[int, ...], state: str, response_state: str
) -> None:
    """Execution and response states follow the status codes the device reports."""
    await register(api)
    execution_id = await create_execution(api, {"name": "reboot"})
    assert (await get_execution(api, execution_id))["state"] == "NEW"
    await answer_over_http(api, "reboot", *codes)
    execution = await get_execution(api, execution_id)
    assert (execution["state"], execution["response"]["state"]) == (state, response_state)


async def test_state_timeout_after_expiry(api: Api) -> None:
    """A command with ttl 0.3 and no final result ends in TIMEOUT and is no longer delivered."""
    await register(api)
    execution_id = await create_execution(api, {"name": "reboot", "ttl": 0.3})

    async def timed_out() -> bool:
        return (await get_execution(api, execution_id))["state"] == "TIMEOUT"

    await eventually(timed_out)
    assert (await api.anon.post(api.kp1("command/reboot"), json={})).json() == []


async def test_state_error_after_cancel(api: Api) -> None:
    """A cancelled command shows as ERROR and is no longer delivered."""
    await register(api)
    execution_id = await create_execution(api, {"name": "reboot"})
    response = await api.client.delete(f"/api/v1/endpoints/{DEVICE}/commands/reboot/{execution_id}")
    assert response.status_code == 204
    assert (await get_execution(api, execution_id))["state"] == "ERROR"
    assert (await api.anon.post(api.kp1("command/reboot"), json={})).json() == []


# -- KP1 HTTP binding ----------------------------------------------------------------------------
async def test_kp1_poll_returns_an_array(api: Api) -> None:
    """A poll with {} (or an empty body) returns the outstanding-command array, [] when none."""
    await register(api, manifest=None)
    for body in (b"{}", b"", b'{"observe": true}', b'{"observe": false}'):
        response = await api.anon.post(api.kp1("command/reboot"), content=body, headers=JSON_TYPE)
        assert (response.status_code, response.json()) == (200, [])
    first = await create_execution(api, {"name": "reboot", "arguments": {"n": 1}})
    second = await create_execution(api, {"name": "reboot"})
    await create_execution(api, {"name": "zero"})
    response = await api.anon.post(api.kp1("command/reboot"), json={})
    assert response.json() == [{"id": int(first), "payload": {"n": 1}}, {"id": int(second), "payload": {}}]


@pytest.mark.parametrize("as_array", [False, True], ids=["object", "array"])
async def test_kp1_result_as_object_or_array(api: Api, as_array: bool) -> None:
    """A result as one object or as an array executes the command; it is no longer polled."""
    await register(api)
    execution_id = await create_execution(api, {"name": "reboot"})
    result = {"id": int(execution_id), "statusCode": 200, "reasonPhrase": "OK", "payload": "Success"}
    response = await api.anon.post(api.kp1("result/reboot"), json=[result] if as_array else result)
    assert (response.status_code, response.json()) == (200, {"statusCode": 200, "reasonPhrase": "OK"})
    assert (await api.anon.post(api.kp1("command/reboot"), json={})).json() == []
    execution = await get_execution(api, execution_id)
    assert (execution["state"], execution["response"]["payload"]) == ("SUCCESS", "Success")


async def test_kp1_progress_then_final(api: Api) -> None:
    """After a 102 the command is still polled and IN_PROGRESS; a 200 then executes it."""
    await register(api)
    execution_id = await create_execution(api, {"name": "reboot"})
    progress = {"id": int(execution_id), "statusCode": 102, "payload": {"pct": 50}}
    assert (await api.anon.post(api.kp1("result/reboot"), json=progress)).status_code == 200
    assert [c["id"] for c in (await api.anon.post(api.kp1("command/reboot"), json={})).json()] == [int(execution_id)]
    assert (await get_execution(api, execution_id))["state"] == "IN_PROGRESS"
    final = {"id": int(execution_id), "statusCode": 200}
    assert (await api.anon.post(api.kp1("result/reboot"), json=final)).status_code == 200
    assert (await get_execution(api, execution_id))["state"] == "SUCCESS"
    again = await api.anon.post(api.kp1("result/reboot"), json=final)
    assert_error(again, 409, "already executed")


@pytest.mark.parametrize(
    ("resource", "body", "status", "part"),
    [
        ("command", b"{nope", 400, "malformed JSON"),
        ("command", b"[]", 400, "poll body must be an object"),
        ("command", b'{"observe": "yes"}', 400, "observe"),
        ("result", b"{nope", 400, "malformed JSON"),
        ("result", b"[]", 400, "empty"),
        ("result", b'{"id": "x", "statusCode": 200}', 400, "id"),
        ("result", b'{"id": 1, "statusCode": 99}', 400, "statusCode"),
        ("result", b'{"id": 999999, "statusCode": 200}', 404, "no command 999999"),
        ("result", b'{"id": 1, "statusCode": NaN}', 400, "NaN"),
    ],
)
async def test_kp1_bad_bodies_get_kp1_errors(api: Api, resource: str, body: bytes, status: int, part: str) -> None:
    """Malformed or unknown requests get the KP1 error body with the matching HTTP status."""
    response = await api.anon.post(api.kp1(f"{resource}/reboot"), content=body, headers=JSON_TYPE)
    assert_error(response, status, part)


async def test_kp1_result_for_another_endpoint_or_type_changes_nothing(api: Api) -> None:
    """A result for another endpoint's (or another type's) command is 404 and leaves it untouched."""
    await register(api)
    await register(api, device_id="dev-2", token="tok2")
    execution_id = await create_execution(api, {"name": "reboot"})
    result = {"id": int(execution_id), "statusCode": 200}
    assert_error(await api.anon.post(api.kp1("result/reboot", token="tok2"), json=result), 404)
    assert_error(await api.anon.post(api.kp1("result/change_lux"), json=result), 404)
    assert (await get_execution(api, execution_id))["state"] == "NEW"
    assert [c["id"] for c in (await api.anon.post(api.kp1("command/reboot"), json={})).json()] == [int(execution_id)]
    assert (await api.anon.post(api.kp1("command/reboot", token="tok2"), json={})).json() == []


async def test_kp1_msgpack_variant(api: Api) -> None:
    """The /msgpack routes take and answer MessagePack, errors included; /json is plain JSON."""
    await register(api, manifest=None)
    empty = await api.anon.post(api.kp1("command/reboot/msgpack"), content=msgpack.packb({}), headers=MSGPACK_TYPE)
    assert (empty.status_code, empty.headers["content-type"]) == (200, "application/msgpack")
    assert msgpack.unpackb(empty.content) == []
    execution_id = int(await create_execution(api, {"name": "reboot", "arguments": {"pos": [1, 2]}}))
    polled = await api.anon.post(api.kp1("command/reboot/msgpack"), content=msgpack.packb({}), headers=MSGPACK_TYPE)
    assert msgpack.unpackb(polled.content) == [{"id": execution_id, "payload": {"pos": [1, 2]}}]
    result = msgpack.packb([{"id": execution_id, "statusCode": 200, "payload": {"ok": True}}])
    reply = await api.anon.post(api.kp1("result/reboot/msgpack"), content=result, headers=MSGPACK_TYPE)
    assert (reply.status_code, msgpack.unpackb(reply.content)) == (200, {"statusCode": 200, "reasonPhrase": "OK"})
    unknown = await api.anon.post(
        api.kp1("result/reboot/msgpack"), content=msgpack.packb({"id": 999999, "statusCode": 200}), headers=MSGPACK_TYPE
    )
    assert (unknown.status_code, unknown.headers["content-type"]) == (404, "application/msgpack")
    assert msgpack.unpackb(unknown.content)["statusCode"] == 404
    as_json = await api.anon.post(api.kp1("command/reboot/json"), json={})
    assert (as_json.status_code, as_json.json()) == (200, [])
    assert (await get_execution(api, str(execution_id)))["response"]["payload"] == {"ok": True}


@pytest.mark.parametrize("resource", ["command", "result"])
async def test_kp1_msgpack_decode_errors_are_msgpack(api: Api, resource: str) -> None:
    """A malformed body on a /msgpack route gets a MessagePack 400, like the route's other errors."""
    bad = await api.anon.post(api.kp1(f"{resource}/reboot/msgpack"), content=b"\xc1", headers=MSGPACK_TYPE)
    assert (bad.status_code, bad.headers["content-type"]) == (400, "application/msgpack")
    assert msgpack.unpackb(bad.content) == {"statusCode": 400, "reasonPhrase": "malformed MessagePack: FormatError"}


@pytest.mark.parametrize("resource", ["command", "result"])
async def test_kp1_body_over_the_limit(api: Api, resource: str) -> None:
    """A body over max_payload_bytes gets 413 and registers nothing."""
    body = b'{"pad": "' + b"x" * MAX_PAYLOAD + b'"}'
    response = await api.anon.post(api.kp1(f"{resource}/reboot"), content=body, headers=JSON_TYPE)
    assert_error(response, 413, "exceeds the limit")
    assert await stored_counts(api.settings) == (0, 0)


async def test_kp1_wrong_extension_or_format_in_path(api: Api) -> None:
    """Another extension than cex gets 404; a format other than json/msgpack a 4xx; nothing is registered."""
    response = await api.anon.post(f"/kp1/{api.av}/dcx/{TOKEN}/command/reboot", json={})
    assert_error(response, 404, "unknown extension")
    response = await api.anon.post(api.kp1("command/reboot/xml"), json={})
    assert_error(response, 422, "fmt")
    assert_error(await api.anon.post(api.kp1("status/reboot"), json={}), 404)
    assert (await api.client.get("/v3/devices")).json()["total_count"] == 0


async def test_kp1_bad_names_in_path(api: Api) -> None:
    """A command type outside [A-Za-z0-9_-] or a reserved one gets 400."""
    assert_error(await api.anon.post(api.kp1("command/re.boot"), json={}), 400, "invalid command type")
    assert_error(await api.anon.post(api.kp1("command/status"), json={}), 400, "reserved")
    assert_error(await api.anon.post(api.kp1("command/reboot", token="a.b"), json={}), 400, "invalid endpoint token")


# -- Kaa REST ----------------------------------------------------------------------------------
def kaa(rest: str, endpoint_id: str = DEVICE) -> str:
    return f"/api/v1/endpoints/{endpoint_id}/commands/{rest}"


async def test_kaa_invoke_with_await_and_an_answering_device(api: Api) -> None:
    """With awaitTimeout and a device answering in time the invoke returns 200 with the result."""
    await register(api, manifest=None)
    request = api.client.post(kaa("reboot"), params={"awaitTimeout": 5}, json={"delay": 1})
    response = await with_device(answer_over_http(api, "reboot", 200, payload="Success"), request)
    assert response.status_code == 200, response.text
    command = response.json()
    assert (command["state"], command["endpointId"], command["commandType"]) == ("Executed", DEVICE, "reboot")
    assert command["payload"] == {"delay": 1}
    assert command["result"] == {"statusCode": 200, "reasonPhrase": "r", "payload": "Success"}
    assert "location" not in response.headers
    for stamp in ("createdAt", "updatedAt", "expiresAt"):
        assert RFC3339.match(command[stamp])


async def test_kaa_invoke_without_await_is_accepted_with_location(api: Api) -> None:
    """Without awaitTimeout the invoke is 202 with a Location that GETs the same command."""
    await register(api, manifest=None)
    response = await api.client.post(kaa("reboot"), json={"delay": 1})
    assert response.status_code == 202, response.text
    command = response.json()
    assert (command["state"], command["result"]) == ("Pending", None)
    location = response.headers["location"]
    assert location == kaa(f"reboot/{command['id']}")
    fetched = await api.client.get(location)
    assert (fetched.status_code, fetched.json()) == (200, command)


async def test_kaa_invoke_with_await_and_no_answer(api: Api) -> None:
    """An awaitTimeout that runs out: without commandTtl the command expired with the wait (it never
    fires later); with commandTtl it is 202 and still pending."""
    await register(api, manifest=None)
    response = await api.client.post(kaa("reboot"), params={"awaitTimeout": 0.2}, json={})
    assert (response.status_code, response.json()["state"]) == (200, "Expired")
    assert (await api.anon.post(api.kp1("command/reboot"), json={})).json() == []
    kept = await api.client.post(kaa("reboot"), params={"awaitTimeout": 0.2, "commandTtl": 60_000}, json={})
    assert (kept.status_code, kept.json()["state"]) == (202, "Pending")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"awaitTimeout": 61}, "awaitTimeout"),
        ({"awaitTimeout": -1}, "awaitTimeout"),
        ({"awaitTimeout": "soon"}, "awaitTimeout"),
        ({"commandTtl": -1}, "commandTtl"),
        ({"commandTtl": 1.5}, "commandTtl"),
    ],
)
async def test_kaa_invoke_with_bad_parameters(api: Api, params: dict[str, Any], field: str) -> None:
    """A bad awaitTimeout gets 400 (as Kaa answers), a bad commandTtl 422, both as JSON; nothing is stored."""
    await register(api, manifest=None)
    status = 400 if field == "awaitTimeout" else 422
    assert_error(await api.client.post(kaa("reboot"), params=params, json={}), status, field)
    assert (await stored_counts(api.settings))[1] == 0


async def test_kaa_invoke_errors(api: Api) -> None:
    """Unknown endpoints are 404, bad types and bad JSON 400, manifest violations 422, big bodies 413."""
    await register(api)
    assert_error(await api.client.post(kaa("reboot", endpoint_id="nope"), json={}), 404, "nope")
    assert_error(await api.client.post(kaa("re.boot"), json={}), 422, "not in the device's manifest")
    assert_error(await api.client.post(kaa("change_lux"), json={"temp_kelvins": 1}), 422, "temp_kelvins")
    assert_error(await api.client.post(kaa("reboot"), content=b"{nope", headers=JSON_TYPE), 400, "malformed JSON")
    big = b'"' + b"x" * MAX_PAYLOAD + b'"'
    assert_error(await api.client.post(kaa("reboot"), content=big, headers=JSON_TYPE), 413)
    assert (await stored_counts(api.settings))[1] == 0


async def test_kaa_invoke_with_alias_and_curl_form_body(api: Api) -> None:
    """A manifest alias invokes the real type; a curl -d (form-labelled) JSON body is read as JSON."""
    await register(api)
    response = await api.client.post(
        kaa("change_color_temperature"),
        content=b'{"temp_kelvins": 2700}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 202, response.text
    assert (response.json()["commandType"], response.json()["payload"]) == ("change_lux", {"temp_kelvins": 2700})


async def test_kaa_get_last_and_list(api: Api) -> None:
    """GET .../last is the newest of a type; the list filters by endpointId and commandTypes."""
    await register(api, manifest=None)
    await register(api, device_id="dev-2", token="tok2", manifest=None)
    ids: dict[tuple[str, str], list[int]] = {}
    for device, command_type in ((DEVICE, "a"), (DEVICE, "b"), (DEVICE, "c"), (DEVICE, "a"), ("dev-2", "a")):
        created = (await api.client.post(kaa(command_type, device))).json()
        ids.setdefault((device, command_type), []).append(created["id"])
    last = await api.client.get(kaa("a/last"))
    assert (last.status_code, last.json()["id"]) == (200, ids[(DEVICE, "a")][-1])
    assert_error(await api.client.get(kaa("zzz/last")), 404)
    assert_error(await api.client.get(kaa("a/last", "nope")), 404)
    listed = await api.client.get("/api/v1/endpoints/commands", params={"endpointId": DEVICE, "commandTypes": "a,b"})
    assert [c["id"] for c in listed.json()] == sorted(ids[(DEVICE, "a")] + ids[(DEVICE, "b")])
    both = await api.client.get("/api/v1/endpoints/commands", params=[("endpointId", DEVICE), ("endpointId", "dev-2")])
    assert len(both.json()) == 5
    assert {c["endpointId"] for c in both.json()} == {DEVICE, "dev-2"}
    assert_error(await api.client.get("/api/v1/endpoints/commands", params={"endpointId": "nope"}), 404)
    assert_error(await api.client.get("/api/v1/endpoints/commands"), 422, "endpointId")
    bad = await api.client.get("/api/v1/endpoints/commands", params={"endpointId": DEVICE, "commandTypes": "a.b"})
    assert_error(bad, 400, "invalid command type")


async def test_kaa_get_command_not_found(api: Api) -> None:
    """A command id of another type, another endpoint, unknown or non-numeric is 404."""
    await register(api, manifest=None)
    await register(api, device_id="dev-2", token="tok2", manifest=None)
    command_id = (await api.client.post(kaa("reboot"))).json()["id"]
    for url in (kaa(f"zero/{command_id}"), kaa(f"reboot/{command_id}", "dev-2"), kaa("reboot/999999"), kaa("reboot/x")):
        assert_error(await api.client.get(url), 404)
        assert_error(await api.client.delete(url), 404)
    assert (await api.client.get(kaa(f"reboot/{command_id}"))).json()["state"] == "Pending"


async def test_kaa_delete_cancels_once(api: Api) -> None:
    """DELETE is 204 and cancels the command; a second DELETE is 409; it is never polled again."""
    await register(api, manifest=None)
    command_id = (await api.client.post(kaa("reboot"))).json()["id"]
    response = await api.client.delete(kaa(f"reboot/{command_id}"))
    assert (response.status_code, response.content) == (204, b"")
    assert (await api.client.get(kaa(f"reboot/{command_id}"))).json()["state"] == "Cancelled"
    assert_error(await api.client.delete(kaa(f"reboot/{command_id}")), 409)
    assert (await api.anon.post(api.kp1("command/reboot"), json={})).json() == []
    late = await api.anon.post(api.kp1("result/reboot"), json={"id": command_id, "statusCode": 200})
    assert_error(late, 409, "cancelled")


async def test_kaa_delete_of_an_executed_command_is_a_conflict(api: Api) -> None:
    """Cancelling a command that already has its result is 409 and keeps it Executed."""
    await register(api, manifest=None)
    command_id = (await api.client.post(kaa("reboot"))).json()["id"]
    await answer_over_http(api, "reboot", 200)
    assert_error(await api.client.delete(kaa(f"reboot/{command_id}")), 409)
    assert (await api.client.get(kaa(f"reboot/{command_id}"))).json()["state"] == "Executed"


async def test_kaa_command_ttl_zero_expires_fast(api: Api) -> None:
    """commandTtl=0 ("push once") expires within seconds; commandTtl in ms sets expiresAt."""
    await register(api, manifest=None)
    command = (await api.client.post(kaa("reboot"), params={"commandTtl": 0})).json()
    long_lived = (await api.client.post(kaa("zero"), params={"commandTtl": 60000})).json()
    assert long_lived["expiresAt"] > command["expiresAt"]

    async def expired() -> bool:
        return (await api.client.get(kaa(f"reboot/{command['id']}"))).json()["state"] == "Expired"

    await eventually(expired, within_s=5)
    assert (await api.anon.post(api.kp1("command/reboot"), json={})).json() == []
    assert (await api.client.get(kaa(f"zero/{long_lived['id']}"))).json()["state"] == "Pending"


# -- registry modes ----------------------------------------------------------------------------
async def test_closed_registry_refuses_unknown_tokens_over_http(closed_api: Api) -> None:
    """In closed mode an unknown token gets 404 on the KP1 binding and nothing is stored."""
    api = closed_api
    assert_error(await api.anon.post(api.kp1("command/reboot", token="stranger"), json={}), 404, "not registered")
    result = {"id": 1, "statusCode": 200}
    assert_error(await api.anon.post(api.kp1("result/reboot", token="stranger"), json=result), 404, "not registered")
    assert (await api.client.get("/v3/devices")).json()["total_count"] == 0
    assert await stored_counts(api.settings) == (0, 0)


async def test_closed_registry_refuses_unknown_tokens_over_mqtt(closed_api: Api) -> None:
    """In closed mode an unknown token's poll and admin invoke get a 404 /error reply; nothing is stored."""
    api = closed_api
    async with probe(api.mqtt_port) as client:
        poll = await client.request(api.topic("command/reboot/1", token="stranger"), {})
        invoke = await client.request(api.admin_topic("invoke/reboot/2", token="stranger"), {"payload": 1})
    for reply in (poll, invoke):
        assert reply.topic.endswith("/error")
        assert reply.json()["statusCode"] == 404
    assert await stored_counts(api.settings) == (0, 0)


async def test_closed_registry_serves_registered_devices(closed_api: Api) -> None:
    """In closed mode a registered device polls over HTTP and MQTT and gets its commands."""
    api = closed_api
    await register(api)
    execution_id = int(await create_execution(api, {"name": "reboot"}))
    polled = await api.anon.post(api.kp1("command/reboot"), json={})
    assert [c["id"] for c in polled.json()] == [execution_id]
    async with probe(api.mqtt_port) as device:
        reply = await device.request(api.topic("command/reboot/1"), {})
    assert (reply.topic.endswith("/status"), [c["id"] for c in reply.json()]) == (True, [execution_id])


async def test_closed_registry_follows_token_changes_and_deletes(closed_api: Api) -> None:
    """In closed mode a re-tokened device is served under its new token only, a deleted one not at all."""
    api = closed_api
    await register(api)
    assert (await api.anon.post(api.kp1("command/reboot"), json={})).status_code == 200
    patched = await api.client.patch(f"/v3/devices/{DEVICE}", json={"endpoint_token": "tok9"})
    assert patched.status_code == 200, patched.text
    assert_error(await api.anon.post(api.kp1("command/reboot"), json={}), 404, "not registered")
    assert (await api.anon.post(api.kp1("command/reboot", token="tok9"), json={})).status_code == 200
    assert (await api.client.delete(f"/v3/devices/{DEVICE}")).status_code == 204
    assert_error(await api.anon.post(api.kp1("command/reboot", token="tok9"), json={}), 404, "not registered")


async def test_open_registry_registers_unknown_tokens_on_first_contact(api: Api) -> None:
    """In open mode a poll from an unknown token registers the device, visible in GET /v3/devices."""
    assert (await api.anon.post(api.kp1("command/reboot", token="newcomer"), json={})).json() == []
    devices = (await api.client.get("/v3/devices")).json()
    assert devices["total_count"] == 1
    device = devices["devices"][0]
    assert (device["app_version"], device["endpoint_token"], device["manifest"]) == (api.av, "newcomer", None)
    async with probe(api.mqtt_port) as client:
        reply = await client.request(api.topic("command/reboot/1", token="mqtt-newcomer"), {})
    assert reply.topic.endswith("/status")
    assert (await api.client.get("/v3/devices")).json()["total_count"] == 2
