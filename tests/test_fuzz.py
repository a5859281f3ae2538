"""Fuzzing a running bridge (embedded broker) with 100k random and malformed publishes.

Every publish goes through an oracle written from topics.md that says what must come back: nothing,
exactly one ``/status`` reply, or exactly one KP1 error on ``/error`` with which status codes. The
big run checks that every promised reply arrives once and nothing else does, that every error body is
``{"statusCode": 4xx, "reasonPhrase": str}``, that the commands stored before the fuzz did not change,
that the bridge logged no failure, and that a normal invoke, push and result still work afterwards.

BROKER_BRIDGE_FUZZ_COUNT sets the number of publishes (default 100000); BROKER_BRIDGE_FUZZ_SEED
replays a run (the seed is printed, and named in every failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker_bridge.commands import to_record
from broker_bridge.store.sqlite import SqliteStore
from broker_bridge.topics import Codec
from tests.conftest import MosquittoProcess, free_port
from tests.harness import WAIT_S, Probe, make_settings, probe, running_service
from tests.raw_mqtt import connect as raw_connect
from tests.raw_mqtt import publish as raw_publish

FUZZ_COUNT = int(os.environ.get("BROKER_BRIDGE_FUZZ_COUNT") or 100_000)
FUZZ_SEED = int(os.environ.get("BROKER_BRIDGE_FUZZ_SEED") or random.SystemRandom().randrange(1, 2**32))
WINDOW = 256  # expected replies outstanding at once; keeps queues short (amqtt drops a PUBACK wait after 5 s)
QOS1_IN_FLIGHT = 256
QUIET_S = 1.0  # after the last expected reply: how long duplicates and strays are watched for
STALL_S = 60.0  # no reply at all for this long while some are due: the bridge stopped answering
MAX_ID = 2**63 - 1
MAX_TTL_S = 30 * 86_400

REAL_TOKENS = ("devA", "devB", "devC")
REAL_TYPES = ("reboot", "zero")
POLL_TOKENS = tuple(f"p{n}" for n in range(24))  # fuzz endpoints without commands
RESULT_TOKENS = tuple(f"r{n}" for n in range(24))
INVOKE_TOKENS = tuple(f"inv{n}" for n in range(12))  # the only fuzz endpoints valid invokes create commands for
FIN_TOKEN = "fin"  # one executed and one cancelled fuzz command: results and cancels get 409
TYPES = ("reboot", "zero", "set-point", "a_b", "T" * 128)
# Topic levels a device or operator might send: valid UTF-8 without + # / or NUL (MQTT forbids those).
ODD_LEVELS = (
    "", " ", "dev 1", "dév", "设备", "🙂", "a.b", ".", "..", "$x", "%u", "%c", "x" * 300, "y" * 3000, "tab\tx",
    "nl\nx", "\r", "\x7f", "\u202e", "\ufeff", "\uffff", "quote\"'", "back\\slash", "status", "error", "json",
    "msgpack", "command", "result", "invoke", "cancel", "0", "-1", "007", "1e3", "٣", "9" * 18, "9" * 19,
    "0" * 19 + "1", "NaN", "null", "T" * 129, "re.boot",
)  # fmt: skip
BAD_ID_LEVELS = ("0", "000", "-5", "1.0", "1e3", "0x10", " 7", "٣", "²", "9" * 19, "1" * 40, "", "id")

# -- the oracle: topics.md, not the code ---------------------------------------------------------
TYPE_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
REPLY_LEVELS = ("status", "error")
FORMATS = ("json", "msgpack")


def topic_codec(topic: str) -> Codec:
    """The codec of a device topic: MessagePack where the level after the command type says so."""
    levels = topic.split("/")
    return Codec.MSGPACK if len(levels) > 6 and levels[6] == "msgpack" else Codec.JSON


def is_request_id(level: str) -> bool:
    """A request ID or command ID level: a positive decimal integer of at most 18 digits."""
    return level.isascii() and level.isdigit() and len(level) <= 18 and int(level) > 0


def app_version_ok(name: str) -> bool:
    return 0 < len(name) <= 256 and not any(ch in name for ch in "+#/\x00")  # topics.md: at most 256


def token_ok(name: str) -> bool:
    return app_version_ok(name) and "." not in name


def type_ok(name: str) -> bool:
    return bool(TYPE_RE.fullmatch(name)) and name not in REPLY_LEVELS


@dataclass(frozen=True, slots=True)
class Body:
    """A request body and what its generator knows about it."""

    data: bytes
    verdict: str  # "ok": valid; "error": refused with one of codes; "any": unknown (random bytes)
    codes: frozenset[int] = frozenset({400})


@dataclass(frozen=True, slots=True)
class Expect:
    """What topics.md promises for one publish."""

    reply: str  # "none", "status", "error", "any" (status or error), "maybe" (a status reply or none)
    codes: frozenset[int] = frozenset()
    codec: Codec = Codec.JSON


NONE = Expect("none")


def refused(codes: frozenset[int] | set[int], codec: Codec = Codec.JSON) -> Expect:
    return Expect("error", frozenset(codes), codec)


def expect(topic: str, body: Body, max_bytes: int) -> Expect:
    """What the bridge must answer to this publish (it subscribes to kp1/+/cex/+/command/#,
    kp1/+/cex/+/result/# and cex/admin/#)."""
    levels = topic.split("/")
    if levels[-1] in REPLY_LEVELS:
        return NONE  # replies, the bridge's own included, are never requests
    if len(levels) >= 5 and levels[0] == "kp1" and levels[2] == "cex" and levels[4] in ("command", "result"):
        return _expect_device(levels, body, max_bytes)
    if levels[:2] == ["cex", "admin"] and len(levels) > 2:
        return _expect_admin(levels[2:], body, max_bytes)
    return NONE


def _expect_device(levels: list[str], body: Body, max_bytes: int) -> Expect:
    if len(levels) == 5:
        return NONE  # kp1/{av}/cex/{token}/command: no command type, no request
    av, token, resource, command_type, tail = levels[1], levels[3], levels[4], levels[5], levels[6:]
    rid = bool(tail) and is_request_id(tail[-1])
    rest = tail[:-1] if rid else tail
    fmt = rest[0] if rest and rest[0] in FORMATS else ""
    rest = rest[1:] if fmt else rest
    if rest or not (app_version_ok(av) and token_ok(token) and type_ok(command_type)):
        # A malformed topic is answered (400) only where its last level is a request ID, in
        # MessagePack if the level after the command type says so (topics.md).
        return refused({400}, topic_codec("/".join(levels))) if is_request_id(levels[-1]) else NONE
    codec = Codec.MSGPACK if fmt == "msgpack" else Codec.JSON
    if resource == "result" and not rid:
        return NONE  # KP1: no response without a request ID
    if len(body.data) > max_bytes:
        return refused({413}, codec) if rid else NONE
    if body.verdict == "error":
        return refused(body.codes, codec) if rid else NONE
    if resource == "result":
        assert body.verdict == "any", "the fuzzer never sends results that apply"
        return refused(body.codes, codec)
    # A poll is answered on <topic>/status, with or without a request ID.
    if body.verdict == "ok":
        return Expect("status", codec=codec)
    return Expect("any", body.codes, codec) if rid else Expect("maybe", codec=codec)


def _expect_admin(rest: list[str], body: Body, max_bytes: int) -> Expect:
    # In .../cancel/{type}/{id} the last number is the command ID: a malformed cancel is answered
    # only when a request ID follows it.
    answerable = is_request_id(rest[-1]) and not (rest[2:3] == ["cancel"] and len(rest) < 6)
    malformed = refused({400}) if answerable else NONE
    if len(rest) < 4 or rest[2] not in ("invoke", "cancel"):
        return malformed
    av, token, action, command_type, *tail = rest
    if action == "cancel":
        if not tail or not is_request_id(tail[0]):
            return malformed
        tail = tail[1:]
    rid = bool(tail) and is_request_id(tail[-1])
    if (tail[:-1] if rid else tail) or not (app_version_ok(av) and token_ok(token) and type_ok(command_type)):
        return malformed
    if not rid:
        return NONE
    if len(body.data) > max_bytes:
        return refused({413})
    if body.verdict == "ok":
        return Expect("status")
    return refused(body.codes) if body.verdict == "error" else Expect("any", body.codes)


# -- bodies --------------------------------------------------------------------------------------
def dump(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def nest(depth: int) -> list[Any]:
    """A list nested ``depth`` levels deep (the outermost list is level 1)."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


JSON_MALFORMED = (
    b"{", b"[", b'"abc', b'{"observe":tr', b"{}x", b"{} {}", b"\xef\xbb\xbf{}", b" ", b"\n\t", b"{,}",
    b'{"x":NaN}', b'{"x":Infinity}', b'{"x":-Infinity}', b'{"x":1e999}', dump({"x": 2**64}),
    dump({"x": -(2**63) - 1}), b'{"x":' + b"9" * 5000 + b"}", b'{"x":"\\ud800"}', b'{"\\udfff":1}',
    b"[" * 100_000, b"[" * 65 + b"]" * 65, dump({"x": nest(64)}), b'{"x":"a\x01b"}', b'{"x":1}\x00',
    b"\xc3\x28", b"{\"x\": '1'}", b"{'observe': true}",
)  # fmt: skip
POLL_OK_JSON = (
    b"", b"{}", b'{"observe":true}', b'{"observe":false}', b'{"observe":null}', b" {\n} ",
    b'{"unknown":[1,{"x":"\\u0000"}],"observe":true}', dump({"deep": nest(63)}), dump({"n": 2**64 - 1}),
)  # fmt: skip
POLL_BAD_JSON = (
    b"[]", b"1", b'"x"', b"null", b"true", b'{"observe":1}', b'{"observe":"true"}', b'{"observe":[true]}',
    b'{"observe":{}}', b'{"observe":true,"observe":5}', b'{"observe":0}',
)  # fmt: skip
RESULT_BAD_JSON = (
    b"[]", b"{}", b"1", b'"x"', b"null", b"true", b"[[]]", b"[1,2]", dump({"id": 1}), dump({"statusCode": 200}),
    dump({"id": "1", "statusCode": 200}), dump({"id": 1.0, "statusCode": 200}), dump({"id": True, "statusCode": 200}),
    dump({"id": 0, "statusCode": 200}), dump({"id": -1, "statusCode": 200}), dump({"id": 2**63, "statusCode": 200}),
    dump({"id": 2**64 - 1, "statusCode": 200}), dump({"id": 1, "statusCode": 99}), dump({"id": 1, "statusCode": 600}),
    dump({"id": 1, "statusCode": -200}), dump({"id": 1, "statusCode": "200"}), dump({"id": 1, "statusCode": 200.0}),
    dump({"id": 1, "statusCode": None}), dump({"id": 1, "statusCode": True}),
    dump({"id": 1, "statusCode": 200, "reasonPhrase": 5}), dump({"id": 1, "statusCode": 200, "reasonPhrase": []}),
    dump({"id": 1, "statusCode": 200, "reasonPhrase": "x" * 1025}),
    dump([{"id": 10**17, "statusCode": 200}, {"id": 2, "statusCode": 20}]),
)  # fmt: skip
INVOKE_BAD_JSON = (
    b"[]", b"1", b'"x"', b"null", b"true", dump({"tll": 5}), dump({"payload": 1, "extra": 2}), dump({"ttl": 0}),
    dump({"ttl": -1}), dump({"ttl": MAX_TTL_S + 1}), dump({"ttl": 1e300}), dump({"ttl": "abc"}), dump({"ttl": []}),
    dump({"ttl": {}}), b'{"ttl":NaN}', b'{"ttl":1e999}', dump({"idempotencyKey": ""}), dump({"idempotencyKey": 5}),
    dump({"idempotencyKey": "k" * 201}), dump({"payload": nest(64)}), dump({"payload": {"x": 2**64}}),
    dump({"Payload": 1}), dump({"payload": 1, "ttl": 60, "observe": True}),
)  # fmt: skip
MSGPACK_MALFORMED = (
    b"\xc1", pack({"a": 1})[:-1], pack({}) + b"\x00", b"{}", pack({"x": b"bin"}), pack({"x": msgpack.ExtType(5, b"x")}),
    pack({"t": msgpack.Timestamp(1, 0)}), pack({1: 2}), pack({"x": float("nan")}), pack({"x": float("-inf")}),
    b"\x81\xa1x" + b"\x91" * 63 + b"\xc0", b"\x91" * 100_000 + b"\xc0", b"\x81\xa1x\xa2\xff\xfe",
    b"\xdd\xff\xff\xff\xff",
    b"\xdb\x7f\xff\xff\xff",
)  # fmt: skip
POLL_OK_MSGPACK = (
    b"", pack({}), pack({"observe": True}), pack({"observe": False}), pack({"observe": None}),
    pack({"x": [1, 2.5, "s", None, 2**64 - 1, -(2**63)]}), b"\x81\xa1x" + b"\x91" * 62 + b"\xc0",
)  # fmt: skip
POLL_BAD_MSGPACK = (pack([]), pack(1), pack("x"), pack(None), pack(True), pack({"observe": 1}), pack({"observe": "1"}))
RESULT_BAD_MSGPACK = (
    pack([]), pack({}), pack(1), pack({"id": "1", "statusCode": 200}), pack({"id": 1.0, "statusCode": 200}),
    pack({"id": 2**64 - 1, "statusCode": 200}), pack({"id": 0, "statusCode": 200}), pack({"id": 1, "statusCode": 600}),
    pack([{"id": 1, "statusCode": 200, "reasonPhrase": b"bin"}]),
)  # fmt: skip
RANDOM_RESULT_CODES = frozenset({400, 404, 409})


def oversize(limit: int, rng: random.Random) -> bytes:
    """A body just over, or far over, the size limit (its content does not matter any more)."""
    return b'{"x":"' + b"a" * (limit + rng.choice((1, 2, 1000, limit // 2))) + b'"}'


def at_limit(limit: int) -> bytes:
    """A valid poll body of exactly the size limit."""
    filler = limit - len(b'{"x":""}')
    return b'{"x":"' + b"a" * filler + b'"}'


# -- the generator ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Case:
    topic: str
    data: bytes
    qos: int
    expect: Expect


@dataclass
class World:
    """Names and commands the generator aims at."""

    real_av: str  # the app version of the commands created before the fuzz, which nothing may change
    fuzz_av: str  # everything the fuzz creates lives here
    real: dict[tuple[str, str], list[dict[str, Any]]]  # (token, type) -> records, per real target
    fin_executed: int
    fin_cancelled: int
    max_bytes: int

    @property
    def real_ids(self) -> list[int]:
        return [record["id"] for records in self.real.values() for record in records]


class Fuzzer:
    """Seeded random cases; each carries what the oracle says must come back."""

    def __init__(self, world: World, seed: int) -> None:
        self.world = world
        self.rng = random.Random(seed)
        self.serial = 0
        self.scenarios = [
            (self.poll, 20),
            (self.result, 18),
            (self.result_for_others, 9),
            (self.real_target, 6),
            (self.odd_device, 12),
            (self.unowned, 3),
            (self.invoke_bad, 10),
            (self.invoke_ok, 1),
            (self.cancel, 5),
            (self.odd_admin, 8),
            (self.msgpack_garbage, 6),
            (self.random_bytes, 2),
        ]

    def cases(self, count: int) -> Iterator[Case]:
        funcs, weights = zip(*self.scenarios, strict=True)
        for _ in range(count):
            topic, body = self.rng.choices(funcs, weights)[0]()
            qos = 1 if self.rng.random() < 0.25 else 0
            yield Case(topic, body.data, qos, expect(topic, body, self.world.max_bytes))

    # -- pieces --
    def rid(self) -> str:
        """A fresh request ID (unique, so its reply topic is too); now and then with leading zeros."""
        self.serial += 1
        value = str(self.serial)
        return value.rjust(18, "0") if self.rng.random() < 0.01 else value

    def tail(self, rid_share: float = 0.9) -> str:
        """A request ID level (mostly), a level that only looks like one, or none."""
        roll = self.rng.random()
        if roll < rid_share:
            return "/" + self.rid()
        return "/" + self.rng.choice(BAD_ID_LEVELS) if roll < rid_share + 0.04 else ""

    def fmt(self) -> str:
        return self.rng.choice(("", "", "/json", "/msgpack", "/msgpack"))

    def kp1(self, av: str, token: str, resource: str, command_type: str, fmt: str = "") -> str:
        return f"kp1/{av}/cex/{token}/{resource}/{command_type}{fmt}"

    def one_of(self, *bodies: tuple[bytes, ...]) -> bytes:
        return self.rng.choice(self.rng.choice(bodies))

    def junk(self, size: int = 64) -> bytes:
        return self.rng.randbytes(self.rng.randrange(1, size))

    def poll_body(self, codec: Codec) -> Body:
        roll, limit = self.rng.random(), self.world.max_bytes
        if roll < 0.003:
            return Body(oversize(limit, self.rng), "error", frozenset({413}))
        if roll < 0.005:
            return Body(at_limit(limit) if codec is Codec.JSON else pack({"x": "a" * (limit - 16)}), "ok")
        if codec is Codec.MSGPACK:
            if roll < 0.35:
                return Body(self.rng.choice(POLL_OK_MSGPACK), "ok")
            if roll < 0.9:
                return Body(self.one_of(MSGPACK_MALFORMED, POLL_BAD_MSGPACK), "error")
            return Body(b"\xc1" + self.junk(), "error")
        if roll < 0.35:
            return Body(self.rng.choice(POLL_OK_JSON), "ok")
        if roll < 0.9:
            return Body(self.one_of(JSON_MALFORMED, POLL_BAD_JSON), "error")
        return Body(b"\xff" + self.junk(), "error")  # never UTF-8

    def result_items(self, ids: list[int]) -> list[dict[str, Any]]:
        rng = self.rng
        return [
            {
                "id": command_id,
                "statusCode": rng.randrange(100, 600),
                "reasonPhrase": rng.choice((None, "OK", "ünïcødé", "x" * 1024)),
                "payload": rng.choice((None, 1, "done", {"pct": 50}, nest(60), "🙂" * 100, [2**64 - 1])),
            }
            for command_id in ids
        ]

    def unknown_id(self) -> int:
        return self.rng.choice((10**17 + self.rng.randrange(10**9), MAX_ID, 10**15 + self.serial))

    def result_body(self, codec: Codec, ids: list[int], code: int) -> Body:
        """Results for ids none of which may apply here: 404 (or 409 for a finished command)."""
        items = self.result_items(ids)
        value: Any = items[0] if len(items) == 1 and self.rng.random() < 0.5 else items
        return Body(pack(value) if codec is Codec.MSGPACK else dump(value), "error", frozenset({code}))

    def bad_result_body(self, codec: Codec) -> Body:
        roll = self.rng.random()
        if roll < 0.003:
            return Body(oversize(self.world.max_bytes, self.rng), "error", frozenset({413}))
        if codec is Codec.MSGPACK:
            return Body(self.one_of(MSGPACK_MALFORMED, RESULT_BAD_MSGPACK), "error")
        return Body(self.one_of(JSON_MALFORMED, RESULT_BAD_JSON), "error")

    # -- scenarios: each returns (topic, body) --
    def poll(self) -> tuple[str, Body]:
        """A poll of a fuzz endpoint without commands."""
        fmt = self.fmt()
        token, command_type = self.rng.choice(POLL_TOKENS), self.rng.choice(TYPES)
        topic = self.kp1(self.world.fuzz_av, token, "command", command_type, fmt) + self.tail()
        body = self.poll_body(Codec.MSGPACK if fmt == "/msgpack" else Codec.JSON)
        if body.verdict == "ok" and self.rng.random() < 0.5:
            return self.kp1(self.world.fuzz_av, token, "command", command_type, fmt), body  # no request ID
        return topic, body

    def result(self) -> tuple[str, Body]:
        """Results from a fuzz endpoint: malformed, or for ids it does not have."""
        fmt = self.fmt()
        codec = Codec.MSGPACK if fmt == "/msgpack" else Codec.JSON
        topic = self.kp1(self.world.fuzz_av, self.rng.choice(RESULT_TOKENS), "result", self.rng.choice(TYPES), fmt)
        if self.rng.random() < 0.55:
            return topic + self.tail(), self.bad_result_body(codec)
        ids = [self.unknown_id() for _ in range(self.rng.randrange(1, 4))]
        return topic + self.tail(), self.result_body(codec, ids, 404)

    def result_for_others(self) -> tuple[str, Body]:
        """Results for the real commands' ids from other tokens, types and app versions (404), and
        for the finished fuzz commands (409)."""
        world, rng = self.world, self.rng
        fmt = self.fmt()
        codec = Codec.MSGPACK if fmt == "/msgpack" else Codec.JSON
        if rng.random() < 0.25:
            command_type, command_id = rng.choice((("reboot", world.fin_executed), ("zero", world.fin_cancelled)))
            ids = [command_id] + ([self.unknown_id()] if rng.random() < 0.3 else [])
            topic = self.kp1(world.fuzz_av, FIN_TOKEN, "result", command_type, fmt) + self.tail(0.97)
            return topic, self.result_body(codec, ids, 409)
        (token, command_type), records = rng.choice(list(world.real.items()))
        ids = [rng.choice(records)["id"] for _ in range(rng.randrange(1, 3))]
        av, other_token, other_type = world.real_av, token, command_type
        match rng.randrange(4):
            case 0:
                av = world.fuzz_av
            case 1:
                other_token = rng.choice([t for t in REAL_TOKENS if t != token] + ["devX", "DEVA", "devA "])
            case 2:
                other_type = rng.choice([t for t in REAL_TYPES if t != command_type] + ["Reboot", "reboot2"])
            case _:
                av = rng.choice((world.real_av + "x", world.real_av.upper(), " " + world.real_av))
        topic = self.kp1(av, other_token, "result", other_type, fmt) + self.tail(0.97)
        return topic, self.result_body(codec, ids, 404)

    def real_target(self) -> tuple[str, Body]:
        """The real commands' own topics: malformed bodies only, and polls that must list them."""
        world, rng = self.world, self.rng
        (token, command_type), _ = rng.choice(list(world.real.items()))
        fmt = self.fmt()
        codec = Codec.MSGPACK if fmt == "/msgpack" else Codec.JSON
        if rng.random() < 0.5:
            topic = self.kp1(world.real_av, token, "result", command_type, fmt) + self.tail(0.97)
            return topic, self.bad_result_body(codec)
        topic = self.kp1(world.real_av, token, "command", command_type, fmt)
        body = self.poll_body(codec)
        if body.verdict != "ok":
            return topic + self.tail(0.97), body
        # Only polls that change nothing, and with a request ID: a plain poll's reply shares the push topic.
        data = rng.choice((b"", b"{}", b'{"observe":true}')) if codec is Codec.JSON else pack({})
        return f"{topic}/{self.rid()}", Body(data, "ok")

    def odd_device(self) -> tuple[str, Body]:
        """Device topics with odd levels anywhere; the oracle decides whether they are well formed."""
        rng, world = self.rng, self.world
        av = rng.choice((world.fuzz_av, rng.choice(ODD_LEVELS)))
        token = rng.choice((rng.choice(POLL_TOKENS + RESULT_TOKENS), rng.choice(ODD_LEVELS)))
        command_type = rng.choice((rng.choice(TYPES), rng.choice(ODD_LEVELS)))
        resource = rng.choice(("command", "result"))
        extra = "".join("/" + rng.choice(ODD_LEVELS + FORMATS) for _ in range(rng.choice((0, 0, 1, 2, 3))))
        topic = f"kp1/{av}/cex/{token}/{resource}/{command_type}{extra}" + self.tail(0.8)
        codec = topic_codec(topic)
        if resource == "result":
            if rng.random() < 0.5:
                return topic, self.result_body(codec, [self.unknown_id(), rng.choice(world.real_ids)], 404)
            return topic, self.bad_result_body(codec)
        body = self.poll_body(codec)
        if body.verdict == "ok" and not is_request_id(topic.rsplit("/", 1)[-1]):
            body = Body(self.one_of(JSON_MALFORMED), "error")  # keep replies to one topic per publish
        return topic, body

    def unowned(self) -> tuple[str, Body]:
        """Topics the bridge does not own, or replies it must ignore (its own included)."""
        av, rid = self.world.fuzz_av, self.rid()  # token "echo": nobody polls it, so no reply shares these topics
        topic = self.rng.choice(
            (
                f"kp1/{av}/dcx/p1/json/{rid}",
                f"kp1/{av}/cex/p1/commands/reboot/{rid}",
                f"kp1/{av}/cex/p1/Command/reboot/{rid}",
                f"kp1/{av}/cex/p1/command",
                f"kp1/{av}/cex/echo/command/reboot/{rid}/status",
                f"kp1/{av}/cex/echo/result/reboot/{rid}/error",
                f"kp1/{av}/cex/echo/command/reboot/status",
                f"kp1/{av}/cex/echo/command/reboot/msgpack/status",
                f"kp1/{av}/cex/p1",
                f"kp1/{av}",
                f"KP1/{av}/cex/p1/command/reboot/{rid}",
                f"cex/events/{av}/p1/reboot/{rid}",
                f"cex/admin/{av}/echo/invoke/reboot/{rid}/status",
                f"cex/admin/{av}/echo/invoke/reboot/{rid}/error",
                "cex/admin",
                f"cex/Admin/{av}/p1/invoke/reboot/{rid}",
                f"/kp1/{av}/cex/p1/command/reboot/{rid}",
            )
        )
        return topic, Body(self.rng.choice((b"{}", b"", self.junk())), "any")

    def invoke_bad(self) -> tuple[str, Body]:
        """Admin invokes with bodies that must be refused, on fuzz endpoints."""
        token, command_type = self.rng.choice(POLL_TOKENS + RESULT_TOKENS), self.rng.choice(TYPES)
        topic = f"cex/admin/{self.world.fuzz_av}/{token}/invoke/{command_type}" + self.tail()
        if self.rng.random() < 0.01:
            return topic, Body(oversize(self.world.max_bytes, self.rng), "error", frozenset({413}))
        data = self.one_of(JSON_MALFORMED, INVOKE_BAD_JSON) if self.rng.random() < 0.95 else b"\xff" + self.junk()
        return topic, Body(data, "error")

    def invoke_ok(self) -> tuple[str, Body]:
        """A valid invoke: creates a command on one of the fuzz's invoke endpoints."""
        token, command_type = self.rng.choice(INVOKE_TOKENS), self.rng.choice(TYPES)
        body = self.rng.choice(
            (
                b"",
                b"{}",
                dump({"payload": {"n": self.serial}}),
                dump({"payload": "🙂", "ttl": 3600}),
                dump({"payload": None, "ttl": MAX_TTL_S}),
                dump({"payload": {"deep": nest(62)}}),
                dump({"payload": [2**64 - 1, -(2**63), 1.5, "\u0000"], "ttl": 0.001 + 3600}),
                # A retry's key: the same key always comes with the same type and payload (another
                # type or payload under a used key is a 409, tested in test_api).
                dump({"payload": 1, "ttl": None, "idempotencyKey": f"k-{command_type}-{self.serial % 50}"}),
            )
        )
        return f"cex/admin/{self.world.fuzz_av}/{token}/invoke/{command_type}/{self.rid()}", Body(body, "ok")

    def cancel(self) -> tuple[str, Body]:
        """Cancels that must be refused: real ids from the wrong target (404), unknown ids (404) and
        the finished fuzz commands (409)."""
        world, rng = self.world, self.rng
        body = Body(rng.choice((b"", b"", b"{}", self.junk())), "error", frozenset({404}))
        roll = rng.random()
        if roll < 0.25:
            command_type, command_id = rng.choice((("reboot", world.fin_executed), ("zero", world.fin_cancelled)))
            target = f"{world.fuzz_av}/{FIN_TOKEN}/cancel/{command_type}/{command_id}"
            body = Body(body.data, "error", frozenset({409}))
        elif roll < 0.75:
            (token, command_type), records = rng.choice(list(world.real.items()))
            command_id = rng.choice(records)["id"]
            av, token, command_type = rng.choice(
                (
                    (world.fuzz_av, token, command_type),
                    (world.real_av, rng.choice([t for t in REAL_TOKENS if t != token]), command_type),
                    (world.real_av, token, rng.choice([t for t in REAL_TYPES if t != command_type])),
                )
            )
            target = f"{av}/{token}/cancel/{command_type}/{command_id}"
        else:
            target = f"{world.fuzz_av}/{rng.choice(POLL_TOKENS)}/cancel/{rng.choice(TYPES)}/{self.unknown_id()}"
        if rng.random() < 0.01:
            body = Body(oversize(world.max_bytes, rng), "error", frozenset({413}))
        return f"cex/admin/{target}" + self.tail(0.95), body

    def odd_admin(self) -> tuple[str, Body]:
        """Admin topics with odd, missing or extra levels; never one that could change a command."""
        rng, world = self.rng, self.world
        pool = (
            world.fuzz_av, rng.choice(POLL_TOKENS), "invoke", "cancel", "delete", "INVOKE", rng.choice(TYPES),
            rng.choice(BAD_ID_LEVELS), str(self.unknown_id()), rng.choice(ODD_LEVELS), rng.choice(ODD_LEVELS),
        )  # fmt: skip
        levels = [rng.choice(pool) for _ in range(rng.randrange(1, 7))]
        if len(levels) >= 3 and rng.random() < 0.6:
            levels[2] = rng.choice(("invoke", "cancel"))
        topic = "cex/admin/" + "/".join(levels) + self.tail(0.85)
        if levels[2:3] == ["cancel"]:  # a well-formed one names no existing command of its target
            return topic, Body(rng.choice((b"", self.junk())), "error", frozenset({404}))
        return topic, Body(self.one_of(JSON_MALFORMED, INVOKE_BAD_JSON), "error")

    def msgpack_garbage(self) -> tuple[str, Body]:
        """MessagePack garbage on /msgpack topics."""
        rng, world = self.rng, self.world
        resource = rng.choice(("command", "result"))
        tokens = POLL_TOKENS if resource == "command" else RESULT_TOKENS
        topic = self.kp1(world.fuzz_av, rng.choice(tokens), resource, rng.choice(TYPES), "/msgpack") + self.tail(0.95)
        data = rng.choice((b"\xc1" + self.junk(), rng.choice(MSGPACK_MALFORMED)))
        return topic, Body(data, "error")

    def random_bytes(self) -> tuple[str, Body]:
        """Bytes nobody chose, on well-formed topics: any answer but a 5xx, and exactly one."""
        rng, world = self.rng, self.world
        resource = rng.choice(("command", "result"))
        tokens = POLL_TOKENS if resource == "command" else RESULT_TOKENS
        fmt = rng.choice(("", "/msgpack"))
        topic = self.kp1(world.fuzz_av, rng.choice(tokens), resource, rng.choice(TYPES), fmt) + "/" + self.rid()
        alphabet = rng.choice((None, b'{}[]":,0123456789.eE+-truefalsn \\u'))
        size = rng.randrange(0, 80)
        data = rng.randbytes(size) if alphabet is None else bytes(rng.choice(alphabet) for _ in range(size))
        codes = frozenset({400}) if resource == "command" else RANDOM_RESULT_CODES
        return topic, Body(data, "any", codes)


# -- what comes back -----------------------------------------------------------------------------
@dataclass
class Slot:
    """The replies one request topic may get."""

    codec: Codec
    kinds: set[str]
    codes: set[int]
    lo: int = 0
    hi: int = 0
    got: int = 0


def decode(payload: bytes, codec: Codec) -> Any:
    if codec is Codec.MSGPACK:
        return msgpack.unpackb(payload, raw=False)
    return json.loads(payload)


def decode_error(payload: bytes, codec: Codec) -> Any:
    """An error body in the codec the request's topic names."""
    with contextlib.suppress(ValueError, TypeError, msgpack.UnpackException):
        return decode(payload, codec)
    return None


@dataclass
class Ledger:
    """Every promised reply, and every message that arrived."""

    world: World
    seed: int
    slots: dict[str, Slot] = field(default_factory=dict)
    push_topics: set[str] = field(default_factory=set)
    echoes: Counter[tuple[str, bytes]] = field(default_factory=Counter)  # our reply-like publishes
    sent: Counter[str] = field(default_factory=Counter)
    errors: Counter[int] = field(default_factory=Counter)
    status_replies: int = 0
    pushes: int = 0
    echoed: int = 0
    outstanding: int = 0
    problems: list[str] = field(default_factory=list)
    progress: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        targets = [(self.world.real_av, token, command_type) for token, command_type in self.world.real]
        targets += [(self.world.fuzz_av, token, t) for token in INVOKE_TOKENS for t in TYPES]
        for av, token, command_type in targets:
            for fmt in ("", "/json", "/msgpack"):
                self.push_topics.add(f"kp1/{av}/cex/{token}/command/{command_type}{fmt}/status")

    def problem(self, text: str) -> None:
        """Keep the first 50 (each is enough to reproduce with the seed)."""
        if len(self.problems) < 50:
            self.problems.append(text[:500])
        elif len(self.problems) == 50:
            self.problems.append("... and more")

    def register(self, topic: str, expected: Expect, data: bytes) -> None:
        self.sent[expected.reply] += 1
        if topic.rsplit("/", 1)[-1] in REPLY_LEVELS:
            # Our own subscription hands it back. Known by topic and payload: it may sit on the reply
            # topic of a request we also sent, and must not count as that request's reply.
            self.echoes[topic, data] += 1
        if expected.reply == "none":
            return
        kinds = {"status": {"status"}, "maybe": {"status"}, "error": {"error"}, "any": {"status", "error"}}
        slot = self.slots.setdefault(topic, Slot(expected.codec, set(), set()))
        slot.kinds |= kinds[expected.reply]
        slot.codes |= expected.codes
        slot.hi += 1
        if expected.reply != "maybe":
            slot.lo += 1
            # ``outstanding`` is the sum over slots of replies due but not yet received. A slot can be
            # ahead: a "maybe" request on the same topic may already have been answered, and that
            # reply counts for this one (replies on one topic cannot be told apart).
            if slot.got < slot.lo:
                self.outstanding += 1

    def receive(self, topic: str, payload: bytes) -> None:
        request, _, kind = topic.rpartition("/")
        slot = self.slots.get(request)
        if self.echoes[topic, payload] > 0:
            # (A real reply identical to a pending echo is taken for it, and that echo for the reply.)
            self.echoes[topic, payload] -= 1
            self.echoed += 1
        elif slot is not None and kind in slot.kinds:
            slot.got += 1
            if slot.got <= slot.lo:
                self.outstanding -= 1
                self.progress.set()
            if slot.got > slot.hi:
                self.problem(f"reply number {slot.got} (at most {slot.hi} due) on {topic!r}: {payload[:200]!r}")
            self.check(request, kind, payload, slot)
        elif topic in self.push_topics:
            self.pushes += 1
            codec = Codec.MSGPACK if topic.endswith("/msgpack/status") else Codec.JSON
            try:
                self.check_list(request, decode(payload, codec))
            except (ValueError, TypeError, msgpack.UnpackException):
                self.problem(f"undecodable push on {topic!r}: {payload[:200]!r}")
        else:
            self.problem(f"unexpected message on {topic!r}: {payload[:200]!r}")

    def check(self, request: str, kind: str, payload: bytes, slot: Slot) -> None:
        if kind == "error":
            body = decode_error(payload, slot.codec)
            code = body.get("statusCode") if isinstance(body, dict) else None
            well_formed = (
                isinstance(body, dict)
                and set(body) == {"statusCode", "reasonPhrase"}
                and type(code) is int
                and 400 <= code <= 499
                and isinstance(body["reasonPhrase"], str)
                and body["reasonPhrase"] != ""
            )
            if not well_formed:
                self.problem(f"not a KP1 4xx error body on {request!r}/error: {payload[:300]!r}")
            elif code not in slot.codes:
                self.problem(f"{request!r}: error {code} ({body['reasonPhrase']!r}), expected one of {slot.codes}")
            if isinstance(code, int):
                self.errors[code] += 1
            return
        self.status_replies += 1
        try:
            body = decode(payload, slot.codec)
        except (ValueError, TypeError, msgpack.UnpackException):
            self.problem(f"undecodable status reply on {request!r}: {payload[:200]!r}")
            return
        if request.startswith("cex/admin/"):
            levels = request.split("/")
            record_target = [body.get(k) for k in ("appVersion", "endpointToken")] if isinstance(body, dict) else []
            if record_target != levels[2:4] or body.get("state") != "pending":
                self.problem(f"invoke reply on {request!r} is not the new pending command: {payload[:300]!r}")
        else:
            self.check_list(request, body)

    def check_list(self, request: str, body: Any) -> None:
        """A poll reply or push: the outstanding commands of its target ([] for fuzz targets without)."""
        levels = request.split("/")
        av, token, command_type = levels[1], levels[3], levels[5]
        if not isinstance(body, list) or not all(isinstance(i, dict) and set(i) == {"id", "payload"} for i in body):
            self.problem(f"not a command list on {request!r}: {body!r:.300}")
        elif av == self.world.real_av and (token, command_type) in self.world.real:
            want = [{"id": r["id"], "payload": r["payload"]} for r in self.world.real[token, command_type]]
            if sorted(body, key=lambda item: item["id"]) != want:
                self.problem(f"{request!r} lists {body!r:.300}, not the real commands {want!r:.300}")
        elif body and token not in INVOKE_TOKENS:
            self.problem(f"{request!r} lists commands nobody created: {body!r:.300}")

    async def wait_below(self, limit: int, stall_s: float = STALL_S) -> None:
        """Until at most ``limit`` expected replies are outstanding; fails after stall_s without any."""
        while self.outstanding > limit:
            self.progress.clear()
            try:
                await asyncio.wait_for(self.progress.wait(), stall_s)
            except TimeoutError:
                raise AssertionError(
                    f"seed {self.seed}: no reply for {stall_s:g} s; {self.summary()}; missing: {self.missing()}"
                ) from None

    async def wait_for(self, topics: list[str]) -> None:
        """Until every reply due to these topics arrived (bounded by WAIT_S)."""
        async with asyncio.timeout(WAIT_S):
            while any(self.slots[t].got < self.slots[t].lo for t in topics if t in self.slots):
                self.progress.clear()
                await self.progress.wait()

    def missing(self) -> list[str]:
        short = [(topic, slot) for topic, slot in self.slots.items() if slot.got < slot.lo]
        return [f"{topic!r}: {slot.got} replies, {slot.lo} due" for topic, slot in short[:50]]

    def summary(self) -> str:
        expected = self.sent["status"] + self.sent["error"] + self.sent["any"]
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(self.errors.items()))
        return (
            f"{sum(self.sent.values())} sent ({expected} with exactly one reply due, {self.sent['maybe']} with at"
            f" most one, {self.sent['none']} with none); {self.status_replies + sum(self.errors.values())} replies"
            f" received ({self.status_replies} /status, {sum(self.errors.values())} /error: {codes}); "
            f"{self.pushes} pushes, {self.echoed} echoes of our own reply-like publishes; "
            f"{self.outstanding} replies outstanding"
        )


def reply_filters(device_depth: int = 5, admin_depth: int = 7) -> list[str]:
    """Subscriptions that see every reply the fuzz can cause (but not the requests themselves)."""
    filters = [
        f"kp1/+/cex/+/{resource}/" + "+/" * depth + end
        for resource in ("command", "result")
        for depth in range(1, device_depth + 1)
        for end in REPLY_LEVELS
    ]
    filters += ["cex/admin/" + "+/" * depth + end for depth in range(1, admin_depth + 1) for end in REPLY_LEVELS]
    return filters


# -- clients that break the rules ------------------------------------------------------------------
async def misbehave(port: int, av: str) -> Counter[str]:
    """Throwaway connections that send what MQTT forbids; returns how the broker took each."""
    base = f"kp1/{av}/cex/p1/command"
    sends = {
        "plus in topic": [
            raw_publish(f"{base}/re+boot/1".encode(), b"{}"),
            raw_publish(f"{base}/reboot".encode(), b"{}"),
        ],
        "hash in topic": [raw_publish(f"{base}/#".encode(), b"{}")],
        "NUL in topic": [raw_publish(f"kp1/{av}/cex/p\x001/command/reboot".encode(), b"{}")],
        "invalid UTF-8 topic": [raw_publish(f"{base}/reboot/".encode() + b"\xff\xfe", b"{}")],
        "empty topic": [raw_publish(b"", b"{}")],
        "$ topic": [raw_publish(b"$SYS/broker", b"{}")],
        "publish before connect": [raw_publish(f"{base}/reboot".encode(), b"{}")],
        "garbage": [b"\xff" * 64],
        "truncated publish": [raw_publish(f"{base}/reboot".encode(), b"{}" * 100)[:40]],
        "huge remaining length": [b"\x30\xff\xff\xff\x7f" + b"x" * 100],
    }
    outcomes: Counter[str] = Counter()
    for serial, (name, packets) in enumerate(sends.items()):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            if name not in ("publish before connect", "garbage"):
                writer.write(raw_connect(f"misbehaving-{serial}"))
            for data in packets:
                writer.write(data)
            await writer.drain()
            try:
                while await asyncio.wait_for(reader.read(65536), 1.0):
                    pass
                outcomes[f"{name}: closed by the broker"] += 1
            except TimeoutError:
                outcomes[f"{name}: left open"] += 1
        except ConnectionError:
            outcomes[f"{name}: reset by the broker"] += 1
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    return outcomes


# -- the run -------------------------------------------------------------------------------------
class LogRecorder:
    """Stands in for broker_bridge's structlog loggers: counts events, keeps warnings and errors."""

    NOTICES = frozenset({"api_key_generated"})  # warnings that report no failure

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self.events: Counter[str] = Counter()
        self.alarms: list[str] = []

    def stdlib_errors(self) -> list[str]:
        """Errors logged through the standard library (the embedded broker's plugin logs there)."""
        records = self.caplog.records
        return [r.getMessage() for r in records if r.name.startswith("broker_bridge") and r.levelno >= logging.ERROR]

    def _log(self, level: str, event: str, *args: Any, **kw: Any) -> None:
        self.events[event] += 1
        if level in ("warning", "error", "exception", "critical") and event not in self.NOTICES:
            exc = sys.exc_info()[1] if level == "exception" else None
            self.alarms.append(f"{level} {event} {kw!r:.300} {exc!r}")

    def debug(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("debug", event, *args, **kw)

    def info(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("info", event, *args, **kw)

    def warning(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("warning", event, *args, **kw)

    def error(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("error", event, *args, **kw)

    def exception(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("exception", event, *args, **kw)

    def critical(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("critical", event, *args, **kw)

    def bind(self, **kw: Any) -> LogRecorder:
        return self


@pytest.fixture
def bridge_logs(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> LogRecorder:
    """broker_bridge's structlog loggers, recorded instead of printed (100k refusals would be 100k lines)."""
    recorder = LogRecorder(caplog)
    proxy_type = type(structlog.get_logger())
    for name, module in list(sys.modules.items()):
        if name.startswith("broker_bridge"):
            for attr, value in list(vars(module).items()):
                if isinstance(value, proxy_type):
                    monkeypatch.setattr(module, attr, recorder)
    # aiomqtt warns on every publish while more than 10 await their PUBACK: normal under load.
    caplog.set_level(logging.ERROR, logger="mqtt")
    return recorder


async def invoke(admin: Probe, av: str, token: str, command_type: str, rid: int, payload: Any) -> dict[str, Any]:
    reply = await admin.request(f"cex/admin/{av}/{token}/invoke/{command_type}/{rid}", {"payload": payload})
    assert reply.topic.endswith("/status"), reply.payload
    record: dict[str, Any] = reply.json()
    return record


async def build_world(port: int, real_av: str, fuzz_av: str, max_bytes: int) -> World:
    """The commands the fuzz must not change: two per real target, and two finished fuzz commands."""
    real: dict[tuple[str, str], list[dict[str, Any]]] = {}
    async with probe(port) as admin, probe(port) as device:
        rid = 0
        for token in REAL_TOKENS:
            for command_type in REAL_TYPES:
                for n in range(2):
                    rid += 1
                    payload = {"n": n, "for": f"{token}/{command_type}", "ü": [1, 2.5, None]}
                    real.setdefault((token, command_type), []).append(
                        await invoke(admin, real_av, token, command_type, rid, payload)
                    )
        executed = await invoke(admin, fuzz_av, FIN_TOKEN, "reboot", 100, "x")
        result = {"id": executed["id"], "statusCode": 200}
        done = await device.request(f"kp1/{fuzz_av}/cex/{FIN_TOKEN}/result/reboot/1", result)
        assert done.topic.endswith("/status")
        cancelled = await invoke(admin, fuzz_av, FIN_TOKEN, "zero", 101, "y")
        reply = await admin.request(f"cex/admin/{fuzz_av}/{FIN_TOKEN}/cancel/zero/{cancelled['id']}/102", b"")
        assert reply.json()["state"] == "cancelled"
    return World(real_av, fuzz_av, real, executed["id"], cancelled["id"], max_bytes)


# When a command was handed to a device and proven received is no change of the command: the
# world's devices and the fuzzer's own well-formed polls hand them out while the fuzz runs.
DELIVERY_FIELDS = ("sentAt", "deliveredAt")


def without_delivery(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in DELIVERY_FIELDS}


async def stored_records(db: Path, ids: list[int]) -> dict[int, dict[str, Any]]:
    """The stored records, without their delivery times (``DELIVERY_FIELDS``)."""
    records: dict[int, dict[str, Any]] = {}
    async with SqliteStore(db) as store:
        for command_id in ids:
            command = await store.get(command_id)
            assert command is not None, command_id
            records[command_id] = without_delivery(to_record(command))
    return records


async def publish_all(client: aiomqtt.Client, cases: Iterator[Case], ledger: Ledger) -> None:
    """Publish at full speed, never more than WINDOW expected replies outstanding."""
    acknowledged: list[asyncio.Task[None]] = []
    in_flight = asyncio.Semaphore(QOS1_IN_FLIGHT)

    async def publish_qos1(case: Case) -> None:
        try:
            await client.publish(case.topic, case.data, qos=1)
        finally:
            in_flight.release()

    for case in cases:
        ledger.register(case.topic, case.expect, case.data)
        if case.qos:
            await in_flight.acquire()
            acknowledged.append(asyncio.create_task(publish_qos1(case)))
        else:
            await client.publish(case.topic, case.data, qos=0)
        await asyncio.sleep(0)
        await ledger.wait_below(WINDOW)
    await asyncio.gather(*acknowledged)


async def pump(client: aiomqtt.Client, ledger: Ledger) -> None:
    """Hand every message to the ledger; a bug in the checks is reported, not lost with this task."""
    async for message in client.messages:
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload or "").encode()
        try:
            ledger.receive(message.topic.value, payload)
        except Exception as exc:
            ledger.problem(f"checking {message.topic.value!r} failed: {exc!r}")


async def round_trip(port: int, av: str) -> None:
    """An operator invokes, the device gets the push, reports, and the command is executed."""
    push_topic = f"kp1/{av}/cex/devA/command/reboot/status"
    async with probe(port, push_topic) as device, probe(port) as admin:
        # Pushes go to the format of the last poll, and the fuzz polled in every format: poll like a
        # device that connects.
        await device.request(f"kp1/{av}/cex/devA/command/reboot/899", {"observe": True})
        record = await invoke(admin, av, "devA", "reboot", 900, {"after": "fuzz"})
        push = await device.wait_for(lambda s: s.topic == push_topic and record["id"] in [c["id"] for c in s.json()])
        assert {"id": record["id"], "payload": {"after": "fuzz"}} in push.json()
        result = {"id": record["id"], "statusCode": 200, "reasonPhrase": "OK"}
        reply = await device.request(f"kp1/{av}/cex/devA/result/reboot/901", [result])
        assert reply.json() == {"statusCode": 200, "reasonPhrase": "OK"}
        polled = await device.request(f"kp1/{av}/cex/devA/command/reboot/902", {})
        assert record["id"] not in [c["id"] for c in polled.json()]


@pytest.mark.slow
@pytest.mark.timeout(max(300, FUZZ_COUNT // 100))
async def test_fuzz_bridge_survives_and_answers_by_contract(
    tmp_path: Path, app_version: str, bridge_logs: LogRecorder, capsys: pytest.CaptureFixture[str]
) -> None:
    """100k random and malformed publishes: exact replies, KP1 error bodies, no stored command changed."""
    port = free_port()
    settings = make_settings(tmp_path, port)
    fuzz_av = f"{app_version}-fuzz"
    async with running_service(settings):
        world = await build_world(port, app_version, fuzz_av, settings.max_payload_bytes)
        ids = [*world.real_ids, world.fin_executed, world.fin_cancelled]
        before = await stored_records(settings.db_path, ids)
        assert all(before[r["id"]] == without_delivery(r) for records in world.real.values() for r in records)
        ledger = Ledger(world, FUZZ_SEED)
        client = aiomqtt.Client("127.0.0.1", port, identifier=f"fuzzer-{port}", max_inflight_messages=1000)
        async with client:
            for topic_filter in reply_filters():
                await client.subscribe(topic_filter, qos=1)
            receiver = asyncio.create_task(pump(client, ledger))
            alarms_before = len(bridge_logs.alarms)
            started = time.monotonic()
            misbehaving = asyncio.create_task(misbehave(port, fuzz_av))
            await publish_all(client, Fuzzer(world, FUZZ_SEED).cases(FUZZ_COUNT), ledger)
            broker_said = await misbehaving
            await ledger.wait_below(0, stall_s=2 * WAIT_S)
            duration = time.monotonic() - started
            await asyncio.sleep(QUIET_S)
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
        with capsys.disabled():
            print(f"\nfuzz (seed {FUZZ_SEED}): {ledger.summary()}; {duration:.1f} s, {FUZZ_COUNT / duration:.0f}/s")
            print(f"fuzz: misbehaving clients: {dict(sorted(broker_said.items()))}")
            print(f"fuzz: bridge log events: {dict(bridge_logs.events.most_common(8))}")
        assert ledger.problems == [], f"seed {FUZZ_SEED}: {ledger.summary()}"
        assert ledger.missing() == []
        assert bridge_logs.alarms[alarms_before:] == []
        assert bridge_logs.stdlib_errors() == []
        await round_trip(port, app_version)
        assert await stored_records(settings.db_path, ids) == before


# -- a smaller, shrinking fuzz: hypothesis draws the topics and bodies ---------------------------------
LEVEL = st.one_of(
    st.sampled_from(ODD_LEVELS + TYPES + POLL_TOKENS[:3] + FORMATS + BAD_ID_LEVELS),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="+#/\x00"), max_size=12),
)
NOT_FOUND = frozenset({404})
BODIES = {  # (resource, codec) -> labelled bodies
    ("command", Codec.JSON): [Body(b, "ok") for b in POLL_OK_JSON]
    + [Body(b, "error") for b in JSON_MALFORMED + POLL_BAD_JSON],
    ("result", Codec.JSON): [Body(b, "error") for b in JSON_MALFORMED + POLL_BAD_JSON + RESULT_BAD_JSON]
    + [Body(dump([{"id": 10**17, "statusCode": 200}]), "error", NOT_FOUND)],
    ("command", Codec.MSGPACK): [Body(b, "ok") for b in POLL_OK_MSGPACK]
    + [Body(b, "error") for b in MSGPACK_MALFORMED + POLL_BAD_MSGPACK],
    ("result", Codec.MSGPACK): [Body(b, "error") for b in MSGPACK_MALFORMED + POLL_BAD_MSGPACK + RESULT_BAD_MSGPACK]
    + [Body(pack({"id": MAX_ID, "statusCode": 500}), "error", NOT_FOUND)],
}


@dataclass
class Drawn:
    """One drawn request, before its unique request ID is appended."""

    levels: list[str]
    rid: str  # "unique", "none" or a level that is no request ID
    body: Body


@st.composite
def device_requests(draw: st.DrawFn) -> Drawn:
    """kp1/{av}/cex/{token}/{resource}/{type}[/extra...], valid names mixed with odd ones."""
    av = draw(st.one_of(st.just("FUZZ"), LEVEL))
    token = draw(st.one_of(st.sampled_from(POLL_TOKENS[:4]), LEVEL))
    command_type = draw(st.one_of(st.sampled_from(TYPES), LEVEL))
    resource = draw(st.sampled_from(("command", "result")))
    extra = draw(st.lists(st.one_of(st.sampled_from(FORMATS), LEVEL), max_size=2))
    levels = ["kp1", av, "cex", token, resource, command_type, *extra]
    rid = draw(st.sampled_from(("unique", "unique", "unique", "none", *BAD_ID_LEVELS[:4])))
    codec = Codec.MSGPACK if extra[:1] == ["msgpack"] else Codec.JSON
    return Drawn(levels, rid, draw(st.sampled_from(BODIES[resource, codec])))


@st.composite
def admin_requests(draw: st.DrawFn) -> Drawn:
    """cex/admin/{av}/{token}/{action}/{type}[/{id}][/extra], or any levels; bodies that are refused,
    so nothing is ever created."""
    if draw(st.booleans()):
        action = draw(st.sampled_from(("invoke", "cancel", "cancel", "")))
        action = action or draw(LEVEL)
        rest = [
            draw(st.one_of(st.just("FUZZ"), LEVEL)),
            draw(st.one_of(st.sampled_from(POLL_TOKENS[:4]), LEVEL)),
            action,
            draw(st.one_of(st.sampled_from(TYPES), LEVEL)),
            *([draw(st.one_of(st.just(str(10**17)), LEVEL))] if action == "cancel" else []),
            *draw(st.lists(LEVEL, max_size=1)),
        ]
    else:
        rest = draw(st.lists(st.one_of(st.sampled_from(("FUZZ", "invoke", "cancel")), LEVEL), max_size=6))
    rid = draw(st.sampled_from(("unique", "unique", "none", "none", *BAD_ID_LEVELS[:4])))
    if rest[2:3] == ["cancel"]:  # no command exists, so a well-formed cancel finds none
        return Drawn(["cex", "admin", *rest], rid, Body(b"", "error", NOT_FOUND))
    return Drawn(["cex", "admin", *rest], rid, Body(draw(st.sampled_from(JSON_MALFORMED + INVOKE_BAD_JSON)), "error"))


@dataclass
class Live:
    """A running service and a subscribed client, shared by the examples of one hypothesis test."""

    client: aiomqtt.Client
    ledger: Ledger
    av: str
    logs: LogRecorder
    serial: int = 10**9  # request IDs no drawn level is likely to repeat


@pytest.fixture
async def live(tmp_path: Path, app_version: str, bridge_logs: LogRecorder) -> AsyncIterator[Live]:
    """The service (embedded broker) with a client subscribed to every reply."""
    port = free_port()
    settings = make_settings(tmp_path, port)
    world = World(app_version, app_version, {}, 0, 0, settings.max_payload_bytes)
    async with running_service(settings), aiomqtt.Client("127.0.0.1", port) as client:
        for topic_filter in reply_filters():
            await client.subscribe(topic_filter, qos=1)
        ledger = Ledger(world, 0)
        receiver = asyncio.create_task(pump(client, ledger))
        yield Live(client, ledger, app_version, bridge_logs)
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)


# Hypothesis warns when it prints a failing example of 256 KiB bodies; the warning is no failure.
@pytest.mark.filterwarnings("ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(st.one_of(device_requests(), admin_requests()), min_size=1, max_size=8))
async def test_hypothesis_requests_get_the_promised_replies(live: Live, requests: list[Drawn]) -> None:
    """Drawn topic levels and bodies each get exactly the reply topics.md promises (shrinks on failure)."""
    ledger, topics = live.ledger, []
    problems, alarms = len(ledger.problems), len(live.logs.alarms)
    for drawn in requests:
        levels = [live.av if level == "FUZZ" else level for level in drawn.levels]
        if drawn.rid == "unique":
            live.serial += 1
            levels.append(str(live.serial))
        elif drawn.rid != "none":
            levels.append(drawn.rid)
        topics.append("/".join(levels))
    # A barrier for replies that are not due: a poll, answered after the requests above were read.
    live.serial += 1
    topics.append(f"kp1/{live.av}/cex/p0/command/reboot/{live.serial}")
    bodies = [drawn.body for drawn in requests] + [Body(b"{}", "ok")]
    for topic, body in zip(topics, bodies, strict=True):
        ledger.register(topic, expect(topic, body, ledger.world.max_bytes), body.data)
        await live.client.publish(topic, body.data, qos=1)
    await ledger.wait_for(topics)
    assert ledger.problems[problems:] == [], topics
    assert live.logs.alarms[alarms:] == []


# -- contract bugs the fuzz ran into, fixed: regression tests ---------------------------------------
@pytest.mark.parametrize("ttl", [True, "60"])
async def test_invoke_ttl_of_the_wrong_type_is_refused(tmp_path: Path, app_version: str, ttl: object) -> None:
    """An invoke whose ttl is a boolean or a string is a 400, like every other wrong type."""
    port = free_port()
    async with running_service(make_settings(tmp_path, port)), probe(port) as admin:
        reply = await admin.request(f"cex/admin/{app_version}/dev1/invoke/reboot/1", {"payload": 1, "ttl": ttl})
    assert reply.topic.endswith("/error"), reply.json()
    assert reply.json()["statusCode"] == 400


async def test_topic_error_on_a_msgpack_topic_is_msgpack(tmp_path: Path, app_version: str) -> None:
    """A bad command type on a /msgpack topic is answered with a MessagePack error body."""
    port = free_port()
    topic = f"kp1/{app_version}/cex/dev1/command/bad.type/msgpack/5"
    async with running_service(make_settings(tmp_path, port)), probe(port) as device:
        reply = await device.request(topic, pack({}))
    assert reply.topic == f"{topic}/error"
    assert msgpack.unpackb(reply.payload)["statusCode"] == 400


async def test_topic_error_reply_uses_the_request_qos(
    tmp_path: Path, app_version: str, mosquitto: MosquittoProcess
) -> None:
    """On Mosquitto (which keeps QoS 0 as QoS 0), a QoS 0 request with a bad topic gets a QoS 0 error."""
    settings = make_settings(tmp_path, mosquitto.port, broker_url=mosquitto.url)
    async with running_service(settings), aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        await client.subscribe(f"kp1/{app_version}/cex/dev1/#", qos=1)
        body_error = f"kp1/{app_version}/cex/dev1/command/reboot/5"
        topic_error = f"kp1/{app_version}/cex/dev1/command/bad.type/6"
        await client.publish(body_error, b"{nope", qos=0)
        await client.publish(topic_error, b"{}", qos=0)
        qos: dict[str, int] = {}
        async with asyncio.timeout(WAIT_S):
            async for message in client.messages:
                if message.topic.value.endswith("/error"):
                    qos[message.topic.value] = message.qos
                if len(qos) == 2:
                    break
    assert qos[f"{body_error}/error"] == 0  # a malformed body: answered with the request's QoS
    assert qos[f"{topic_error}/error"] == 0
