"""Free TCP ports for test and benchmark servers, chosen where the kernel never hands out ports itself.

Binding to port 0 returns a port from the ephemeral range (``net.ipv4.ip_local_port_range``), the
same range every outgoing connection takes its source port from. Between choosing such a port and
the server binding it, any client connection on the machine may take it: CI saw exactly that
("address already in use" on a port a moment earlier found free). Ports below the ephemeral range
are only ever taken by an explicit bind, so a random one that binds now stays free in practice.
Stdlib only: the tests and the benchmark harness both use it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_LOWEST = 20000  # below this live well-known services (databases, brokers, dev servers)
_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_rng = random.SystemRandom()  # immune to tests that seed the global generator
_handed_out: set[int] = set()  # never the same port twice in one process (TIME_WAIT, slow servers)


def _candidates() -> range | None:
    try:
        low = int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return range(_LOWEST, low) if low - _LOWEST >= 1000 else None


def _binds(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and no client connection will take."""
    candidates = _candidates()
    if candidates is not None:
        for _ in range(500):
            port = _rng.choice(candidates)
            if port not in _handed_out and _binds(port):
                _handed_out.add(port)
                return port
    # No usable range below the ephemeral one (unusual sysctl): fall back to the kernel's choice.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    _handed_out.add(port)
    return port
