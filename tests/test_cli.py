"""The CLI's registry and history commands, run in-process against a database in tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from broker_bridge import __version__
from broker_bridge.cli import main
from tests.conftest import free_port


def run(capsys: pytest.CaptureFixture[str], db: Path, *args: str) -> tuple[int, str, str]:
    # A port where nothing listens: the CLI must still store, and say the broker was not reachable.
    code = main([*args, "--db", str(db), "--mqtt-listen", f"127.0.0.1:{free_port()}"])
    out, err = capsys.readouterr()
    return code, out, err


def test_devices_add_update_delete_and_manifest_on_invoke(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Register a device with a manifest; the CLI invoke path enforces it; update and delete work."""
    db = tmp_path / "b.db"
    manifest = tmp_path / "m.json"
    manifest.write_text(
        json.dumps(
            {"commands": {"reboot": {"aliases": ["restart"], "arguments": {"delay_s": {"type": "integer", "max": 60}}}}}
        )
    )
    code, out, _ = run(
        capsys,
        db,
        "devices",
        "add",
        "--app-version",
        "a-v1",
        "--token",
        "t1",
        "--id",
        "d1",
        "--label",
        "site=lab",
        "--manifest",
        str(manifest),
        "--json",
    )
    assert code == 0
    assert json.loads(out)["labels"] == {"site": "lab"}
    code, _, err = run(capsys, db, "invoke", "a-v1", "t1", "restart", "--payload", '{"delay_s": 99}')
    assert (code, "arguments.delay_s" in err) == (1, True)
    code, out, err = run(capsys, db, "invoke", "a-v1", "t1", "restart", "--payload", '{"delay_s": 5}', "--json")
    assert code == 0
    assert json.loads(out)["commandType"] == "reboot"
    assert "no broker" in err
    code, out, _ = run(capsys, db, "devices", "update", "d1", "--no-manifest", "--json")
    assert json.loads(out)["manifest"] is None
    code, _, err = run(capsys, db, "devices", "add", "--app-version", "a-v1", "--token", "t1")
    assert (code, "already registered" in err) == (1, True)
    assert run(capsys, db, "devices", "delete", "d1")[0] == 0
    code, _, err = run(capsys, db, "devices", "show", "d1")
    assert (code, "no device" in err) == (1, True)


def test_list_filters_and_show(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """list filters by token and state; show prints the record; a bad label is a usage error."""
    db = tmp_path / "b.db"
    for token in ("t1", "t2"):
        assert run(capsys, db, "invoke", "a-v1", token, "reboot")[0] == 0
    code, out, _ = run(capsys, db, "list", "--token", "t2", "--state", "pending", "--json")
    records = json.loads(out)
    assert [r["endpointToken"] for r in records] == ["t2"]
    code, out, _ = run(capsys, db, "show", str(records[0]["id"]))
    assert "state: pending" in out
    code, _, err = run(capsys, db, "devices", "add", "--app-version", "a", "--token", "t", "--label", "nokey")
    assert (code, "KEY=VALUE" in err) == (2, True)


def test_devices_list_filters_by_label_and_says_when_each_was_last_seen(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "l.db"
    for token, label in (("t1", "site=lab"), ("t2", "site=hq")):
        add = ("devices", "add", "--app-version", "a-v1", "--token", token, "--id", f"d-{token}", "--label", label)
        assert run(capsys, db, *add)[0] == 0
    code, out, _ = run(capsys, db, "devices", "list", "--label", "site=lab")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == ["d-t1"]
    assert "last seen: not yet" in out
    listed = json.loads(run(capsys, db, "devices", "list", "--json")[1])
    assert [(d["id"], d["last_seen_at"]) for d in listed] == [("d-t1", None), ("d-t2", None)]
    code, _, err = run(capsys, db, "devices", "list", "--label", "site")
    assert code != 0
    assert "KEY=VALUE" in err


def test_invoke_honours_a_closed_registry(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI builds the service as serve does: with registry_mode closed, an unknown token is
    refused and nothing is stored or registered (it used to store the command and the device)."""
    monkeypatch.setenv("BROKER_BRIDGE_REGISTRY_MODE", "closed")
    db = tmp_path / "b.db"
    code, _, err = run(capsys, db, "invoke", "myapp-v1", "unknown-token", "reboot")
    assert code == 1
    assert "unknown-token" in err
    assert run(capsys, db, "list", "--json")[1].strip() == "[]"
    assert run(capsys, db, "devices", "list", "--json")[1].strip() == "[]"


def test_invoke_with_an_idempotency_key_runs_once_and_refuses_another_request_under_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "k.db"
    args = ("invoke", "myapp-v1", "lamp1", "reboot", "--payload", '{"delay": 1}', "--idempotency-key", "job-1")
    code, out, _ = run(capsys, db, *args, "--json")
    assert code == 0
    first = json.loads(out)
    code, out, _ = run(capsys, db, *args, "--json")  # a retry: the same command
    assert (code, json.loads(out)["id"]) == (0, first["id"])
    code, _, err = run(capsys, db, *args[:4], "--payload", '{"delay": 2}', "--idempotency-key", "job-1")
    assert code == 1
    assert "idempotency key 'job-1' was used for command" in err
    code, _, err = run(capsys, db, *args[:4], "--idempotency-key", "")
    assert code == 1
    assert "--idempotency-key must be 1 to 200 characters" in err
    assert len(json.loads(run(capsys, db, "list", "--json")[1])) == 1


def test_cli_works_against_postgresql(capsys: pytest.CaptureFixture[str], pg_url: str) -> None:
    """invoke, list, show, cancel and devices on a PostgreSQL database, as on SQLite."""

    def cli(*args: str) -> tuple[int, str, str]:
        code = main([*args, "--db", pg_url, "--mqtt-listen", f"127.0.0.1:{free_port()}"])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = cli("invoke", "pg-v1", "t1", "reboot", "--payload", '{"a": 1}', "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["payload"] == {"a": 1}
    code, out, _ = cli("list", "--token", "t1", "--json")
    assert [r["id"] for r in json.loads(out)] == [record["id"]]
    assert json.loads(cli("show", str(record["id"]), "--json")[1])["state"] == "pending"
    assert json.loads(cli("cancel", str(record["id"]), "--json")[1])["state"] == "cancelled"
    code, _, err = cli("cancel", str(record["id"]))
    assert (code, "already cancelled" in err) == (1, True)
    assert cli("devices", "add", "--app-version", "pg-v1", "--token", "t2", "--id", "d2")[0] == 0
    listed = json.loads(cli("devices", "list", "--json")[1])
    assert {d["endpoint_token"] for d in listed} == {"t1", "t2"}  # t1 registered by its invoke (open mode)
    assert "d2" in {d["id"] for d in listed}


def test_version_and_module_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    """``--version`` prints the package's version; ``python -m broker_bridge`` is the same CLI."""
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"broker-bridge {__version__}"
    argv = [sys.executable, "-m", "broker_bridge", "--version"]
    run = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert (run.returncode, run.stdout.strip()) == (0, f"broker-bridge {__version__}")
