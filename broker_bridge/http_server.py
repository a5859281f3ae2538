"""uvicorn inside our event loop and TaskGroup, on a socket we bind (so a taken port is our error)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import structlog
import uvicorn
from fastapi import FastAPI

from broker_bridge.errors import StartupError

log = structlog.get_logger(__name__)
GRACE_S = 3.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the runtime owns SIGINT and SIGTERM


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"cannot listen for HTTP on {host}:{port}: {exc.strerror}; pass --http-listen HOST:PORT to use another"
        ) from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(app: FastAPI, sock: socket.socket) -> None:
    """Serve until cancelled, then let requests in flight finish for a moment."""
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", log_level="warning")
    server = _Server(config)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        await asyncio.shield(serving)
    except asyncio.CancelledError:
        server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(serving, GRACE_S)
        raise


def api_keys(configured: list[str], key_file: Path) -> list[str]:
    """The configured keys; without any, the key kept next to the database (generated once)."""
    if configured:
        return configured
    if key_file.exists():
        key = key_file.read_text().strip()
        if not key:  # every admin request would be refused (401), with nothing said
            raise StartupError(
                f"API key file {key_file} is empty; delete it to have a new key generated, or set api_keys"
            )
        return [key]
    key = secrets.token_urlsafe(32)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    log.warning("api_key_generated", file=str(key_file), read_it_with=f"cat {key_file}")
    return [key]
