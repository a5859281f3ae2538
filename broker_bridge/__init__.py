"""broker-bridge: Kaa KP1 command execution over MQTT, with a durable command history."""

__version__ = "0.1.0"
