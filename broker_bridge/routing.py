"""Which subscription filters match a topic, without testing every filter.

amqtt routes each message by testing its topic against every subscription filter the broker holds:
with N devices subscribed, each message costs O(N) filter tests (two filters per device), and the
KP1 reply delivery looked through them again. ``Subscriptions`` is amqtt's subscription table
(filter -> [(session, qos)]) with a trie of its wildcard filters beside it: a lookup walks the topic's
levels, whatever the number of filters. Pure: no I/O, no amqtt import.
"""

from __future__ import annotations

from typing import Any

Holders = list[tuple[Any, int]]  # amqtt's (Session, granted QoS) pairs for one filter


class _Node:
    __slots__ = ("children", "filters")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.filters: list[str] = []  # the filters that end at this node


class Subscriptions(dict[str, Holders]):
    """amqtt's ``Broker._subscriptions`` that can also list the filters matching a topic.

    amqtt changes the table in place, so every mutator marks the index stale and the next lookup
    rebuilds it: filters come and go with subscriptions and connections, messages far more often.
    The matching rules are amqtt's own (``Broker._matches``), including the MQTT ones: '#' also
    matches its parent level, and a topic starting with '$' matches no filter starting with a wildcard.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._root: _Node | None = None
        self._order: dict[str, int] = {}

    # -- every way to add or remove a filter marks the index stale -------------------------------
    def _stale(self) -> None:
        self._root = None

    def __setitem__(self, key: str, value: Holders) -> None:
        if key not in self:
            self._stale()
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._stale()

    def clear(self) -> None:
        super().clear()
        self._stale()

    def pop(self, *args: Any) -> Any:
        self._stale()
        return super().pop(*args)

    def popitem(self) -> tuple[str, Holders]:
        self._stale()
        return super().popitem()

    def setdefault(self, key: str, default: Holders | None = None) -> Holders:
        if key not in self:
            self._stale()
        return super().setdefault(key, default if default is not None else [])

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._stale()
        super().update(*args, **kwargs)

    def __ior__(self, other: Any) -> Subscriptions:  # type: ignore[override,misc]
        self._stale()
        super().update(other)
        return self

    # -- lookups -----------------------------------------------------------------------------------
    def matching(self, topic: str) -> list[str]:
        """The filters that match ``topic``, in the table's order (the order amqtt would route in)."""
        root = self._root if self._root is not None else self._build()
        exact = topic in self and "+" not in topic and "#" not in topic  # then a filter without wildcards
        found: list[str] = [topic] if exact else []
        _walk(root, topic.split("/"), 0, found, wildcards=not topic.startswith("$"))
        if len(found) > 1:
            found.sort(key=self._order.__getitem__)
        return found

    def _build(self) -> _Node:
        # Filters amqtt never matches ('a+', '#/a') need no check: a topic has no '+' or '#' level to
        # reach a node named like that, and a walk takes what ends at a '#' node, never its children.
        root = _Node()
        for topic_filter in self:
            if "+" in topic_filter or "#" in topic_filter:
                node = root
                for level in topic_filter.split("/"):
                    node = node.children.setdefault(level, _Node())
                node.filters.append(topic_filter)
        self._order = {topic_filter: position for position, topic_filter in enumerate(self)}
        self._root = root
        return root


def _walk(node: _Node, levels: list[str], index: int, found: list[str], *, wildcards: bool) -> None:
    if wildcards and (rest := node.children.get("#")) is not None:
        found.extend(rest.filters)  # '#' matches what is left, even nothing
    if index == len(levels):
        found.extend(node.filters)
        return
    if (literal := node.children.get(levels[index])) is not None:
        _walk(literal, levels, index + 1, found, wildcards=True)
    if wildcards and (plus := node.children.get("+")) is not None:
        _walk(plus, levels, index + 1, found, wildcards=True)
