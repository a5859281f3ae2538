"""Persistence behind one interface (``CommandStore``); every implementation passes one contract suite."""

from broker_bridge.store.base import CommandQuery, CommandStore, Created, Delivery, Polled, ReportOutcome

__all__ = ["CommandQuery", "CommandStore", "Created", "Delivery", "Polled", "ReportOutcome"]
