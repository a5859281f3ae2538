"""What one delivery hands a device: the delivery window and push splitting. Pure: no I/O.

A target's outstanding list can be long (by default up to 1000 commands of 256 KiB each). Two rules
bound what a push or a poll carries:

- the **window** (``max_in_flight_per_target``): only the oldest k outstanding commands (lowest
  ids) are handed out; the next ones follow as earlier ones finish, so a device runs them in invoke
  order. None hands out the whole list, as Kaa does;
- the **byte limit** (``max_push_bytes``): a list is split into several KP1 arrays of whole
  commands, in id order, none larger than the limit. A command too large for any message on its own
  is left out (and reported in ``Split.left_out``), never sent truncated or oversized.

Each command's item is encoded once; the size of an array is computed from its items' sizes (JSON:
brackets and commas; MessagePack: the array header), never by encoding the array again.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from broker_bridge.commands import Command, delivery_item
from broker_bridge.protocol import MAX_ID, encode
from broker_bridge.topics import Codec

# EMQX refuses packets over 1 MB by default (max_packet_size); this leaves 64 KiB of it for the
# topic, the MQTT headers and properties. Mosquitto, HiveMQ and VerneMQ accept far more by default.
MAX_PUSH_BYTES = 960 * 1024
MSGPACK_FIXARRAY_MAX = 15  # up to here the array header is one byte; then 3 (array16), then 5 (array32)
MSGPACK_ARRAY16_MAX = 2**16 - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Item:
    """One outstanding command as a device sees it (``{"id", "payload"}``), encoded."""

    command_id: int
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk:
    """One message: a KP1 array of whole commands, and which commands it carries."""

    command_ids: tuple[int, ...]
    payload: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Split:
    """A list cut into messages (at least one: an empty list is one ``[]``), oldest commands first."""

    chunks: tuple[Chunk, ...]
    left_out: tuple[int, ...] = ()  # ids of commands larger than the limit on their own


def window(commands: Sequence[Command], max_in_flight: int | None) -> tuple[Command, ...]:
    """The oldest ``max_in_flight`` commands (lowest ids), in id order; None: all of them, as given."""
    if max_in_flight is None:
        return tuple(commands)
    return tuple(heapq.nsmallest(max_in_flight, commands, key=lambda c: c.id))


def encode_items(commands: Iterable[Command], codec: Codec) -> Iterable[Item]:
    """Each command's item, encoded when it is taken (a poll reply stops at its first message)."""
    return (Item(command_id=c.id, data=encode(delivery_item(c), codec)) for c in commands)


def array_bytes(count: int, items_bytes: int, codec: Codec) -> int:
    """The size of an array of ``count`` encoded items that total ``items_bytes``."""
    if codec is Codec.MSGPACK:
        return len(_msgpack_header(count)) + items_bytes
    return 2 + items_bytes + max(count - 1, 0)  # "[", "]" and the commas between items


def split(items: Iterable[Item], codec: Codec, max_bytes: int, *, max_chunks: int | None = None) -> Split:
    """Cut a list into arrays of at most ``max_bytes``, filling each greedily in order.

    ``max_chunks``: stop once that many are full (the items after them are not taken at all)."""
    chunks: list[Chunk] = []
    current: list[Item] = []
    size = 0
    left_out: list[int] = []
    for item in items:
        if array_bytes(1, len(item.data), codec) > max_bytes:
            left_out.append(item.command_id)
            continue
        if current and array_bytes(len(current) + 1, size + len(item.data), codec) > max_bytes:
            chunks.append(_chunk(current, codec))
            if max_chunks is not None and len(chunks) >= max_chunks:
                return Split(chunks=tuple(chunks), left_out=tuple(left_out))
            current, size = [], 0
        current.append(item)
        size += len(item.data)
    if current or not chunks:
        chunks.append(_chunk(current, codec))
    return Split(chunks=tuple(chunks), left_out=tuple(left_out))


def messages(commands: Sequence[Command], codec: Codec, max_bytes: int) -> Split:
    """A whole list (a push) as messages of at most ``max_bytes``."""
    return split(encode_items(commands, codec), codec, max_bytes)


def first_message(commands: Sequence[Command], codec: Codec, max_bytes: int) -> Split:
    """The oldest commands that fit one message (a poll reply); later ones are not even encoded."""
    return split(encode_items(commands, codec), codec, max_bytes, max_chunks=1)


def envelope_bytes() -> int:
    """What one command adds to its payload in a push array, in the larger of the two codecs:
    ``[{"id":<the largest id>,"payload":...}]``."""
    return max(len(encode([{"id": MAX_ID, "payload": None}], c)) - len(encode(None, c)) for c in Codec)


def _chunk(items: Sequence[Item], codec: Codec) -> Chunk:
    ids = tuple(i.command_id for i in items)
    if codec is Codec.MSGPACK:
        return Chunk(command_ids=ids, payload=_msgpack_header(len(items)) + b"".join(i.data for i in items))
    return Chunk(command_ids=ids, payload=b"[" + b",".join(i.data for i in items) + b"]")


def _msgpack_header(count: int) -> bytes:
    if count <= MSGPACK_FIXARRAY_MAX:
        return bytes([0x90 | count])
    if count <= MSGPACK_ARRAY16_MAX:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")
