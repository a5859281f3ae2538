"""Settings precedence: defaults < TOML file < BROKER_BRIDGE_* environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker_bridge.config import load_settings, parse_broker_url
from broker_bridge.errors import StartupError

EXAMPLE = Path(__file__).parent.parent / "config" / "broker-bridge.toml"


def test_defaults_are_zero_config() -> None:
    """With nothing configured: embedded broker on 127.0.0.1:1883, SQLite in the working directory."""
    settings = load_settings()
    assert settings.embedded
    assert settings.mqtt_listen == "127.0.0.1:1883"
    assert settings.db_path == Path("broker-bridge.db")
    assert not settings.retain


def test_file_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each layer overrides the one before; nested topic settings merge key by key."""
    config = tmp_path / "bb.toml"
    config.write_text('default_ttl_s = 5\nretention_s = 50\n[topics]\nextension = "cmd"\n')
    monkeypatch.setenv("BROKER_BRIDGE_DEFAULT_TTL_S", "7")
    monkeypatch.setenv("BROKER_BRIDGE_TOPICS__ADMIN_PREFIX", "ops/admin")
    settings = load_settings(config, default_ttl_s=9)
    assert (settings.default_ttl_s, settings.retention_s) == (9, 50)
    assert (settings.topics.extension, settings.topics.admin_prefix) == ("cmd", "ops/admin")
    monkeypatch.setenv("BROKER_BRIDGE_CONFIG", str(config))
    assert load_settings().default_ttl_s == 7


def test_shipped_example_loads() -> None:
    """config/broker-bridge.toml is valid and means the defaults."""
    assert load_settings(EXAMPLE).model_dump() == load_settings().model_dump()


def test_external_broker_url() -> None:
    """A broker URL selects the external broker, with retained pushes, credentials decoded."""
    settings = load_settings(broker_url="mqtt://bridge:s%40cret@mq.example:1884")
    assert not settings.embedded
    assert settings.retain
    address = settings.broker_address()
    assert (address.host, address.port, address.username, address.password) == ("mq.example", 1884, "bridge", "s@cret")
    assert parse_broker_url("mqtts://h").port == 8883


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"mqtt_listen": "1883"}, "HOST:PORT"),
        ({"broker_url": "http://x"}, "mqtt://"),
        ({"default_ttl_s": -1}, "default_ttl_s"),
        ({"log_format": "xml"}, "log_format"),
        ({"max_in_flight_per_target": 0}, "max_in_flight_per_target"),
    ],
)
def test_bad_settings_name_the_problem(overrides: dict[str, object], words: str) -> None:
    """Invalid settings stop start-up with a message naming the setting."""
    with pytest.raises(StartupError, match=words):
        load_settings(**overrides)


def test_delivery_window_reaches_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset by default (the whole list, as Kaa); from the environment into the service's limits."""
    assert load_settings().limits().max_in_flight_per_target is None
    monkeypatch.setenv("BROKER_BRIDGE_MAX_IN_FLIGHT_PER_TARGET", "1")
    assert load_settings().limits().max_in_flight_per_target == 1


def test_a_push_limit_too_small_for_one_command_is_refused_naming_the_fix() -> None:
    """max_push_bytes must carry one command of max_payload_bytes plus its envelope in the array."""
    with pytest.raises(StartupError, match="raise max_push_bytes to at least 1039 or lower max_payload_bytes"):
        load_settings(max_payload_bytes=1000, max_push_bytes=1038)
    assert load_settings(max_payload_bytes=1000, max_push_bytes=1039).max_push_bytes == 1039
    assert load_settings().max_push_bytes == 960 * 1024  # EMQX's default packet limit is 1 MB


def test_missing_config_file(tmp_path: Path) -> None:
    """A config file that does not exist is an error, not silently ignored."""
    with pytest.raises(StartupError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
