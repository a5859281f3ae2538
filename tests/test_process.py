"""`broker-bridge` as a user runs it: real processes, signals, kill -9, the CLI against a live service."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from broker_bridge.commands import CommandState
from broker_bridge.store import CommandQuery
from broker_bridge.store.sqlite import SqliteStore
from tests.conftest import free_port, wait_for_port
from tests.harness import probe

CLI = [sys.executable, "-m", "broker_bridge.cli"]
STOP_WITHIN_S = 15.0  # a bound on a hang, not a speed target


class ServeProcess:
    """`broker-bridge serve` on a free port with its own database and log file."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.http_port = free_port()
        self.db = workdir / "bridge.db"
        self.log = workdir / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def args(self, *extra: str) -> list[str]:
        return [*extra, "--db", str(self.db), "--mqtt-listen", f"127.0.0.1:{self.port}"]

    def start(self) -> None:
        http = ["--http-listen", f"127.0.0.1:{self.http_port}"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([*CLI, "serve", *self.args(*http)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while "service_ready" not in self.log.read_text() and time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.05)
        assert "service_ready" in self.log.read_text(), self.log.read_text()
        wait_for_port(self.port)

    def signal(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=STOP_WITHIN_S)
        self.proc = None
        return code

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *self.args(*args)], capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeProcess]:
    """A serve process, killed at the end if the test left it running."""
    process = ServeProcess(tmp_path, free_port())
    yield process
    if process.proc is not None:
        process.proc.kill()
        process.proc.wait()


async def test_sigterm_stops_promptly_with_clients_connected(serve: ServeProcess, app_version: str) -> None:
    """SIGTERM (and SIGINT) end serve within seconds, every time, even with busy clients connected."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM, signal.SIGTERM):
        serve.start()
        async with probe(serve.port, "kp1/#", "cex/#") as client:
            for rid in range(1, 21):
                await client.publish(f"cex/admin/{app_version}/dev/invoke/reboot/{rid}", {"payload": rid})
            await client.wait_topic(f"cex/admin/{app_version}/dev/invoke/reboot/20/status")
            code = await asyncio.to_thread(serve.signal, sig)
        assert code == 0, serve.log.read_text()[-2000:]
    assert "shutdown_complete" in serve.log.read_text()


def test_port_taken_names_both_options(serve: ServeProcess, tmp_path: Path) -> None:
    """If the embedded listener's port is taken, serve exits with a message naming the fix."""
    serve.start()
    other = ["--http-listen", f"127.0.0.1:{free_port()}", "--db", str(tmp_path / "other.db")]
    command = [*CLI, "serve", *other, "--mqtt-listen", f"127.0.0.1:{serve.port}"]
    second = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert second.returncode == 2
    assert "--mqtt-listen" in second.stderr
    assert "--broker-url" in second.stderr


def test_second_serve_on_one_sqlite_file_is_refused(serve: ServeProcess) -> None:
    """Two instances on one SQLite file would double commands: the second refuses and points to
    PostgreSQL; the first goes on serving."""
    serve.start()
    other = ["--http-listen", f"127.0.0.1:{free_port()}", "--mqtt-listen", f"127.0.0.1:{free_port()}"]
    second = subprocess.run(
        [*CLI, "serve", *other, "--db", str(serve.db)], capture_output=True, text=True, timeout=30, check=False
    )
    assert second.returncode == 2
    assert f"already serving {serve.db}" in second.stderr
    assert "postgresql://" in second.stderr
    assert serve.proc is not None
    assert serve.proc.poll() is None
    assert serve.cli("list").returncode == 0  # one-shot CLI runs still share the file


async def test_cli_invoke_list_show_cancel_against_running_service(serve: ServeProcess, app_version: str) -> None:
    """The CLI shares the database; its invoke is pushed to the device at once."""
    serve.start()
    push_topic = f"kp1/{app_version}/cex/dev/command/reboot/status"
    async with probe(serve.port, push_topic) as device:
        args = ("invoke", app_version, "dev", "reboot", "--payload", '{"a": 1}', "--json")
        done = await asyncio.to_thread(serve.cli, *args)
        assert done.returncode == 0, done.stderr
        record = json.loads(done.stdout)
        pushed = await device.wait_topic(push_topic)
    assert pushed.json() == [{"id": record["id"], "payload": {"a": 1}}]
    listed = json.loads(serve.cli("list", "--token", "dev", "--json").stdout)
    assert [r["id"] for r in listed] == [record["id"]]
    assert json.loads(serve.cli("show", str(record["id"]), "--json").stdout)["state"] == "pending"
    assert json.loads(serve.cli("cancel", str(record["id"]), "--json").stdout)["state"] == "cancelled"
    again = serve.cli("cancel", str(record["id"]))
    assert again.returncode == 1
    assert "already cancelled" in again.stderr
    bad = serve.cli("invoke", app_version, "dev", "re.boot")
    assert (bad.returncode, "invalid command type" in bad.stderr) == (1, True)


async def _settled(db: Path, acknowledged: int) -> bool:
    """Every acknowledged command is stored and nothing stored is still open."""
    async with SqliteStore(db) as store:
        open_states = frozenset({CommandState.PENDING, CommandState.IN_PROGRESS})
        still_open = await store.count(CommandQuery(states=open_states))
        return still_open == 0 and await store.count(CommandQuery()) >= acknowledged


@pytest.mark.slow
async def test_kill_9_mid_stream_loses_and_duplicates_nothing(serve: ServeProcess, app_version: str) -> None:
    """kill -9 of serve during a stream of commands, then restart: every acknowledged command executes once."""
    total = 300
    serve.start()
    device = subprocess.Popen(  # noqa: ASYNC220 - a child process we kill at the end
        [*CLI, "device", *serve.args("--app-version", app_version, "--token", "dev", "--answer", "reboot=200")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    acknowledged: dict[int, int] = {}  # seq -> command id
    try:
        for seq in range(total):
            if seq == total // 2:
                serve.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
                serve.proc.wait()  # type: ignore[union-attr]
                serve.proc = None
                serve.start()
            acknowledged.update(await _invoke_acknowledged(serve.port, app_version, seq))
        deadline = time.monotonic() + 60
        while not await _settled(serve.db, len(acknowledged)) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
    finally:
        device.kill()
        device.wait()
    async with SqliteStore(serve.db) as store:
        stored = await store.history(CommandQuery(limit=10 * total))
    seqs = [c.payload["seq"] for c in stored]
    assert len(seqs) == len(set(seqs)), "an invoke was stored twice"
    assert set(acknowledged.values()) <= {c.id for c in stored}
    for command in stored:
        assert command.state is CommandState.EXECUTED, command
        assert [r.status_code for r in command.log] == [200], command
    assert len(acknowledged) >= total - 5  # only invokes in flight at the kill may go unanswered


async def _invoke_acknowledged(port: int, app_version: str, seq: int) -> dict[int, int]:
    """Invoke once, never twice (a resend could duplicate); the command id if the reply came back."""
    topic = f"cex/admin/{app_version}/dev/invoke/reboot/{seq + 1}"
    for _ in range(200):  # the service may still be restarting
        published = False
        try:
            async with probe(port, f"{topic}/+") as admin:
                await admin.publish(topic, {"payload": {"seq": seq}})
                published = True
                reply = await admin.wait_for(lambda s: s.topic.startswith(f"{topic}/"), within_s=5)
                return {seq: reply.json()["id"]}
        except (aiomqtt.MqttError, TimeoutError):
            if published:
                return {}  # in flight when the service died: maybe stored, not acknowledged
            await asyncio.sleep(0.1)
    return {}
