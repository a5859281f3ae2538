"""Shared plumbing: free ports, child processes that never outlive the harness, Mosquitto, serve, stats."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiomqtt
import psutil  # type: ignore[import-untyped]

from bench.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
Broker = Literal["mosquitto", "amqtt"]
BROKERS: tuple[Broker, ...] = ("mosquitto", "amqtt")

# The configuration the issue asks for, plus max_inflight_messages as config/mosquitto/mosquitto.conf
# ships it: the bridge acknowledges a QoS 1 message only once it is handled, so with Mosquitto's
# default of 20 no more than 20 requests could be in the bridge at once. Every Mosquitto scenario
# (echo included) uses the same file; ``--mosquitto-inflight 0`` leaves the line out (default 20).
MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
max_queued_messages 100000
set_tcp_nodelay true
persistence false
"""
MOSQUITTO_INFLIGHT = 1000


class BenchError(Exception):
    """A scenario could not be measured; the message says why."""


def now() -> float:
    """The clock of every timestamp: CLOCK_MONOTONIC on Linux, the same in every process of the machine."""
    return time.monotonic()


async def wait_for_port(port: int, timeout_s: float = 15.0, alive: Callable[[], bool] | None = None) -> None:
    deadline = now() + timeout_s
    while now() < deadline:
        if alive is not None and not alive():
            raise BenchError(f"process meant to listen on port {port} exited")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        await asyncio.sleep(0.05)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:g}s")


def mqtt_client(port: int, identifier: str | None = None, *, keepalive: int = 60) -> aiomqtt.Client:
    """An aiomqtt client as the bridge builds its own: TCP_NODELAY and a wide in-flight window.

    aiomqtt logs a warning for every publish while more than 10 are unacknowledged; a load generator
    has many by design, so that threshold is lifted (the bridge keeps it: see bench/README.md).
    """
    client = aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=identifier,
        socket_options=[NODELAY],
        max_inflight_messages=1000,
        keepalive=keepalive,
        timeout=30,
    )
    client.pending_calls_threshold = 1_000_000_000
    return client


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


def tool(name: str) -> str | None:
    """A console script of this virtualenv (py-spy), else one on PATH."""
    beside = Path(PYTHON).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


