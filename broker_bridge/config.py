"""Settings: defaults < TOML file < environment (``BROKER_BRIDGE_*``) < command-line flags."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from broker_bridge.delivery import MAX_PUSH_BYTES, envelope_bytes
from broker_bridge.errors import StartupError
from broker_bridge.keys import names
from broker_bridge.registry import RegistryMode
from broker_bridge.service import DAY_S, Limits
from broker_bridge.topics import TopicScheme

CONFIG_ENV = "BROKER_BRIDGE_CONFIG"


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerAddress:
    """Where an MQTT broker listens, and how to log in."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False


class NamedKey(BaseModel):
    """An API key with the name commands it creates record as ``invokedBy``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[^\s]+$")
    key: str = Field(min_length=1)


class TopicSettings(BaseModel):
    """Topic prefixes (see topics.md)."""

    model_config = ConfigDict(extra="forbid")
    kp1_prefix: str = "kp1"
    extension: str = "cex"
    admin_prefix: str = "cex/admin"
    events_prefix: str = "cex/events"

    def scheme(self) -> TopicScheme:
        return TopicScheme(**self.model_dump())


class Settings(BaseSettings):
    """Every setting of broker-bridge; see config/broker-bridge.toml for the documented example."""

    model_config = SettingsConfigDict(env_prefix="BROKER_BRIDGE_", env_nested_delimiter="__", extra="forbid")

    db: str = "broker-bridge.db"  # a SQLite file, or a postgresql:// URL (libpq URI)
    db_synchronous: Literal["full", "normal"] = "full"
    mqtt_listen: str = "127.0.0.1:1883"
    http_listen: str = "127.0.0.1:8080"
    broker_url: str | None = None
    api_keys: list[str | NamedKey] = Field(default_factory=list)  # a plain string is named key-<fingerprint>
    mqtt_password_file: Path | None = None
    mqtt_acl_file: Path | None = None
    allow_anonymous: bool = False  # embedded broker: listen beyond loopback without a password file
    # With mqtt_password_file: the KP1 HTTP binding requires the same logins (HTTP Basic) and ACL.
    http_device_logins: bool = True
    registry_mode: RegistryMode = RegistryMode.OPEN
    instance: str = Field(default_factory=socket.gethostname, min_length=1, max_length=64)
    client_id: str | None = None  # None: broker-bridge-<instance>
    share_group: str = Field(default="broker-bridge", pattern=r"^[^/+#$\s]+$")
    shared_subscriptions: bool | None = None  # None: with PostgreSQL and an external broker
    retain_pushes: bool | None = None
    mqtt5: bool | None = None
    default_ttl_s: float = Field(default=DAY_S, gt=0)
    max_ttl_s: float = Field(default=30 * DAY_S, gt=0)
    retention_s: float = Field(default=30 * DAY_S, gt=0)
    sweep_interval_s: float = Field(default=1.0, gt=0)
    max_payload_bytes: int = Field(default=256 * 1024, gt=0)
    max_push_bytes: int = Field(default=MAX_PUSH_BYTES, gt=0)  # one push message at most (EMQX: 1 MB)
    max_outstanding_per_endpoint: int = Field(default=1000, gt=0)
    max_in_flight_per_target: int | None = Field(default=None, gt=0)  # None: the whole list (Kaa)
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    topics: TopicSettings = TopicSettings()

    @field_validator("db", mode="before")
    @classmethod
    def _db_text(cls, value: object) -> object:
        return str(value) if isinstance(value, Path) else value

    @field_validator("instance")
    @classmethod
    def _check_instance(cls, value: str) -> str:
        if not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError(f"instance names use letters, digits, '-', '_' and '.', got {value!r}")
        return value

    @field_validator("mqtt_listen", "http_listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_broker_url(value)
        return value

    @model_validator(mode="after")
    def _one_command_fits_a_push(self) -> Settings:
        needed = self.max_payload_bytes + envelope_bytes()
        if self.max_push_bytes < needed:
            raise ValueError(
                f"max_push_bytes ({self.max_push_bytes}) cannot carry one command of max_payload_bytes "
                f"({self.max_payload_bytes}) in its push array ({needed} bytes with the {envelope_bytes()}-byte "
                f"envelope): raise max_push_bytes to at least {needed} or lower max_payload_bytes"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @property
    def embedded(self) -> bool:
        return self.broker_url is None

    @property
    def postgres(self) -> bool:
        """The database is PostgreSQL (several instances may share it), not a SQLite file."""
        return self.db.startswith(("postgresql://", "postgres://"))

    @property
    def db_path(self) -> Path:
        """The SQLite file (only when not ``postgres``)."""
        return Path(self.db)

    @property
    def bridge_client_id(self) -> str:
        """The bridge's MQTT client id: stable per instance, so a restart resumes its session."""
        return self.client_id or f"broker-bridge-{self.instance}"

    @property
    def shared(self) -> bool:
        """Subscribe as a member of the shared-subscription group (several instances share the work)."""
        if self.shared_subscriptions is None:
            return self.postgres and not self.embedded
        return self.shared_subscriptions

    def db_description(self) -> str:
        """The database for logs and messages, without a password."""
        return redact_url(self.db) if self.postgres else self.db

    @property
    def retain(self) -> bool:
        """Retained pushes by default with an external broker, where we cannot see who connects."""
        return (not self.embedded) if self.retain_pushes is None else self.retain_pushes

    def broker_address(self) -> BrokerAddress:
        if self.broker_url is not None:
            return parse_broker_url(self.broker_url)
        host, port = parse_listen(self.mqtt_listen)
        return BrokerAddress(host=host, port=port)

    @property
    def use_mqtt5(self) -> bool:
        """MQTT 5 with an external broker (no-local subscriptions); amqtt speaks only 3.1.1."""
        return (not self.embedded) if self.mqtt5 is None else self.mqtt5

    @property
    def api_key_file(self) -> Path:
        """Where a generated API key is kept: next to the SQLite file (with PostgreSQL it is kept in
        the database, shared by every instance)."""
        return self.db_path.with_name(self.db_path.name + ".api-key")

    @property
    def keys(self) -> list[str]:
        """The configured API keys, without their names."""
        return [k if isinstance(k, str) else k.key for k in self.api_keys]

    @property
    def key_names(self) -> dict[str, str]:
        """The names given to keys, by ``keys.fingerprint``."""
        return names((k.name, k.key) for k in self.api_keys if isinstance(k, NamedKey))

    def limits(self) -> Limits:
        return Limits(
            default_ttl_s=self.default_ttl_s,
            max_ttl_s=self.max_ttl_s,
            retention_s=self.retention_s,
            max_outstanding_per_endpoint=self.max_outstanding_per_endpoint,
            max_in_flight_per_target=self.max_in_flight_per_target,
        )


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:1883, got {value!r}")
    return host.strip("[]"), int(port)


def parse_broker_url(value: str) -> BrokerAddress:
    parts = urlsplit(value)
    if parts.scheme not in ("mqtt", "mqtts", "tcp") or not parts.hostname:
        raise ValueError(f"expected mqtt://[user:pass@]host[:port] or mqtts://..., got {value!r}")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        host=parts.hostname,
        port=parts.port or (8883 if tls else 1883),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=tls,
    )


def redact_url(url: str) -> str:
    """A URL with its password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{netloc[2]}").geturl()


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from the TOML file (flag, or $BROKER_BRIDGE_CONFIG), the environment and overrides."""
    path = config_file or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    if path is not None and not path.is_file():
        raise StartupError(f"config file {path} does not exist")

    class FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    try:
        return FileSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        raise StartupError(f"invalid settings: {exc}") from exc
