"""PostgreSQL for tests: the machine's server (127.0.0.1:5432, or $BROKER_BRIDGE_TEST_POSTGRES) with a
database per test, or a server of the test's own (``initdb`` + ``pg_ctl`` on a free port)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from bench.ports import free_port

ADMIN_ENV = "BROKER_BRIDGE_TEST_POSTGRES"  # an admin URL of a server tests may create databases on
MACHINE_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _psql(admin_url: str, statement: str, timeout_s: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", admin_url, "-v", "ON_ERROR_STOP=1", "-tAc", statement],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def reachable(admin_url: str) -> bool:
    if shutil.which("psql") is None:
        return False
    try:
        return _psql(admin_url, "SELECT 1", timeout_s=5).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def with_database(admin_url: str, name: str) -> str:
    """The admin URL with another database name."""
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}"


def create_database(admin_url: str) -> str:
    name = f"bb_test_{uuid.uuid4().hex[:12]}"
    done = _psql(admin_url, f"CREATE DATABASE {name}")
    if done.returncode != 0:
        raise RuntimeError(f"cannot create database {name}: {done.stderr}")
    return with_database(admin_url, name)


def drop_database(admin_url: str, url: str) -> None:
    name = url.rpartition("/")[2]
    _psql(admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", timeout_s=30)


def binaries() -> Path | None:
    """The directory of initdb and pg_ctl (Debian keeps them out of PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return Path(candidates[0]).parent if candidates else None


class OwnPostgres:
    """A PostgreSQL server of the test's own on a free port; it may be stopped and started at will.

    initdb refuses to run as root: as root the server runs as the 'postgres' user, in a directory
    that user owns."""

    def __init__(self) -> None:
        bindir = binaries()
        if bindir is None:
            raise RuntimeError("PostgreSQL's initdb is not installed (Debian package 'postgresql')")
        self.bindir = bindir
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="bb-pg-", dir="/tmp"))
        self.data = self.workdir / "data"
        self.log = self.workdir / "server.log"
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "postgres"
            pw = pwd.getpwnam(self._user)
            os.chown(self.workdir, pw.pw_uid, pw.pw_gid)

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout_s: float = 60) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stderr or done.stdout}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.workdir} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not reachable(self.admin_url):
            if time.monotonic() > deadline:
                raise TimeoutError(f"own PostgreSQL on port {self.port} is not ready")
            time.sleep(0.2)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.workdir, ignore_errors=True)
