"""Which subscription filters match a topic, without testing every filter.

amqtt routes each message by testing its topic against every subscription filter the broker holds:
with N devices subscribed, each message costs O(N) filter tests (two filters per device), and the
KP1 reply delivery looked through them again. ``Subscriptions`` is amqtt's subscription table
(filter -> [(session, qos)]) with a trie of its wildcard filters beside it: a lookup walks the topic's
levels, whatever the number of filters. Pure: no I/O, no amqtt import.
"""

from __future__ import annotations

import itertools
from typing import Any

Holders = list[tuple[Any, int]]  # amqtt's (Session, granted QoS) pairs for one filter


class _Node:
    __slots__ = ("children", "filters")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.filters: list[str] = []  # the filters that end at this node


def _wild(text: str) -> bool:
    return "+" in text or "#" in text


def amqtt_matches(topic: str, topic_filter: str) -> bool:
    """amqtt 0.12.1's ``Broker._matches``, rule for rule (what the trie must agree with)."""
    if topic.startswith("$") and topic_filter.startswith(("+", "#")):
        return False
    if not _wild(topic_filter):
        return topic_filter == topic
    wanted, levels = topic_filter.split("/"), topic.split("/")
    for index, level in enumerate(wanted):
        if ("+" in level and level != "+") or ("#" in level and level != "#"):
            return False
        if level == "#":
            return index == len(wanted) - 1
        if index >= len(levels) or level not in ("+", levels[index]):
            return False
    return len(wanted) == len(levels)


class Subscriptions(dict[str, Holders]):
    """amqtt's ``Broker._subscriptions`` that can also list the filters matching a topic.

    amqtt changes the table in place (a new filter, a filter whose last holder left, ``clear`` at
    start), so every mutator keeps the trie in step: one filter's insert or removal costs its levels.
    The matching rules are amqtt's own (``amqtt_matches``), including the MQTT ones: '#' also matches
    its parent level, and a topic starting with '$' matches no filter starting with a wildcard.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rebuild()

    # -- the index, kept in step with every way to add or remove a filter ------------------------
    def _rebuild(self) -> None:
        self._root = _Node()
        self._order: dict[str, int] = {}  # filter -> position in the table's (insertion) order
        self._positions = itertools.count()
        for topic_filter in self:
            self._added(topic_filter)

    def _added(self, topic_filter: str) -> None:
        self._order[topic_filter] = next(self._positions)
        if _wild(topic_filter):  # filters without wildcards are found by the dict itself
            node = self._root
            for level in topic_filter.split("/"):
                node = node.children.setdefault(level, _Node())
            node.filters.append(topic_filter)

    def _removed(self, topic_filter: str) -> None:
        del self._order[topic_filter]
        if not _wild(topic_filter):
            return
        path = [self._root]
        for level in topic_filter.split("/"):
            path.append(path[-1].children[level])
        path[-1].filters.remove(topic_filter)
        levels = topic_filter.split("/")
        for parent, level, node in zip(reversed(path[:-1]), reversed(levels), reversed(path[1:]), strict=True):
            if node.filters or node.children:
                break
            del parent.children[level]  # prune what no filter ends at or passes through any more

    def __setitem__(self, key: str, value: Holders) -> None:
        new = key not in self
        super().__setitem__(key, value)
        if new:
            self._added(key)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._removed(key)

    def pop(self, key: str, *default: Any) -> Any:
        if key in self:
            self._removed(key)
        return super().pop(key, *default)

    def popitem(self) -> tuple[str, Holders]:
        item = super().popitem()
        self._removed(item[0])
        return item

    def setdefault(self, key: str, default: Holders | None = None) -> Holders:
        if key not in self:
            self[key] = default if default is not None else []
        return self[key]

    def clear(self) -> None:
        super().clear()
        self._rebuild()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._rebuild()

    def __ior__(self, other: Any) -> Subscriptions:  # type: ignore[override,misc]
        self.update(other)
        return self

    # -- lookups -----------------------------------------------------------------------------------
    def matching(self, topic: str) -> list[str]:
        """The filters that match ``topic``, in the table's order (the order amqtt would route in)."""
        if _wild(topic):
            # Not a valid topic name, yet amqtt routes a client's will on it: test each filter as
            # amqtt does (a walk would take a literal '+' level both as itself and as a wildcard).
            return [topic_filter for topic_filter in self if amqtt_matches(topic, topic_filter)]
        found: list[str] = [topic] if topic in self else []  # the filter without wildcards that matches
        levels = topic.split("/")
        # (node, index of the next level, may wildcards match here): only a '$' topic's first level may not.
        stack = [(self._root, 0, not topic.startswith("$"))]
        while stack:
            node, index, wildcards = stack.pop()
            if wildcards and (rest := node.children.get("#")) is not None:
                found.extend(rest.filters)  # '#' matches what is left, even nothing
            if index == len(levels):
                found.extend(node.filters)
                continue
            if (literal := node.children.get(levels[index])) is not None:
                stack.append((literal, index + 1, True))
            if wildcards and (plus := node.children.get("+")) is not None:
                stack.append((plus, index + 1, True))
        if len(found) > 1:
            found.sort(key=self._order.__getitem__)
        return found
