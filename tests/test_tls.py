"""The bridge over TLS (``mqtts://``) to a real Mosquitto: pushes, results and replies under load.

The bridge reads and writes paho's socket through its own buffers (``paho_io``); over TLS the
socket is an ``SSLSocket`` whose reads return one TLS record at a time and whose writes may stop
half-way. A burst of large commands to one device crosses both, many records per read.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from broker_bridge.commands import CommandState
from broker_bridge.topics import Target
from tests.conftest import MosquittoProcess, mosquitto_available, skip_or_fail
from tests.harness import make_settings, running_service

COMMANDS = 100
PAYLOAD_BYTES = 10_000  # each push is the whole outstanding list (up to 1 MB here): many TLS records


def make_certificates(workdir: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for 127.0.0.1: (ca, cert, key)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        skip_or_fail("openssl is not installed (Debian package 'openssl')")
        raise AssertionError  # unreachable: skip_or_fail raises
    ca, ca_key, cert, key, csr = (workdir / n for n in ("ca.pem", "ca.key", "server.pem", "server.key", "req.csr"))
    ext = workdir / "san.cnf"
    ext.write_text("subjectAltName = IP:127.0.0.1\n")
    for argv in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=broker-bridge test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
         "-extfile", ext],
    ):  # fmt: skip
        subprocess.run([openssl, *map(str, argv)], check=True, capture_output=True)
    return ca, cert, key


@pytest.fixture
def tls_mosquitto(tmp_path: Path) -> Iterator[tuple[MosquittoProcess, Path]]:
    """Mosquitto with a TLS listener on a free port; and the CA file that verifies it."""
    if not mosquitto_available():
        skip_or_fail("mosquitto is not installed (Debian package 'mosquitto')")
    ca, cert, key = make_certificates(tmp_path)
    broker = MosquittoProcess(tmp_path)
    listener = f"listener {broker.port} 127.0.0.1\n"
    conf = broker.conf.read_text().replace(listener, f"{listener}cafile {ca}\ncertfile {cert}\nkeyfile {key}\n")
    broker.conf.write_text(conf)
    broker.start()
    yield broker, ca
    broker.stop()


async def test_a_burst_of_large_commands_over_tls(
    tls_mosquitto: tuple[MosquittoProcess, Path], tmp_path: Path, app_version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100 commands of 10 kB to one device over TLS: every push arrives and every result executes."""
    broker, ca = tls_mosquitto
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the bridge verifies the broker with the default CAs
    settings = make_settings(tmp_path, broker.port, broker_url=f"mqtts://127.0.0.1:{broker.port}")
    target = Target(app_version=app_version, endpoint_token="tls-dev", command_type="reboot")
    base = f"kp1/{app_version}/cex/tls-dev"
    device = aiomqtt.Client("127.0.0.1", broker.port, tls_context=ssl.create_default_context(cafile=str(ca)))
    async with running_service(settings) as service, device:
        await device.subscribe(f"{base}/#", qos=1)
        created = [await service.invoke(target, {"n": n, "blob": "x" * PAYLOAD_BYTES}) for n in range(COMMANDS)]
        ids = {c.id for c in created}
        answered: set[int] = set()

        async def answer() -> None:
            async for message in device.messages:
                if message.topic.matches(f"{base}/command/reboot/status") and isinstance(message.payload, bytes):
                    for item in json.loads(message.payload):
                        if item["id"] in ids - answered:
                            assert len(item["payload"]["blob"]) == PAYLOAD_BYTES
                            answered.add(item["id"])
                            result = {"id": item["id"], "statusCode": 200}
                            await device.publish(f"{base}/result/reboot", json.dumps(result), qos=1)
                if answered == ids:
                    return

        await asyncio.wait_for(answer(), 60)
        for _ in range(200):
            finals = [await service.get(i) for i in sorted(ids)]
            if all(c.state is CommandState.EXECUTED for c in finals):
                break
            await asyncio.sleep(0.05)
    assert [c.state for c in finals] == [CommandState.EXECUTED] * COMMANDS
