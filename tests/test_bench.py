"""The benchmark harness runs end to end at its smallest scale and writes its three files.

Nothing here asserts a time or a rate: only that every scenario ran and the outputs are well formed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import mosquitto_available

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_tiny_run_writes_json_markdown_and_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the bench extra is not installed: pip install -e '.[bench]'")
    brokers = "mosquitto,amqtt" if mosquitto_available() else "amqtt"
    scenarios = ["echo", "e2e", "storage"]
    if mosquitto_available():
        scenarios.append("fanout")
        py_spy = Path(sys.executable).parent / "py-spy"
        if py_spy.exists() or shutil.which("py-spy"):
            scenarios.append("profile")
    out = tmp_path / "results"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--tiny",
            "--no-progress",
            "--out",
            str(out),
            "--brokers",
            brokers,
            "--scenarios",
            ",".join(scenarios),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((out / "bench-tiny.json").read_text())
    assert set(results) >= {"meta", "scenarios", "targets", "errors"}
    assert results["errors"] == {}
    assert results["meta"]["mode"] == "tiny"
    assert set(results["scenarios"]) == set(scenarios)
    for broker in brokers.split(","):
        echo = results["scenarios"]["echo"][broker]
        assert {"window_64", "window_1"} <= set(echo)
        assert echo["window_64"]["per_s"] > 0
        assert {"p50_ms", "p99_ms"} <= set(echo["window_1"]["latency"])
        e2e = results["scenarios"]["e2e"][broker]
        assert e2e["full"]["per_s"] > 0
        assert e2e["full"]["latency_receipt"]["count"] == e2e["full"]["count"]
        assert e2e["light"]["count"] > 0
    storage = results["scenarios"]["storage"]
    assert storage["db"]["rows"] > 0
    assert storage["db"]["bytes_per_command"] > 0
    assert storage["at_scale"]["expire"]["expired"] == storage["db"]["due"]
    assert storage["serve_rss_mb"]["max_mb"] > 0
    if "fanout" in scenarios:
        fanout = results["scenarios"]["fanout"]
        assert fanout["executed"] == fanout["devices"]
    if "profile" in scenarios:
        profile = results["scenarios"]["profile"]["mosquitto"]
        assert profile["samples_active"] > 0
        assert profile["categories"]
    names = [row["name"] for row in results["targets"]]
    assert any("e2e executed/s" in name for name in names)
    assert any("store get by id" in name for name in names)

    summary = (out / "bench-tiny.md").read_text()
    assert summary.startswith("# broker-bridge benchmark")
    assert "## Targets" in summary
    png = (out / "bench-tiny.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert len(png) > 1000
