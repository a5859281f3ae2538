"""Property-based runs over the OpenAPI document against the live HTTP server, with and without a key."""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings, strategies
from schemathesis import Case, GenerationMode

from broker_bridge.api import create_app
from broker_bridge.metrics import Metrics
from broker_bridge.service import CommandService
from broker_bridge.store.memory import MemoryStore
from broker_bridge.topics import TopicScheme
from tests.conftest import free_port
from tests.harness import WAIT_S, make_settings, running_service

pytestmark = pytest.mark.slow

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
APP_VERSION = "fuzz-v1"
DEVICE = "dev-1"
TOKEN = "tok1"
COMMAND_TYPE = "reboot"
MAX_EXAMPLES = 40
MAX_WAIT_S = 0.2  # execute_command and Kaa invokes wait at most this long, to keep the run short


def _document() -> dict[str, Any]:
    app = create_app(
        CommandService(MemoryStore()),
        api_keys=[KEY],
        scheme=TopicScheme(),
        max_payload_bytes=256 * 1024,
        metrics=Metrics(),
        broker_connected=lambda: True,
    )
    return app.openapi()


DOCUMENT = _document()
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT)
OPERATIONS = {op.label: op for op in (result.ok() for result in SCHEMA.get_all_operations())}
ADMIN = frozenset(
    f"{method.upper()} {path}"
    for path, item in DOCUMENT["paths"].items()
    for method, operation in item.items()
    if operation.get("security")
)

# Admin operations whose JSON body FastAPI parses into a model (the others read the raw body themselves).
PARSED_BODY = frozenset(
    f"{method.upper()} {path}"
    for path, item in DOCUMENT["paths"].items()
    for method, operation in item.items()
    if "$ref" in str(operation.get("requestBody", {}).get("content", {}).get("application/json", {}))
)

# Operations that take any input at all: only those have requests that break the schema.
WITH_INPUT = frozenset(
    f"{method.upper()} {path}"
    for path, item in DOCUMENT["paths"].items()
    for method, operation in item.items()
    if operation.get("parameters") or operation.get("requestBody")
)


