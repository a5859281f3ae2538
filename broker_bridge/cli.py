"""``broker-bridge``: serve, invoke, list, show, cancel, rerun, device(s). Thin: parse, build settings, call."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import aiomqtt

from broker_bridge import __version__, logs, runtime
from broker_bridge.api import views
from broker_bridge.bridge import client_options
from broker_bridge.commands import Command, CommandState, rfc3339, to_record
from broker_bridge.config import Settings, load_settings
from broker_bridge.device import DeviceSimulator, parse_answer
from broker_bridge.errors import BadRequest, BridgeError, StartupError
from broker_bridge.outbox import Outbox, Publication
from broker_bridge.protocol import decode
from broker_bridge.rollout_service import Preview, RolloutService, parse_spec
from broker_bridge.rollouts import DeviceState, Rollout, member_record
from broker_bridge.rollouts import to_record as rollout_record
from broker_bridge.service import CommandService
from broker_bridge.store import CommandQuery
from broker_bridge.topics import Codec, Format, make_target

EXIT_ERROR = 1
EXIT_USAGE = 2


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file (default: $BROKER_BRIDGE_CONFIG)")
    parser.add_argument(
        "--db", help="SQLite database file (default: ./broker-bridge.db) or a postgresql:// URL (libpq URI)"
    )
    parser.add_argument("--mqtt-listen", help="embedded broker address HOST:PORT (default 127.0.0.1:1883)")
    parser.add_argument("--broker-url", help="external broker, mqtt://user:pass@host:port; no embedded broker")
    parser.add_argument("--log-format", choices=["console", "json"])
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker-bridge", description="Kaa KP1 command execution over MQTT")
    parser.add_argument("--version", action="version", version=f"broker-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the service (embedded broker unless --broker-url)")
    _common(serve)
    serve.add_argument("--http-listen", help="HTTP API address HOST:PORT (default 127.0.0.1:8080)")
    serve.add_argument(
        "--instance", help="this instance's name, unique among those sharing a database (default: host name)"
    )
    invoke = sub.add_parser("invoke", help="invoke a command on a device")
    invoke.add_argument("app_version")
    invoke.add_argument("token")
    invoke.add_argument("type")
    invoke.add_argument("--payload", default="null", help="command payload as JSON (default null)")
    invoke.add_argument("--ttl", type=float, help="seconds the command stays deliverable")
    invoke.add_argument(
        "--idempotency-key",
        help="run at most once per key for this device: a retry with the same key gets the first command "
        "(the same key with another type or payload is refused)",
    )
    listing = sub.add_parser("list", help="list command history, newest first")
    listing.add_argument("--app-version")
    listing.add_argument("--token")
    listing.add_argument("--type")
    listing.add_argument("--state", choices=[s.value for s in CommandState], action="append")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--offset", type=int, default=0)
    show = sub.add_parser("show", help="show one command with its log")
    show.add_argument("id", type=int)
    cancel = sub.add_parser("cancel", help="cancel an outstanding command")
    cancel.add_argument("id", type=int)
    rerun = sub.add_parser("rerun", help="invoke a command again (same device, type and payload)")
    rerun.add_argument("id", type=int)
    rerun.add_argument("--ttl", type=float, help="seconds the re-run stays deliverable (default: the original's)")
    for command_parser in (invoke, listing, show, cancel, rerun):
        _common(command_parser)
        command_parser.add_argument("--json", action="store_true", help="print the command record(s) as JSON")
    _device_parser(sub.add_parser("device", help="simulate a KP1 device that answers commands"))
    _devices_parser(sub.add_parser("devices", help="manage the device registry"))
    _rollout_parser(sub.add_parser("rollout", help="fleet rollouts: one command to many devices"))
    return parser


def _rollout_parser(rollout: argparse.ArgumentParser) -> None:
    actions = rollout.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a rollout from a JSON spec (the body of POST /v3/rollouts)")
    create.add_argument("spec", type=Path, help="JSON file, or - for standard input (README: Fleet rollouts)")
    create.add_argument("--dry-run", action="store_true", help="only resolve and count the devices")
    listing = actions.add_parser("list", help="list rollouts, newest first")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--offset", type=int, default=0)
    members = actions.add_parser("devices", help="a rollout's devices and their states")
    members.add_argument("id", type=int)
    members.add_argument("--state", choices=[s.value for s in DeviceState], action="append")
    members.add_argument("--limit", type=int, default=100)
    members.add_argument("--offset", type=int, default=0)
    for name in ("show", "pause", "resume", "cancel", "watch"):
        actions.add_parser(name, help=f"{name} a rollout").add_argument("id", type=int)
    for parser in actions.choices.values():
        _common(parser)
        parser.add_argument("--json", action="store_true", help="print JSON")


def _devices_parser(devices: argparse.ArgumentParser) -> None:
    actions = devices.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="register a device")
    add.add_argument("--app-version", required=True)
    add.add_argument("--token", required=True)
    add.add_argument("--id", help="device id (default: a generated UUID)")
    update = actions.add_parser("update", help="change a registered device")
    update.add_argument("id")
    update.add_argument("--app-version")
    update.add_argument("--token")
    update.add_argument("--no-manifest", action="store_true", help="remove the manifest")
    for parser in (add, update):
        parser.add_argument("--label", action="append", metavar="KEY=VALUE", help="repeatable")
        parser.add_argument("--manifest", type=Path, help="JSON file: {\"commands\": {...}} (see README)")
    listing = actions.add_parser("list", help="list registered devices")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--offset", type=int, default=0)
    listing.add_argument(
        "--label", action="append", metavar="KEY=VALUE", help="only devices with this label (repeatable: all)"
    )
    presence = listing.add_mutually_exclusive_group()
    presence.add_argument("--connected", action="store_true", help="only devices known to be connected")
    presence.add_argument("--disconnected", action="store_true", help="only devices known not to be connected")
    for name in ("show", "delete"):
        actions.add_parser(name, help=f"{name} one device").add_argument("id")
    for parser in actions.choices.values():
        _common(parser)
        parser.add_argument("--json", action="store_true", help="print JSON")


def _device_parser(device: argparse.ArgumentParser) -> None:
    _common(device)
    device.add_argument("--app-version", required=True)
    device.add_argument("--token", required=True)
    device.add_argument(
        "--answer", action="append", required=True, metavar="TYPE=CODE[:DELAY_S]", help="e.g. reboot=200:1.5"
    )
    device.add_argument("--progress", action="store_true", help="send a 102 progress report first")
    device.add_argument("--format", choices=["json", "msgpack"], default="")
    device.add_argument("--exit-after", type=int, help="exit after this many confirmed results")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(
            args.config,
            db=args.db,
            mqtt_listen=args.mqtt_listen,
            broker_url=args.broker_url,
            http_listen=getattr(args, "http_listen", None),
            instance=getattr(args, "instance", None),
            log_format=args.log_format,
            log_level=args.log_level,
        )
        # One-shot commands print their result; their info logs would only be noise around it.
        quiet = args.command not in ("serve", "device") and args.log_level is None
        logs.configure(settings.log_format, "warning" if quiet else settings.log_level)
        return asyncio.run(COMMANDS[args.command](args, settings))
    except StartupError as exc:
        print(f"broker-bridge: {exc.reason}", file=sys.stderr)
        return EXIT_USAGE
    except BridgeError as exc:
        print(f"broker-bridge: error {exc.status_code}: {exc.reason}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


async def _serve(args: argparse.Namespace, settings: Settings) -> int:
    await runtime.serve_until_signalled(settings)
    return 0


# -- operator commands: the same service, on the same database, announcing through the broker -------
async def _with_service(settings: Settings, action: Callable[[CommandService], Awaitable[Any]]) -> Any:
    async with runtime.build_service(settings) as parts:
        result = await action(parts.service)
        if parts.outbox.pending:
            await _flush(settings, parts.outbox)
        return result


async def _flush(settings: Settings, outbox: Outbox) -> None:
    """Publish the events and pushes of this change, so a running service's devices get it now."""
    address = settings.broker_address()
    client_id = f"{settings.bridge_client_id}-cli-{uuid.uuid4().hex[:8]}"
    try:
        async with aiomqtt.Client(**client_options(address, client_id), timeout=5) as client:

            async def publish(p: Publication) -> None:
                await client.publish(p.topic, p.payload, qos=1, retain=p.retain)

            await outbox.flush(publish)
    except aiomqtt.MqttError as exc:
        print(
            f"broker-bridge: stored, but no broker at {address.host}:{address.port} ({exc}); "
            "the device gets it on its next poll or connection",
            file=sys.stderr,
        )


