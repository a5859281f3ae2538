"""HTTP edges: the KP1 device binding, the Enapter-style v3 API, Kaa-compatible REST, operations."""

from broker_bridge.api.app import create_app

__all__ = ["create_app"]