@dataclass
class Live:
    """The service running in a thread of its own, and what the run found in it."""

    base_url: str
    execution_ids: list[str] = field(default_factory=list)

    def restore_device(self) -> None:
        """Put the fuzzed device back as it was (a case may have deleted or changed it)."""
        with httpx.Client(base_url=self.base_url, headers=AUTH, timeout=WAIT_S) as client:
            client.delete(f"/v3/devices/{DEVICE}")
            body = {"id": DEVICE, "app_version": APP_VERSION, "endpoint_token": TOKEN, "labels": {"fuzz": "yes"}}
            assert client.post("/v3/devices", json=body).status_code == 201


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The whole service in a background event loop (case.call is synchronous), with a device and commands."""
    settings = make_settings(tmp_path_factory.mktemp("fuzz"), free_port(), api_keys=[KEY], log_level="warning")
    started = threading.Event()
    control: dict[str, Any] = {}

    async def main() -> None:
        control["loop"], control["stop"] = asyncio.get_running_loop(), asyncio.Event()
        async with running_service(settings):
            started.set()
            await control["stop"].wait()

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="service-under-fuzz", daemon=True)
    thread.start()
    try:
        assert started.wait(WAIT_S * 2), "service did not start"
        found = Live(base_url=f"http://{settings.http_listen}")
        found.restore_device()
        with httpx.Client(base_url=found.base_url, headers=AUTH, timeout=WAIT_S) as client:
            for n in range(3):
                body = {"name": COMMAND_TYPE, "arguments": {"n": n}, "ephemeral": n == 2}
                created = client.post(f"/v3/devices/{DEVICE}/command_executions", json=body)
                found.execution_ids.append(created.json()["execution_id"])
        yield found
    finally:
        if "loop" in control:
            control["loop"].call_soon_threadsafe(control["stop"].set)
        thread.join(WAIT_S * 3)


def aim_at_real_data(case: Case, live: Live, n: int) -> None:
    """Every other case, swap generated identifiers for ones that exist, and bound every wait."""
    path = case.path_parameters if case.path_parameters is not None else {}
    if n % 2 == 0:
        known = {
            "device_id": DEVICE,
            "endpointId": DEVICE,
            "app_version": APP_VERSION,
            "extension": "cex",
            "token": TOKEN,
            "command_type": COMMAND_TYPE,
            "commandType": COMMAND_TYPE,
            "execution_id": live.execution_ids[n // 2 % len(live.execution_ids)],
            "commandId": live.execution_ids[n // 2 % len(live.execution_ids)],
        }
        for name in path.keys() & known.keys():
            path[name] = known[name]
        if case.query is not None and "endpointId" in case.query:
            case.query["endpointId"] = [DEVICE]
    query = case.query if case.query is not None else {}
    if case.path.endswith("/execute_command"):  # waits 10 s by default
        query["timeout"] = _bounded_wait(query.get("timeout", MAX_WAIT_S))
    for name in ("awaitTimeout", "wait"):  # these wait only when asked to
        if name in query:
            query[name] = _bounded_wait(query[name])
    case.query = query


def _bounded_wait(value: Any) -> Any:
    """A wait in seconds of at most MAX_WAIT_S; a value that is no number stays (it gets a 422)."""
    try:
        return min(float(value), MAX_WAIT_S)
    except (TypeError, ValueError):
        return value


@dataclass
class Findings:
    """Responses by status, and every response that breaks a property."""

    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    problems: list[str] = field(default_factory=list)

    def check(self, case: Case, response: Any, with_key: bool) -> None:
        status = response.status_code
        self.statuses[status] += 1
        problem = None
        if status >= 500:
            problem = "server error"
        elif not with_key and case.operation.label in ADMIN and status != 401:
            problem = "admin route answered without a valid key"
        elif status >= 400 and _content_type(response).startswith("application/json"):
            body = response.json()
            if not (isinstance(body, dict) and set(body) == {"statusCode", "reasonPhrase"}):
                problem = "error body is not {statusCode, reasonPhrase}"
            elif body["statusCode"] != status:
                problem = "error body statusCode differs from the HTTP status"
        if problem is not None:
            self.problems.append(f"{problem}: {status} {response.text[:200]!r}\n    {case.as_curl_command()}")


def _content_type(response: Any) -> str:
    values: list[str] = response.headers.get("content-type", [""])  # lower-case names, list values
    return values[0] if values else ""


def fuzz(live: Live, label: str, with_key: bool, modes: list[GenerationMode]) -> Findings:
    """Run generated cases of one operation against the live server; what they found."""
    operation = OPERATIONS[label]
    findings = Findings()
    counter = itertools.count()

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategies.one_of(*(operation.as_strategy(generation_mode=mode) for mode in modes)))
    def run(case: Case) -> None:
        aim_at_real_data(case, live, next(counter))
        response = case.call(base_url=live.base_url, headers=AUTH if with_key else None, timeout=WAIT_S)
        findings.check(case, response, with_key)
        if with_key and case.method in ("DELETE", "PATCH") and (case.path_parameters or {}).get("device_id") == DEVICE:
            live.restore_device()

    run()
    return findings


def test_live_document_is_the_one_fuzzed(live: Live) -> None:
    """The running service serves the OpenAPI document the runs are generated from."""
    served = httpx.get(f"{live.base_url}/openapi.json", timeout=WAIT_S).json()
    assert served == DOCUMENT
    assert len(ADMIN) >= 12
    assert {
        "POST /v3/devices",
        "PATCH /v3/devices/{device_id}",
        "POST /v3/devices/{device_id}/command_executions",
        "POST /v3/devices/{device_id}/execute_command",
        "POST /v3/devices/{device_id}/command_executions/{execution_id}/rerun",
    } == PARSED_BODY
    assert len(OPERATIONS) == sum(len(item) for item in DOCUMENT["paths"].values())


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_with_a_key_no_operation_fails_on_the_server(live: Live, label: str) -> None:
    """With a valid key, generated requests never get a 5xx, and every JSON error has the KP1 error shape."""
    findings = fuzz(live, label, with_key=True, modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    assert not findings.problems, "\n".join(findings.problems[:5])
    assert set(findings.statuses) != {404}, "no case reached real data"


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_without_credentials_admin_operations_answer_401(live: Live, label: str) -> None:
    """Without credentials (or with generated wrong ones) admin operations answer only 401, nothing 5xx."""
    findings = fuzz(live, label, with_key=False, modes=[GenerationMode.POSITIVE])
    assert not findings.problems, "\n".join(findings.problems[:5])
    if label in ADMIN:
        assert set(findings.statuses) == {401}


@pytest.mark.parametrize("label", sorted(WITH_INPUT))
def test_without_credentials_malformed_requests_answer_401(live: Live, label: str) -> None:
    """Requests that break the schema get 401 on admin operations without credentials, whatever is malformed."""
    findings = fuzz(live, label, with_key=False, modes=[GenerationMode.NEGATIVE])
    assert not findings.problems, "\n".join(findings.problems[:5])