def _cli_user() -> str:
    """``cli:`` and the operating-system user running the CLI (its uid where it has no name)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no LOGNAME/USER and no passwd entry (some containers)
        return f"cli:uid-{os.getuid()}"


WATCH_S = 1.0  # rollout watch: how often the progress line is redrawn
BAR = 30


async def _rollout(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "create":
        text = sys.stdin.read() if str(args.spec) == "-" else _read_file(args.spec)
        body = decode(text.encode(), Codec.JSON)
        if args.dry_run and isinstance(body, dict):
            body = {**body, "dry_run": True}
        made = await _with_service(
            settings, lambda s: RolloutService(s).create(parse_spec(body), invoked_by=_cli_user())
        )
        _print_rollout(made.record() if isinstance(made, Preview) else rollout_record(made), args.json)
        return 0
    if args.action == "list":
        found, _ = await _with_service(settings, lambda s: RolloutService(s).page(args.limit, args.offset))
        records = [rollout_record(r) for r in found]
        if args.json:
            print(json.dumps(records, indent=2))
        for r in [] if args.json else records:
            print(f"{r['id']}  {r['state']}  {r['command']['name']}  {_progress(r)}")
        return 0
    if args.action == "devices":
        states = frozenset(DeviceState(s) for s in args.state or ())
        found, _ = await _with_service(
            settings, lambda s: RolloutService(s).members(args.id, states, args.limit, args.offset)
        )
        records = [member_record(m) for m in found]
        if args.json:
            print(json.dumps(records, indent=2))
        for m in [] if args.json else records:
            print(f"{m['device_id']}  {m['state']}  attempt {m['attempt']}  command {m['command_id']}")
        return 0
    if args.action == "watch":
        return await _watch(args.id, settings)
    steer = {"show": RolloutService.get, "pause": RolloutService.pause, "resume": RolloutService.resume}
    act = steer.get(args.action, RolloutService.cancel)
    found_one: Rollout = await _with_service(settings, lambda s: act(RolloutService(s), args.id))
    _print_rollout(rollout_record(found_one), args.json)
    return 0


def _read_file(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise StartupError(f"cannot read the rollout spec {path}: {exc.strerror}") from None


def _progress(r: dict[str, Any]) -> str:
    counts, total = r["counts"], max(1, r["total"])
    done = sum(counts[s] for s in ("succeeded", "failed", "timed_out", "cancelled", "skipped"))
    filled = round(BAR * done / total)
    rate = r["rate_per_minute_now"]
    shown = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    return f"[{'#' * filled}{'.' * (BAR - filled)}] {done}/{r['total']}  {shown}  rate {rate or 'unlimited'}/min"


def _print_rollout(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(record, indent=2))
        return
    if record.get("dry_run"):
        print(f"dry run: {record['count']} devices: {', '.join(record['device_ids'][:20])}")
        return
    print(f"rollout {record['id']}: {record['state']}  {_progress(record)}")
    if record["aborted_by"]:
        print(f"aborted by: {record['aborted_by']}")


async def _watch(rollout_id: int, settings: Settings) -> int:
    """Redraw the progress line until the rollout ends (a running ``serve`` drives it)."""
    async with runtime.build_service(settings) as parts:
        rollouts = RolloutService(parts.service)
        while True:
            record = rollout_record(await rollouts.get(rollout_id))
            end = "\n" if record["state"] in ("completed", "aborted", "cancelled") else ""
            print(f"\rrollout {rollout_id}: {record['state']:<11} {_progress(record)}", end=end, flush=True)
            if end:
                if record["aborted_by"]:
                    print(f"aborted by: {record['aborted_by']}")
                return 0 if record["state"] == "completed" else EXIT_ERROR
            await asyncio.sleep(WATCH_S)


async def _invoke(args: argparse.Namespace, settings: Settings) -> int:
    target = make_target(args.app_version, args.token, args.type)
    payload = decode(args.payload.encode(), Codec.JSON)
    key = args.idempotency_key
    if key is not None and not 1 <= len(key) <= 200:
        raise BadRequest(f"--idempotency-key must be 1 to 200 characters, got {len(key)}")
    command: Command = await _with_service(
        settings, lambda s: s.invoke(target, payload, args.ttl, idempotency_key=key, invoked_by=_cli_user())
    )
    _print_command(command, args.json)
    if not command.device_seen:
        print(
            f"broker-bridge: warning: endpoint {args.token!r} of {args.app_version!r} has never been heard from; "
            "check the token (the command waits for that endpoint until it expires)",
            file=sys.stderr,
        )
    return 0


async def _cancel(args: argparse.Namespace, settings: Settings) -> int:
    command: Command = await _with_service(settings, lambda s: s.cancel(args.id))
    _print_command(command, args.json)
    return 0


async def _rerun(args: argparse.Namespace, settings: Settings) -> int:
    command: Command = await _with_service(settings, lambda s: s.rerun(args.id, args.ttl, invoked_by=_cli_user()))
    _print_command(command, args.json)
    return 0


async def _show(args: argparse.Namespace, settings: Settings) -> int:
    command: Command = await _with_service(settings, lambda s: s.get(args.id))
    _print_command(command, args.json, with_log=True)
    return 0


async def _list(args: argparse.Namespace, settings: Settings) -> int:
    query = CommandQuery(
        app_version=args.app_version,
        endpoint_token=args.token,
        command_type=args.type,
        states=frozenset(CommandState(s) for s in args.state or []),
        limit=args.limit,
        offset=args.offset,
    )
    found: list[Command] = await _with_service(settings, lambda s: s.history(query))
    if args.json:
        print(json.dumps([to_record(c) for c in found], indent=2))
        return 0
    print(f"{'ID':>8}  {'STATE':<11} {'CODE':>4}  {'APP VERSION':<24} {'TOKEN':<16} {'TYPE':<16} CREATED")
    for c in found:
        code = "" if c.status_code is None else str(c.status_code)
        t = c.target
        print(
            f"{c.id:>8}  {c.state.value:<11} {code:>4}  {t.app_version:<24} {t.endpoint_token:<16} "
            f"{t.command_type:<16} {rfc3339(c.created_at)}"
        )
    return 0


def _print_command(command: Command, as_json: bool, *, with_log: bool = False) -> None:
    record = to_record(command)
    if as_json:
        print(json.dumps(record, indent=2))
        return
    skip = set() if with_log else {"log"}
    for key, value in record.items():
        if key not in skip and key != "log":
            print(f"{key:>14}: {json.dumps(value) if not isinstance(value, str) else value}")
    if with_log:
        for entry in record["log"]:
            print(f"{'log':>14}: {entry['receivedAt']} {entry['statusCode']} {entry['reasonPhrase'] or ''}")


async def _device(args: argparse.Namespace, settings: Settings) -> int:
    try:
        answers = dict(parse_answer(spec) for spec in args.answer)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    simulator = DeviceSimulator(
        address=settings.broker_address(),
        app_version=args.app_version,
        token=args.token,
        answers=answers,
        scheme=settings.topics.scheme(),
        fmt=Format(args.format),
        progress=args.progress,
        exit_after=args.exit_after,
    )
    with suppress(asyncio.CancelledError):
        await simulator.run()
    return 0


# -- the device registry ----------------------------------------------------------------------------
def _labels(specs: list[str] | None) -> dict[str, str] | None:
    if specs is None:
        return None
    pairs = [spec.partition("=") for spec in specs]
    if any(not key or not sep for key, sep, _ in pairs):
        raise StartupError("labels are KEY=VALUE")
    return {key: value for key, _, value in pairs}


def _manifest_file(path: Path | None) -> Any:
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot read manifest {path}: {exc}") from None


async def _devices(args: argparse.Namespace, settings: Settings) -> int:
    async def act(service: CommandService) -> Any:
        registry = service.registry
        if args.action == "add":
            return await registry.add(
                app_version=args.app_version,
                endpoint_token=args.token,
                device_id=args.id,
                labels=_labels(args.label),
                manifest=_manifest_file(args.manifest),
            )
        if args.action == "update":
            return await registry.update(args.id, **_device_changes(args))
        if args.action == "list":
            connected = True if args.connected else False if args.disconnected else None
            return (await registry.page(args.limit, args.offset, _labels(args.label), connected))[0]
        if args.action == "delete":
            await registry.delete(args.id)
            return None
        return await registry.get(args.id)

    result = await _with_service(settings, act)
    _print_devices(result, args.json)
    return 0


def _device_changes(args: argparse.Namespace) -> dict[str, Any]:
    changes: dict[str, Any] = {
        "app_version": args.app_version,
        "endpoint_token": args.token,
        "labels": _labels(args.label),
        "manifest": _manifest_file(args.manifest),
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.no_manifest:
        changes["manifest"] = None
    return changes


def _print_devices(result: Any, as_json: bool) -> None:
    if result is None:
        return
    found = result if isinstance(result, list) else [result]
    records = [views.device(d) for d in found]
    if as_json:
        print(json.dumps(records if isinstance(result, list) else records[0], indent=2))
        return
    for r in records:
        commands = ", ".join(sorted((r["manifest"] or {}).get("commands", {}))) or "(any command)"
        labels = ",".join(f"{k}={v}" for k, v in r["labels"].items())
        seen = r["last_seen_at"] or "not yet"
        presence = {True: "connected", False: "disconnected", None: "presence unknown"}[r["connected"]]
        print(
            f"{r['id']}  {r['app_version']}/{r['endpoint_token']}  {labels}  commands: {commands}  "
            f"last seen: {seen}  {presence}"
        )


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]] = {
    "serve": _serve,
    "invoke": _invoke,
    "list": _list,
    "show": _show,
    "cancel": _cancel,
    "rerun": _rerun,
    "device": _device,
    "devices": _devices,
    "rollout": _rollout,
}

if __name__ == "__main__":
    sys.exit(main())
