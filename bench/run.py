"""``python -m bench.run [--quick | --tiny] [--scenarios echo,e2e,storage,fanout,profile] [--out DIR]``.

Runs each scenario in its own temporary directory with its own processes (stopped when it ends, also
on failure or Ctrl-C), then writes ``bench-<mode>.json``, ``bench-<mode>.md`` and ``bench-<mode>.png``
into ``--out`` (default bench/results/). A failing scenario is recorded under ``errors`` and the run
goes on; the exit status is 1 if any scenario failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench import common, e2e, echo, echo_gmqtt, profiling, report, rollouts, scaleout, storage
from bench.common import BROKERS, ROOT, Broker, Children, mosquitto_binary
from bench.progress import Tracker

SCENARIOS = ("echo", "e2e", "storage", "fanout", "profile", "scaleout", "rollout")


@dataclass(frozen=True)
class Scale:
    echo_w64: int
    echo_w1: int
    e2e_count: int
    e2e_endpoints: int
    light_s: float
    storage_rows: int
    storage_endpoints: int
    storage_samples: int
    fanout_devices: int
    fanout_procs: int
    profile_count: int
    profile_brokers: tuple[Broker, ...]
    timeout_s: float
    scaleout_count: int = 3_000
    scaleout_repeats: int = 3
    scaleout_rows: int = 1_000_000
    rollout_devices: int = 100_000  # targeted, most offline: the queueing figure
    rollout_window_s: float = 60.0  # how long the rate is watched
    window: int = 64
    fanout_window: int = 1000
    rss_settle_s: float = 2.0
    profile_rate_hz: int = 100
    scenarios: tuple[str, ...] = field(default=SCENARIOS)


SCALES = {
    "full": Scale(
        echo_w64=20_000,
        echo_w1=2_000,
        e2e_count=5_000,
        e2e_endpoints=100,
        light_s=10.0,
        storage_rows=1_000_000,
        storage_endpoints=10_000,
        storage_samples=2_000,
        fanout_devices=10_000,
        fanout_procs=4,
        profile_count=2_500,
        profile_brokers=BROKERS,
        timeout_s=240.0,
    ),
    "quick": Scale(
        echo_w64=2_000,
        echo_w1=200,
        e2e_count=400,
        e2e_endpoints=50,
        light_s=2.0,
        storage_rows=50_000,
        storage_endpoints=1_000,
        storage_samples=200,
        fanout_devices=500,
        fanout_procs=2,
        profile_count=400,
        profile_brokers=("mosquitto",),
        timeout_s=60.0,
        rss_settle_s=1.0,
        scaleout_count=400,
        scaleout_repeats=1,
        scaleout_rows=50_000,
        rollout_devices=10_000,
        rollout_window_s=10.0,
    ),
    "tiny": Scale(
        echo_w64=150,
        echo_w1=30,
        e2e_count=100,
        e2e_endpoints=10,
        light_s=0.6,
        storage_rows=3_000,
        storage_endpoints=100,
        storage_samples=20,
        fanout_devices=20,
        fanout_procs=1,
        profile_count=100,
        profile_brokers=("mosquitto",),
        timeout_s=30.0,
        rss_settle_s=0.3,
        profile_rate_hz=200,
        scaleout_count=100,
        scaleout_repeats=1,
        scaleout_rows=3_000,
        rollout_devices=200,
        rollout_window_s=2.0,
        scenarios=("echo", "e2e", "storage", "fanout"),
    ),
}


def _steps(scenarios: list[str], brokers: list[Broker], scale: Scale) -> int:
    """How many progress steps the plan has (the overall bar's total)."""
    count = 0
    for name in scenarios:
        count += {
            "echo": 2 * len(brokers) + (2 if "mosquitto" in brokers and echo_gmqtt.available() else 0),
            "e2e": 2 * len(brokers),
            "storage": 6,
            "fanout": 3 if "mosquitto" in brokers else 0,
            "rollout": 3,
            "profile": len([b for b in scale.profile_brokers if b in brokers]),
            "scaleout": 2 * len(scaleout.CONFIGS) * scale.scaleout_repeats + 3 if "mosquitto" in brokers else 0,
        }[name]
    return count


def _git(*argv: str) -> str:
    try:
        return subprocess.run(["git", *argv], capture_output=True, text=True, cwd=ROOT, check=False).stdout
    except OSError:
        return ""


def _meta(args: argparse.Namespace, mode: str, scale: Scale) -> dict[str, Any]:
    binary = mosquitto_binary()
    mosquitto = None
    if binary:
        probe = subprocess.run([binary, "-h"], capture_output=True, text=True, check=False)
        mosquitto = (probe.stdout or probe.stderr).splitlines()[0] if (probe.stdout or probe.stderr) else binary
    rev, dirty = _git("rev-parse", "--short", "HEAD").strip(), []
    for line in _git("status", "--porcelain", "--", "broker_bridge").splitlines():
        dirty.append(line[3:])
    return {
        "mode": mode,
        "started_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench.run " + " ".join(sys.argv[1:]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)),
        "git": rev,
        "broker_bridge_uncommitted": dirty,  # the code measured is HEAD plus these working-tree changes
        "mosquitto_max_inflight_messages": common.MOSQUITTO_INFLIGHT or "default (20)",
        "versions": {
            "aiomqtt": version("aiomqtt"),
            "amqtt": version("amqtt"),
            "paho-mqtt": version("paho-mqtt"),
            "gmqtt (candidate, echo only)": version("gmqtt") if echo_gmqtt.available() else None,
            "sqlite": sqlite3.sqlite_version,
            "mosquitto": mosquitto,
        },
        "scale": asdict(scale),
        "serve_log_level": args.serve_log_level,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


Action = Callable[[Children], Awaitable[Any]]


def _plan(
    scenarios: list[str], brokers: list[Broker], scale: Scale, tracker: Tracker, log_level: str, out: Path
) -> list[tuple[tuple[str, ...], Action]]:
    """Every measurement of the run, in order: (where its result goes, what to run)."""
    steps: list[tuple[tuple[str, ...], Action]] = []
    shared: dict[str, Any] = {"tracker": tracker, "timeout_s": scale.timeout_s}
    paired = [n for n in ("echo", "e2e") if n in scenarios]
    for broker in brokers:  # echo then e2e per broker: each ratio's two figures are measured close in time
        for kind in paired:
            if kind == "echo":
                windows = {scale.window: scale.echo_w64, 1: scale.echo_w1}
                steps.append((("echo", broker), partial(echo.measure, broker=broker, windows=windows, **shared)))
                if broker == "mosquitto" and echo_gmqtt.available():  # the candidate library, same baseline
                    steps.append((("echo", "mosquitto-gmqtt"), partial(echo_gmqtt.measure, windows=windows, **shared)))
            else:
                e2e_args = {
                    "endpoints": scale.e2e_endpoints,
                    "count": scale.e2e_count,
                    "window": scale.window,
                    "light_s": scale.light_s,
                    "log_level": log_level,
                    **shared,
                }
                steps.append((("e2e", broker), partial(e2e.measure_e2e, broker=broker, **e2e_args)))
    for name in scenarios:
        if name in paired:
            continue
        if name == "storage":
            steps.append(
                (
                    ("storage",),
                    partial(
                        storage.measure,
                        rows=scale.storage_rows,
                        endpoints=scale.storage_endpoints,
                        samples=scale.storage_samples,
                        tracker=tracker,
                        settle_s=scale.rss_settle_s,
                    ),
                )
            )
        elif name == "fanout" and "mosquitto" in brokers:
            steps.append(
                (
                    ("fanout",),
                    partial(
                        e2e.measure_fanout,
                        devices=scale.fanout_devices,
                        device_procs=scale.fanout_procs,
                        window=scale.fanout_window,
                        log_level=log_level,
                        **shared,
                    ),
                )
            )
        elif name == "scaleout" and "mosquitto" in brokers:
            steps.append(
                (
                    ("scaleout",),
                    partial(
                        scaleout.measure,
                        endpoints=scale.e2e_endpoints,
                        count=scale.scaleout_count,
                        window=scale.window,
                        rows=scale.scaleout_rows,
                        repeats=scale.scaleout_repeats,
                        storage_endpoints=scale.storage_endpoints,
                        samples=scale.storage_samples,
                        log_level=log_level,
                        **shared,
                    ),
                )
            )
        elif name == "rollout":
            rollout_args = {
                "devices": scale.rollout_devices,
                "per_minute": 1000.0,
                "rate_window_s": scale.rollout_window_s,
            }
            steps.append((("rollout",), partial(rollouts.measure, log_level=log_level, **rollout_args, **shared)))
        elif name == "profile":
            profile_args = {
                "endpoints": scale.e2e_endpoints,
                "count": scale.profile_count,
                "window": scale.window,
                "rate": scale.profile_rate_hz,
                "log_level": log_level,
                "out_dir": out,
                **shared,
            }
            steps += [
                (("profile", b), partial(profiling.profile, broker=b, **profile_args))
                for b in scale.profile_brokers
                if b in brokers
            ]
    return steps


async def _scenario(
    results: dict[str, Any],
    tmp: Path,
    tracker: Tracker,
    action: Callable[[Children], Awaitable[Any]],
    path: tuple[str, ...],
) -> None:
    """Run one measurement with its own processes; record its result or its error."""
    workdir = tmp / "-".join(path)
    workdir.mkdir(parents=True, exist_ok=True)
    children = Children(workdir)
    key = ".".join(path)
    try:
        value = await action(children)
    except Exception as exc:  # one scenario failing must not cost the others
        results["errors"][key] = f"{type(exc).__name__}: {exc}"
        tracker.log(f"[red]FAILED[/red] {key}: {exc}" if tracker.enabled else f"FAILED {key}: {exc}")
        return
    finally:
        await children.stop_all()
    node = results["scenarios"]
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


async def run(args: argparse.Namespace) -> int:
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    scale = SCALES[mode]
    scenarios = [s for s in (args.scenarios.split(",") if args.scenarios else scale.scenarios) if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")
    brokers: list[Broker] = [b for b in BROKERS if b in args.brokers.split(",")]
    out: Path = args.out
    # SIGTERM (a timeout, a CI runner) stops the run like Ctrl-C: processes stopped, partial results written.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    results: dict[str, Any] = {"meta": _meta(args, mode, scale), "scenarios": {}, "errors": {}}
    if "mosquitto" in brokers and mosquitto_binary() is None:
        results["errors"]["mosquitto"] = (
            "mosquitto is not installed (Debian package 'mosquitto'): its scenarios skipped"
        )
        brokers.remove("mosquitto")
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="broker-bridge-bench-"))
    log_level = args.serve_log_level
    try:
        with Tracker(_steps(scenarios, brokers, scale), enabled=not args.no_progress) as tracker:
            tracker.log(f"{mode} run: {', '.join(scenarios)} on {', '.join(brokers)}; work dir {tmp}")
            for path, action in _plan(scenarios, brokers, scale, tracker, log_level, out):
                await _scenario(results, tmp, tracker, action, path)
    finally:
        results["meta"]["duration_s"] = round(time.monotonic() - started, 1)
        results["meta"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        results["targets"] = report.targets(results)
        stem = out / f"bench-{mode}"
        report.write_json(results, stem.with_suffix(".json"))
        summary = report.markdown(results)
        stem.with_suffix(".md").write_text(summary)
        report.chart(results, stem.with_suffix(".png"))
        if args.keep_tmp:
            print(f"work dir kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(summary)
    print(f"wrote {stem}.json, .md and .png", file=sys.stderr)
    return 1 if results["errors"] else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description="broker-bridge benchmark harness")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke run: fewer messages, a 50k-row DB (< 60 s)")
    size.add_argument("--tiny", action="store_true", help="the smallest run, for tests (a few seconds per scenario)")
    parser.add_argument("--scenarios", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--brokers", default=",".join(BROKERS), help="comma-separated subset of mosquitto,amqtt")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the result files go")
    parser.add_argument(
        "--serve-log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level of the serve processes (default info, as `make run`)",
    )
    parser.add_argument(
        "--mosquitto-inflight",
        type=int,
        default=common.MOSQUITTO_INFLIGHT,
        help="Mosquitto max_inflight_messages (default 1000 as config/mosquitto/mosquitto.conf; 0: its default 20)",
    )
    parser.add_argument("--no-progress", action="store_true", help="plain log lines instead of progress bars")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the work directory (logs, databases)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    common.MOSQUITTO_INFLIGHT = args.mosquitto_inflight
    try:
        return asyncio.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: child processes stopped; partial results written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
