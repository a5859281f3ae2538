"""The delivery rules on their own: the window (oldest k commands) and splitting a list into messages."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_bridge import delivery
from broker_bridge.commands import Command, NewCommand, create, delivery_item
from broker_bridge.delivery import Item, array_bytes, envelope_bytes, first_message, messages, split, window
from broker_bridge.protocol import MAX_ID, decode, encode
from broker_bridge.topics import Codec, Target

T0 = datetime(2026, 1, 1, tzinfo=UTC)
REBOOT = Target(app_version="app-v1", endpoint_token="dev1", command_type="reboot")


def command(command_id: int, payload: Any = None) -> Command:
    new = NewCommand(target=REBOOT, payload=payload, created_at=T0, expires_at=T0 + timedelta(hours=1))
    return create(new, command_id)


payloads = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def outstanding(draw: st.DrawFn) -> list[Command]:
    """Commands with distinct ids in id order, as the stores return them."""
    ids = sorted(draw(st.sets(st.integers(1, MAX_ID), max_size=40)))
    return [command(i, draw(payloads)) for i in ids]


# -- the window ----------------------------------------------------------------------------------
@given(ids=st.lists(st.integers(1, 10**6), unique=True, max_size=30), k=st.integers(1, 40))
def test_window_is_the_oldest_k_in_id_order(ids: list[int], k: int) -> None:
    """Whatever the order handed in, the window is the k lowest ids, lowest first."""
    assert [c.id for c in window([command(i) for i in ids], k)] == sorted(ids)[:k]


def test_no_window_hands_out_the_whole_list_as_it_is() -> None:
    """None (the default) is Kaa's behaviour: every outstanding command."""
    listed = [command(3), command(1), command(2)]
    assert window(listed, None) == tuple(listed)


# -- sizes ---------------------------------------------------------------------------------------
@settings(max_examples=200)
@given(values=st.lists(payloads, max_size=40), codec=st.sampled_from(Codec))
def test_array_size_from_item_sizes_is_the_encoded_size(values: list[Any], codec: Codec) -> None:
    """The size computed from the items equals the size of the array encoded in one go."""
    sizes = [len(encode(v, codec)) for v in values]
    assert array_bytes(len(values), sum(sizes), codec) == len(encode(values, codec))


@pytest.mark.parametrize("count", [0, 1, 15, 16, 2**16 - 1, 2**16, 70_000])
def test_msgpack_array_headers_at_their_bounds(count: int) -> None:
    """fixarray up to 15 items, array16 up to 65535, array32 beyond: as msgpack itself writes them."""
    items = [Item(command_id=i + 1, data=msgpack.packb(0)) for i in range(count)]
    whole = split(items, Codec.MSGPACK, 10**7).chunks
    assert len(whole) == 1
    assert whole[0].payload == msgpack.packb([0] * count)
    assert array_bytes(count, count, Codec.MSGPACK) == len(whole[0].payload)


def test_envelope_is_what_one_command_adds_to_its_payload() -> None:
    """A command of the largest id with a payload of n bytes fits a message of n + envelope bytes."""
    payload = "x" * 1000
    for codec in Codec:
        size = len(encode([delivery_item(command(MAX_ID, payload))], codec))
        assert size <= len(encode(payload, codec)) + envelope_bytes()
    assert envelope_bytes() == len('[{"id":9223372036854775807,"payload":}]')


# -- splitting -----------------------------------------------------------------------------------
@settings(max_examples=300)
@given(listed=outstanding(), codec=st.sampled_from(Codec), limit=st.integers(2, 600))
def test_split_messages_fit_and_carry_everything_in_order(listed: list[Command], codec: Codec, limit: int) -> None:
    """Each message is at most the limit and a valid KP1 array; together, in order, they are the
    list; only commands too large on their own are left out, and they are named."""
    cut = messages(listed, codec, limit)
    assert cut.chunks
    carried = [i for chunk in cut.chunks for i in chunk.command_ids]
    by_id = {c.id: c for c in listed}
    for chunk in cut.chunks:
        assert len(chunk.payload) <= limit
        assert decode(chunk.payload, codec) == [delivery_item(by_id[i]) for i in chunk.command_ids]
    too_large = [c.id for c in listed if array_bytes(1, len(encode(delivery_item(c), codec)), codec) > limit]
    assert list(cut.left_out) == too_large
    assert carried == [c.id for c in listed if c.id not in too_large]


@given(listed=outstanding(), codec=st.sampled_from(Codec), limit=st.integers(2, 600))
def test_each_message_but_the_last_is_full(listed: list[Command], codec: Codec, limit: int) -> None:
    """Greedy: a message is closed only when the next command would not fit in it."""
    cut = messages(listed, codec, limit)
    sizes = {c.id: len(encode(delivery_item(c), codec)) for c in listed}
    for chunk, following in zip(cut.chunks, cut.chunks[1:], strict=False):
        ids = [*chunk.command_ids, following.command_ids[0]]
        assert array_bytes(len(ids), sum(sizes[i] for i in ids), codec) > limit


def test_an_empty_list_is_one_empty_array() -> None:
    """A list with nothing in it is still one message: [] (a retained list emptied, a poll's answer)."""
    for codec in Codec:
        assert messages([], codec, 100).chunks == (delivery.Chunk(command_ids=(), payload=encode([], codec)),)


def test_three_large_commands_are_three_messages() -> None:
    """The issue's case: three 250 KB commands made a 750 KB push; at 300 KB each goes alone."""
    listed = [command(i, "x" * 250_000) for i in (1, 2, 3)]
    cut = messages(listed, Codec.JSON, 300_000)
    assert [chunk.command_ids for chunk in cut.chunks] == [(1,), (2,), (3,)]
    assert all(len(chunk.payload) <= 300_000 for chunk in cut.chunks)


@given(listed=outstanding(), codec=st.sampled_from(Codec), limit=st.integers(2, 600))
def test_a_poll_reply_is_the_first_message_and_encodes_no_further(
    listed: list[Command], codec: Codec, limit: int
) -> None:
    """The oldest commands that fit one message; commands after it are not encoded at all."""
    taken: list[int] = []

    def counted() -> Iterator[Command]:
        for c in listed:
            taken.append(c.id)
            yield c

    first = split(delivery.encode_items(counted(), codec), codec, limit, max_chunks=1)
    whole = messages(listed, codec, limit)
    assert first.chunks == whole.chunks[:1]
    assert first_message(listed, codec, limit).chunks == whole.chunks[:1]
    if len(whole.chunks) > 1:  # it read one command past the first message (the one that did not fit)
        assert len(taken) == listed.index(next(c for c in listed if c.id == whole.chunks[1].command_ids[0])) + 1