# -- child processes --------------------------------------------------------------------------------
_LIVE_PIDS: set[int] = set()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the harness dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _kill_leftovers() -> None:
    for pid in list(_LIVE_PIDS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


atexit.register(_kill_leftovers)


@dataclass
class Child:
    """A process the harness started, in its own session, with its output in a log file."""

    name: str
    proc: asyncio.subprocess.Process
    log: Path
    ps: psutil.Process

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def read_line(self, prefix: str, timeout_s: float) -> str:
        """The next stdout line starting with ``prefix`` (skipping others)."""
        assert self.proc.stdout is not None
        deadline = now() + timeout_s
        while True:
            left = deadline - now()
            if left <= 0:
                raise BenchError(f"{self.name}: no {prefix!r} line within {timeout_s:g}s; log: {self.tail()}")
            try:
                raw = await asyncio.wait_for(self.proc.stdout.readline(), left)
            except TimeoutError:
                continue
            if not raw:
                raise BenchError(f"{self.name} exited ({self.proc.returncode}) before {prefix!r}: {self.tail()}")
            line = raw.decode(errors="replace").strip()
            if line.startswith(prefix):
                return line

    async def wait_log(self, needle: str, timeout_s: float) -> None:
        deadline = now() + timeout_s
        while now() < deadline:
            if needle in self.log.read_text(errors="replace"):
                return
            if not self.alive:
                raise BenchError(f"{self.name} exited ({self.proc.returncode}): {self.tail()}")
            await asyncio.sleep(0.05)
        raise BenchError(f"{self.name}: no {needle!r} within {timeout_s:g}s: {self.tail()}")

    def tail(self, lines: int = 12) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"


def _clean_environment() -> dict[str, str]:
    """The harness's environment without broker-bridge settings: every child is configured by flags."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BROKER_BRIDGE_")}


@dataclass
class Children:
    """Every process of one scenario; ``stop_all`` ends them, also on failure and Ctrl-C."""

    workdir: Path
    children: list[Child] = field(default_factory=list)

    async def start(
        self, name: str, argv: Sequence[str], *, pipe_stdout: bool = True, env: dict[str, str] | None = None
    ) -> Child:
        log = self.workdir / f"{name}.log"
        serial = 1
        while log.exists():  # a fresh log for every process: readiness is read from it
            serial += 1
            log = self.workdir / f"{name}-{serial}.log"
        with log.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if pipe_stdout else out,
                stderr=out,
                cwd=self.workdir,
                start_new_session=True,  # Ctrl-C reaches the harness only; it stops these in order
                preexec_fn=_die_with_parent,
                env={**_clean_environment(), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        _LIVE_PIDS.add(proc.pid)
        child = Child(name=name, proc=proc, log=log, ps=psutil.Process(proc.pid))
        self.children.append(child)
        return child

    async def stop(self, child: Child, grace_s: float = 5.0) -> None:
        if child.alive:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.proc.wait(), grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGKILL)
                await child.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, signal.SIGKILL)  # anything it left behind in its session
        _LIVE_PIDS.discard(child.proc.pid)

    async def stop_all(self) -> None:
        for child in reversed(self.children):
            await asyncio.shield(self.stop(child))
        self.children.clear()


async def start_mosquitto(children: Children) -> tuple[Child, int]:
    binary = mosquitto_binary()
    if binary is None:
        raise BenchError("mosquitto is not installed (Debian package 'mosquitto')")
    port = free_port()
    conf = children.workdir / f"mosquitto-{port}.conf"
    text = MOSQUITTO_CONF.format(port=port)
    if MOSQUITTO_INFLIGHT:
        text += f"max_inflight_messages {MOSQUITTO_INFLIGHT}\n"
    conf.write_text(text)
    child = await children.start("mosquitto", [binary, "-c", str(conf)], pipe_stdout=False)
    await wait_for_port(port, alive=lambda: child.alive)
    return child, port


async def wait_serving(child: Child, port: int, timeout_s: float) -> None:
    """Until the bridge answers a KP1 poll (so it is subscribed), whatever its log level says."""
    deadline = now() + timeout_s
    topic = "kp1/bench-ready-v1/cex/probe/command/ready/1"
    while now() < deadline:
        if not child.alive:
            raise BenchError(f"{child.name} exited ({child.proc.returncode}): {child.tail()}")
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError, OSError):
            async with mqtt_client(port, f"bench-ready-{port}", keepalive=10) as client:
                await client.subscribe(f"{topic}/+", qos=1)
                await client.publish(topic, b"{}", qos=1)
                async with asyncio.timeout(1.0):
                    async for _ in client.messages:
                        return
        await asyncio.sleep(0.1)
    raise BenchError(f"{child.name}: no answer to a KP1 poll within {timeout_s:g}s: {child.tail()}")


@dataclass
class Serve:
    """A ``broker-bridge serve`` process; ``ps`` is the serve process itself (also under py-spy)."""

    child: Child
    ps: psutil.Process
    port: int
    db: Path
    http: str = ""  # its HTTP API's base URL

    @property
    def api_key(self) -> str:
        """The key serve generated next to its database (none is configured here)."""
        return self.db.with_name(self.db.name + ".api-key").read_text().strip()


async def start_serve(
    children: Children,
    broker: Broker,
    *,
    db: Path,
    port: int | None = None,
    log_level: str = "info",
    profile: tuple[str, Path, int] | None = None,
    name: str = "serve",
) -> Serve:
    """``serve --broker-url`` for Mosquitto (on ``port``), ``serve --mqtt-listen`` for the embedded broker.

    ``profile`` = (py-spy binary, output file, rate): run serve under ``py-spy record``.
    """
    if broker == "mosquitto":
        assert port is not None, "the Mosquitto port"
        where = ["--broker-url", f"mqtt://127.0.0.1:{port}"]
    else:
        port = port or free_port()
        where = ["--mqtt-listen", f"127.0.0.1:{port}"]
    argv = [PYTHON, "-m", "broker_bridge.cli", "serve", "--db", str(db), *where, "--log-level", log_level]
    if profile is not None:
        spy, out, rate = profile
        argv = [spy, "record", "--format", "raw", "--threads", "--rate", str(rate), "--output", str(out), "--", *argv]
    # Its HTTP API (where this version has one) on a free port too: the default 8080 may be taken.
    http = f"127.0.0.1:{free_port()}"
    env = {"BROKER_BRIDGE_HTTP_LISTEN": http}
    child = await children.start(name, argv, pipe_stdout=False, env=env)
    await wait_serving(child, port, 30.0)
    ps = child.ps
    if profile is not None:
        found = [p for p in child.ps.children(recursive=True) if "serve" in " ".join(p.cmdline())]
        if not found:
            raise BenchError(f"py-spy started no serve process: {child.tail()}")
        ps = found[0]
    return Serve(child=child, ps=ps, port=port, db=db, http=f"http://{http}")


# -- statistics -------------------------------------------------------------------------------------
def percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks; ``ordered`` is sorted and not empty."""
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def latency_ms(values_s: Iterable[float]) -> dict[str, float]:
    """count, mean, p50, p90, p99 and max of durations given in seconds, in milliseconds."""
    ordered = sorted(v * 1000.0 for v in values_s)
    if not ordered:
        return {"count": 0}
    return {
        "count": len(ordered),
        "mean_ms": round(sum(ordered) / len(ordered), 3),
        "p50_ms": round(percentile(ordered, 0.50), 3),
        "p90_ms": round(percentile(ordered, 0.90), 3),
        "p99_ms": round(percentile(ordered, 0.99), 3),
        "max_ms": round(ordered[-1], 3),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 4)


# -- CPU and memory of the processes of a scenario ---------------------------------------------------
CpuSnapshot = dict[str, float]


SYSTEM = "rest of machine"


def cpu_snapshot(procs: dict[str, psutil.Process]) -> CpuSnapshot:
    """CPU seconds of each role, and of the whole machine (busy time of every core)."""
    seconds: CpuSnapshot = {}
    for role, ps in procs.items():
        with contextlib.suppress(psutil.Error):
            times = ps.cpu_times()
            seconds[role] = times.user + times.system
    machine = psutil.cpu_times()
    seconds[SYSTEM] = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
    return seconds


def cpu_share(before: CpuSnapshot, after: CpuSnapshot, wall_s: float) -> dict[str, float]:
    """CPU time of each role over a phase, in cores (1.0 = one core busy the whole phase).

    ``rest of machine`` is what the machine's cores were busy with besides these processes: the kernel's
    loopback networking, and other people's processes (this machine is shared: a high figure there
    means the phase ran with less than 2 free cores).
    """
    if wall_s <= 0:
        return {}
    shares = {role: (after[role] - before[role]) / wall_s for role in after if role in before}
    if SYSTEM in shares:
        shares[SYSTEM] = max(0.0, shares[SYSTEM] - sum(v for k, v in shares.items() if k != SYSTEM))
    return {role: round(value, 3) for role, value in shares.items()}


def rss_mb(ps: psutil.Process) -> float:
    return round(float(ps.memory_info().rss) / 2**20, 1)


def exit_on_sigterm(last_words: Callable[[], None] | None = None) -> None:
    """For the harness's own child processes: on SIGTERM say ``last_words`` and leave at once."""

    def handler(signum: int, frame: object) -> None:
        if last_words is not None:
            with contextlib.suppress(Exception):
                last_words()
        sys.stdout.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
