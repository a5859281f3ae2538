"""The console's Rollouts pages, under /console/rollouts: the list, the create form (with a dry run),
one rollout's live progress and devices, and Pause / Resume / Cancel.

Like every console action these call the service layer (``RolloutService``), so a refusal is the
same error as over HTTP, MQTT or the CLI, shown in the page. Sessions, CSRF and rendering are the
console's (``routes``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Path, Query, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from broker_bridge.console.live import LiveEvents
from broker_bridge.console.routes import (
    KEEPALIVE_S,
    _checked,
    _invoker,
    _json_field,
    _labels,
    _page,
    _problem,
    _service,
    _session,
)
from broker_bridge.errors import BadRequest, BridgeError, Conflict, Unprocessable
from broker_bridge.rollout_service import Preview, RolloutService, parse_spec
from broker_bridge.rollouts import (
    CAN_CANCEL,
    CAN_PAUSE,
    CAN_RESUME,
    DONE,
    FINISHED,
    DeviceState,
    Rollout,
    to_record,
)

router = APIRouter(include_in_schema=False)
PAGE = 25
SHOWN_IDS = 20  # device ids a preview lists
RolloutId = Annotated[int, Path(ge=1, le=2**63 - 1)]
# The stacked bar's order: the outcomes first, then what is still going, then what waits.
BAR_ORDER = (
    DeviceState.SUCCEEDED,
    DeviceState.FAILED,
    DeviceState.TIMED_OUT,
    DeviceState.CANCELLED,
    DeviceState.SKIPPED,
    DeviceState.IN_PROGRESS,
    DeviceState.SENT,
    DeviceState.QUEUED,
)


def _rollouts(request: Request) -> RolloutService:
    return RolloutService(_service(request))


# -- what the pages show of a rollout ----------------------------------------------------------------
def segments(rollout: Rollout) -> list[dict[str, Any]]:
    """The stacked bar of its device states: each state's share, in a 0-100 wide view box."""
    total, x, found = rollout.total, 0.0, []
    for state in BAR_ORDER:
        count = rollout.counts.get(state, 0)
        if count and total:
            width = 100 * count / total
            found.append({"state": state.value, "count": count, "x": round(x, 3), "width": round(width, 3)})
            x += width
    return found


def rate_now(rollout: Rollout) -> str:
    if rollout.state in FINISHED:
        return "stopped"
    per_minute = rollout.pace.per_minute
    return "unlimited" if per_minute is None else f"{per_minute:g}/min"


def view(rollout: Rollout) -> dict[str, Any]:
    done = sum(rollout.counts.get(s, 0) for s in DONE)
    summary = ", ".join(f"{rollout.counts[s]} {s.value}" for s in BAR_ORDER if rollout.counts.get(s))
    return {
        "rollout": rollout,
        "counts": [(s.value, rollout.counts.get(s, 0)) for s in DeviceState],
        "summary": summary or "no devices",
        "segments": segments(rollout),
        "done": done,
        "percent": round(100 * done / rollout.total) if rollout.total else 100,
        "rate": rate_now(rollout),
        "live": rollout.state not in FINISHED,
        "can": {"pause": rollout.state in CAN_PAUSE, "resume": rollout.state in CAN_RESUME,
                "cancel": rollout.state in CAN_CANCEL},
    }  # fmt: skip


# -- the create form -----------------------------------------------------------------------------------
class RolloutForm(BaseModel):
    """The create form as sent: text fields, empty meaning "not given". Numbers stay text here so the
    spec's own validation judges them, and its error names the spec field (``rate.max_per_minute``)."""

    command: str = Field(default="", max_length=256)
    arguments: str = Field(default="", max_length=1_000_000)
    device_ids: str = Field(default="", max_length=4_000_000)
    labels: str = Field(default="", max_length=10_000)
    max_per_minute: str = Field(default="", max_length=64)
    max_in_flight: str = Field(default="", max_length=64)
    abort_outcome: str = Field(default="", max_length=64)
    abort_threshold_percent: str = Field(default="", max_length=64)
    abort_min_executed: str = Field(default="", max_length=64)
    retry_max_attempts: str = Field(default="", max_length=64)
    timeout_s: str = Field(default="", max_length=64)
    start_at: str = Field(default="", max_length=64)
    action: Literal["create", "preview"] = "create"
    csrf: str | None = Field(default=None, max_length=256)

    def spec_body(self) -> dict[str, Any]:
        """The body ``parse_spec`` takes, as the API's clients send it."""
        command: dict[str, Any] = {"name": self.command.strip()}
        if self.arguments.strip():
            command["arguments"] = _json_field(self.arguments, "arguments")
        ids = [i for chunk in self.device_ids.splitlines() for i in (p.strip() for p in chunk.split(",")) if i]
        body: dict[str, Any] = {
            "command": command,
            "target": {"device_ids": ids, "labels": _labels(self.labels)},
            "rate": _given(max_per_minute=self.max_per_minute, max_in_flight=self.max_in_flight),
            "retry": _given(max_attempts=self.retry_max_attempts),
            "dry_run": self.action == "preview",
        }
        if not self.abort_outcome.strip() and (self.abort_threshold_percent.strip() or self.abort_min_executed.strip()):
            raise Unprocessable("abort.0.outcome: choose what to abort on, or clear the threshold and minimum")
        if self.abort_outcome.strip():
            rule = {"outcome": self.abort_outcome.strip()}
            body["abort"] = [rule | _given(threshold_percent=self.abort_threshold_percent,
                                           min_executed=self.abort_min_executed)]  # fmt: skip
        return body | _given(timeout_s=self.timeout_s, start_at=_utc(self.start_at))


