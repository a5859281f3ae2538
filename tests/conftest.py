"""Shared fixtures: free ports, a per-test topic space, a real Mosquitto process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.ports import free_port

# CI sets this so that a missing service fails the run instead of skipping tests.
REQUIRE_ENV = "BROKER_BRIDGE_REQUIRE_SERVICES"


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


def skip_or_fail(reason: str) -> None:
    """Skip on a developer machine; fail when CI demands every service."""
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{reason} ({REQUIRE_ENV} is set, so this is a failure)")
    pytest.skip(reason)


@pytest.fixture
def port() -> int:
    """A free TCP port for this test."""
    return free_port()


@pytest.fixture
def app_version() -> str:
    """An app version name unique to this test: its own KP1 topic space."""
    return f"app{uuid.uuid4().hex[:10]}-v1"


MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence {persistence}
persistence_location {workdir}/
# The default (1000) silently dropped thousands of QoS 1 messages in a burst.
max_queued_messages 100000
max_inflight_messages 0
set_tcp_nodelay true
"""


class MosquittoProcess:
    """A mosquitto broker started for one test on a free port."""

    def __init__(self, workdir: Path, *, persistence: bool = False) -> None:
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        flag = "true" if persistence else "false"
        conf = MOSQUITTO_CONF.format(port=self.port, persistence=flag, workdir=workdir)
        if os.geteuid() == 0:
            # Started as root, Mosquitto switches to the "mosquitto" user, which cannot write its
            # persistence file into pytest's private temporary directory.
            conf += "user root\n"
        self.conf.write_text(conf)
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


def mosquitto_available() -> bool:
    return shutil.which("mosquitto") is not None or Path("/usr/sbin/mosquitto").exists()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A real Mosquitto on a free port, stopped after the test."""
    if not mosquitto_available():
        skip_or_fail("mosquitto is not installed (Debian package 'mosquitto')")
    broker = MosquittoProcess(tmp_path)
    broker.start()
    yield broker
    broker.stop()


# -- PostgreSQL ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[str]:
    """An admin URL of a PostgreSQL server: $BROKER_BRIDGE_TEST_POSTGRES, the machine's on
    127.0.0.1:5432, or one started for this test run with initdb + pg_ctl on a free port."""
    from tests import pg

    configured = os.environ.get(pg.ADMIN_ENV)
    if configured:
        if not pg.reachable(configured):
            skip_or_fail(f"no PostgreSQL at {pg.ADMIN_ENV}={configured}")
        yield configured
        return
    if pg.reachable(pg.MACHINE_ADMIN):
        yield pg.MACHINE_ADMIN
        return
    if pg.binaries() is None or shutil.which("psql") is None:
        skip_or_fail("no PostgreSQL on 127.0.0.1:5432 and none installed (Debian package 'postgresql')")
    own = pg.OwnPostgres()
    try:
        own.init()
        own.start()
        own.wait_ready()
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
        own.remove()
        skip_or_fail(f"cannot start a PostgreSQL of the tests' own: {exc}")
    yield own.admin_url
    own.remove()


@pytest.fixture
def pg_url(postgres_admin: str) -> Iterator[str]:
    """A database of this test's own, dropped after it."""
    from tests import pg

    url = pg.create_database(postgres_admin)
    yield url
    pg.drop_database(postgres_admin, url)
