"""routing.Subscriptions: the indexed subscription table decides exactly as amqtt's filter test."""

from __future__ import annotations

import logging
from typing import Any

from amqtt.broker import Broker
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_bridge import routing
from broker_bridge.routing import Subscriptions

_LEVELS = st.sampled_from(["", "a", "b", "ab", "$SYS", "kp1", "+", "#", "a+", "b#"])
_TOPIC_LEVELS = _LEVELS.filter(lambda level: level not in ("+", "#", "a+", "b#"))


def amqtt_matches(topic: str, topic_filter: str) -> bool:
    broker = Broker.__new__(Broker)  # _matches needs only the logger
    broker.logger = logging.getLogger("amqtt.test")
    matched: bool = broker._matches(topic, topic_filter)
    return matched


def table(filters: list[str]) -> Subscriptions:
    subscriptions = Subscriptions()
    for topic_filter in filters:
        subscriptions[topic_filter] = []
    return subscriptions


_FILTERS = st.lists(_LEVELS, min_size=1, max_size=4).map("/".join)
_TOPICS = st.lists(_TOPIC_LEVELS, min_size=1, max_size=5).map("/".join)
# What amqtt also routes: a client's will topic is never checked for wildcards.
_ANY_TOPICS = st.lists(_LEVELS, min_size=1, max_size=5).map("/".join)


@settings(max_examples=1500, deadline=None)
@given(
    filters=st.lists(_FILTERS, max_size=12, unique=True),
    topics=st.lists(_TOPICS | _ANY_TOPICS, min_size=1, max_size=5),
)
def test_matching_is_amqtts_filter_test_over_the_whole_table(filters: list[str], topics: list[str]) -> None:
    """For any table and topic: the filters amqtt would route to, each once, in the order it would."""
    subscriptions = table(filters)
    for topic in topics:
        assert subscriptions.matching(topic) == [f for f in subscriptions if amqtt_matches(topic, f)]
        assert [routing.amqtt_matches(topic, f) for f in filters] == [amqtt_matches(topic, f) for f in filters]


_OPS = st.one_of(
    st.tuples(st.just("set"), _FILTERS),
    st.tuples(st.just("del"), _FILTERS),
    st.tuples(st.just("pop"), _FILTERS),
    st.tuples(st.just("popitem"), st.just("")),
    st.tuples(st.just("setdefault"), _FILTERS),
    st.tuples(st.just("update"), _FILTERS),
    st.tuples(st.just("clear"), st.just("")),
)


@settings(max_examples=500, deadline=None)
@given(ops=st.lists(_OPS, max_size=25), topics=st.lists(_TOPICS, min_size=1, max_size=4))
def test_the_index_follows_every_change_to_the_table(ops: list[tuple[str, str]], topics: list[str]) -> None:
    """Any sequence of changes, as amqtt makes them: lookups agree with a plain dict scanned linearly."""
    subscriptions, plain = Subscriptions(), dict[str, list[Any]]()
    for op, key in ops:
        for target in (subscriptions, plain):
            if op == "set":
                target[key] = []
            elif op == "del" and key in target:
                del target[key]
            elif op == "pop":
                target.pop(key, None)
            elif op == "popitem" and target:
                target.popitem()
            elif op == "setdefault":
                target.setdefault(key, [])
            elif op == "update":
                target.update({key: [], key + "/#": []})
            elif op == "clear":
                target.clear()
        for topic in topics:
            assert subscriptions.matching(topic) == [f for f in plain if amqtt_matches(topic, f)]


def test_deep_filters_do_not_recurse() -> None:
    """A filter thousands of levels deep is matched without running out of stack."""
    deep = "/".join(["a"] * 5000)
    subscriptions = table([deep.replace("a", "+", 1), deep[:-1] + "#"])
    assert subscriptions.matching(deep) == [deep.replace("a", "+", 1), deep[:-1] + "#"]


def test_every_way_of_changing_the_table_is_seen() -> None:
    """amqtt mutates the dict directly; each mutator must make the next lookup see the change."""
    subscriptions = table(["a/+"])
    assert subscriptions.matching("a/b") == ["a/+"]
    subscriptions["a/#"] = []
    assert subscriptions.matching("a/b") == ["a/+", "a/#"]
    del subscriptions["a/+"]
    assert subscriptions.matching("a/b") == ["a/#"]
    subscriptions.setdefault("+/b", [])
    assert subscriptions.matching("a/b") == ["a/#", "+/b"]
    subscriptions.pop("a/#")
    assert subscriptions.matching("a/b") == ["+/b"]
    subscriptions.update({"a/b": [], "#": []})
    assert subscriptions.matching("a/b") == ["+/b", "a/b", "#"]
    subscriptions.popitem()
    assert subscriptions.matching("a/b") == ["+/b", "a/b"]
    subscriptions |= {"+/+": []}
    assert subscriptions.matching("a/b") == ["+/b", "a/b", "+/+"]
    subscriptions["a/b"].append(("session", 1))  # holders change, filters do not: nothing to rebuild
    assert subscriptions.matching("a/b") == ["+/b", "a/b", "+/+"]
    subscriptions.clear()
    assert subscriptions.matching("a/b") == []


def test_dollar_topics_skip_leading_wildcards() -> None:
    """[MQTT-4.7.2-1]: '$SYS/x' is not matched by '#' or '+/x', but by '$SYS/#'."""
    subscriptions = table(["#", "+/x", "$SYS/#", "$SYS/+"])
    assert subscriptions.matching("$SYS/x") == ["$SYS/#", "$SYS/+"]
    assert subscriptions.matching("kp1/x") == ["#", "+/x"]