def _given(**fields: str) -> dict[str, str]:
    return {name: text.strip() for name, text in fields.items() if text.strip()}


def _utc(text: str) -> str:
    """A date and time without an offset (what a datetime-local field sends) is UTC, as the form says."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return text  # the spec's validation names it
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


# -- pages ---------------------------------------------------------------------------------------------
@router.get("/console/rollouts")
async def rollout_list(
    request: Request, offset: Annotated[int, Query(ge=0, le=10**9)] = 0, partial: bool = False
) -> Response:
    """Every rollout, newest first, live; and the create form."""
    _session(request)
    found, total = await _rollouts(request).page(PAGE, offset)
    context: dict[str, Any] = {"rows": [view(r) for r in found], "total": total, "offset": offset, "page": PAGE}
    return _page(request, "_rollouts.html" if partial else "rollouts.html", **context)


@router.post("/console/rollouts")
async def create(request: Request, form: Annotated[RolloutForm, Form()]) -> Response:
    """Create (to its page) or, the "Preview" button, a dry run: which devices, nothing created."""
    session = _checked(request, form.csrf)
    try:
        spec = parse_spec(form.spec_body())
        made = await _rollouts(request).create(spec, invoked_by=_invoker(request, session))
    except BridgeError as exc:
        return _problem(request, exc)
    if isinstance(made, Preview):
        return _page(request, "_rollout_preview.html", preview=made, shown=made.device_ids[:SHOWN_IDS])
    url = f"/console/rollouts/{made.id}"
    if request.headers.get("hx-request"):  # htmx follows this with a whole-page visit
        return Response(f"Rollout {made.id} created", status_code=201, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


@router.get("/console/rollouts/{rollout_id}")
async def rollout_page(request: Request, rollout_id: RolloutId) -> Response:
    _session(request)
    try:
        rollout = await _rollouts(request).get(rollout_id)
    except BridgeError as exc:
        return _page(request, "_problem.html", exc.status_code, error=exc, standalone=True)
    record = to_record(rollout)
    return _page(
        request,
        "rollout.html",
        **view(rollout),
        record=record,
        arguments=json.dumps(record["command"]["arguments"], indent=2, ensure_ascii=False),
        states=[s.value for s in DeviceState],
        members=await _members(request, rollout_id, "", 0),
    )


@router.get("/console/rollouts/{rollout_id}/progress")
async def progress(request: Request, rollout_id: RolloutId) -> Response:
    """The live part of a rollout's page: counters, bars, the rule that tripped, the buttons."""
    _session(request)
    try:
        rollout = await _rollouts(request).get(rollout_id)
    except BridgeError as exc:
        return _problem(request, exc)
    return _page(request, "_rollout_progress.html", **view(rollout))


@router.get("/console/rollouts/{rollout_id}/devices")
async def devices(
    request: Request,
    rollout_id: RolloutId,
    state: Annotated[str, Query(max_length=20)] = "",
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> Response:
    _session(request)
    try:
        members = await _members(request, rollout_id, state, offset)
    except BridgeError as exc:
        return _problem(request, exc)
    return _page(request, "_rollout_devices.html", members=members)


async def _members(request: Request, rollout_id: int, state: str, offset: int) -> dict[str, Any]:
    """A page of the rollout's devices (only those in ``state``, if given), for the devices table."""
    try:
        states = frozenset({DeviceState(state)}) if state else frozenset()
    except ValueError:
        raise BadRequest(f"unknown state {state!r}; one of {', '.join(s.value for s in DeviceState)}") from None
    rollout = await _rollouts(request).get(rollout_id)
    found, total = await _rollouts(request).members(rollout_id, states, PAGE, offset)
    return {"rows": found, "total": total, "offset": offset, "page": PAGE, "state": state,
            "rollout_id": rollout_id, "live": rollout.state not in FINISHED}  # fmt: skip


@router.post("/console/rollouts/{rollout_id}/{action}")
async def steer(
    request: Request,
    rollout_id: RolloutId,
    action: Literal["pause", "resume", "cancel"],
    csrf: Annotated[str | None, Form()] = None,
) -> Response:
    """Pause, Resume or Cancel; the progress as it is then, with the refusal (409) if there was one."""
    _checked(request, csrf)
    service = _rollouts(request)
    moves: dict[str, Callable[[int], Awaitable[Rollout]]] = {
        "pause": service.pause, "resume": service.resume, "cancel": service.cancel
    }  # fmt: skip
    try:
        rollout = await moves[action](rollout_id)
    except Conflict as exc:
        return _page(request, "_rollout_progress.html", exc.status_code, **view(await service.get(rollout_id)),
                     error=exc)  # fmt: skip
    except BridgeError as exc:
        return _problem(request, exc)
    return _page(request, "_rollout_progress.html", **view(rollout))


# -- live updates --------------------------------------------------------------------------------------
@router.get("/console/events/rollouts")
async def rollout_events(
    request: Request, rollout: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None
) -> Response:
    """Server-sent events: ``changed`` (data: a rollout id) whenever that rollout (or any) changes on
    this instance, at most once per change however many steps announced it meanwhile."""
    _session(request)
    if rollout is not None:
        try:
            await _rollouts(request).get(rollout)
        except BridgeError as exc:
            return _problem(request, exc)
    live: LiveEvents = request.app.state.live
    listener = live.listen_rollouts(rollout)

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield b": connected\n\n"
            while True:
                try:
                    first = await asyncio.wait_for(listener.queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                changed = {first}
                while not listener.queue.empty():
                    changed.add(listener.queue.get_nowait())
                for rollout_id in sorted(changed):
                    yield f"event: changed\ndata: {rollout_id}\n\n".encode()
        finally:
            live.forget_rollouts(listener)

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)
