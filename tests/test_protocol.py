"""Wire codecs and body parsers: JSON and MessagePack in, BadRequest (and only BadRequest) for bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_bridge.errors import BadRequest
from broker_bridge.protocol import (
    MAX_DEPTH,
    InvokeBody,
    PollBody,
    ResultItem,
    decode,
    encode,
    error_body,
    ok_body,
    parse_invoke,
    parse_poll,
    parse_results,
)
from broker_bridge.topics import Codec

NO_SURROGATES = st.characters(exclude_categories=["Cs"])
TEXT = st.text(NO_SURROGATES, max_size=20)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5), max_leaves=20
)


def refused(fn: Callable[[], object]) -> str:
    """Run fn, which must raise BadRequest; return the reason."""
    with pytest.raises(BadRequest) as info:
        fn()
    assert info.value.status_code == 400
    return info.value.reason


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# -- encode / decode ---------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES)
def test_json_round_trip(value: Any) -> None:
    """Every JSON-like document survives encode then decode as JSON."""
    assert decode(encode(value, Codec.JSON), Codec.JSON) == value


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES)
def test_msgpack_round_trip(value: Any) -> None:
    """Every JSON-like document survives encode then decode as MessagePack."""
    assert decode(encode(value, Codec.MSGPACK), Codec.MSGPACK) == value


def test_msgpack_decodes_a_plain_document() -> None:
    """A MessagePack map from a standard packer decodes to the same dict."""
    document = {"id": 42, "payload": {"a": [1, 2.5, None, True, "ü"]}}
    assert decode(msgpack.packb(document, use_bin_type=True), Codec.MSGPACK) == document


def test_json_encoding_is_compact_utf8() -> None:
    """JSON is written without spaces and with non-ASCII text as UTF-8, not escapes."""
    assert encode({"a": [1, "ü"], "b": None}, Codec.JSON) == '{"a":[1,"ü"],"b":null}'.encode()


def test_msgpack_encoding_uses_str_and_bin_types() -> None:
    """MessagePack output is standard: a fixmap of str keys readable by any unpacker."""
    assert msgpack.unpackb(encode({"a": [1, "ü"]}, Codec.MSGPACK), raw=False) == {"a": [1, "ü"]}


def test_json_decodes_unicode_and_numbers() -> None:
    """UTF-8 text, big-but-bounded ints and floats decode to Python values."""
    data = '{"t":"gerät ✓","i":9223372036854775807,"f":-1.5e-3,"n":null}'.encode()
    assert decode(data, Codec.JSON) == {"t": "gerät ✓", "i": 2**63 - 1, "f": -1.5e-3, "n": None}


@pytest.mark.parametrize("data", [b"", b"{", b"[1,]", b"{'a': 1}", b'{"a" 1}', b"tru", b"1 2", b"\x00", b"[1]x"])
def test_malformed_json_refused(data: bytes) -> None:
    """Broken JSON is a BadRequest that says so."""
    assert "malformed JSON" in refused(lambda: decode(data, Codec.JSON))


def test_json_with_bom_refused() -> None:
    """A UTF-8 byte order mark is not JSON."""
    assert "malformed JSON" in refused(lambda: decode(b"\xef\xbb\xbf{}", Codec.JSON))


@pytest.mark.parametrize("data", [b"\xff", b'"\xc3\x28"', b'{"a":"\xed\xa0\x80"}', b"\x80{}"])
def test_bad_utf8_refused(data: bytes) -> None:
    """Bodies that are not UTF-8 are refused naming the encoding."""
    assert "UTF-8" in refused(lambda: decode(data, Codec.JSON))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_json_nan_and_infinity_literals_refused(literal: str) -> None:
    """Python's NaN/Infinity extensions to JSON are refused wherever they appear."""
    for text in (literal, f"[{literal}]", f'{{"ttl": {literal}}}'):
        assert literal in refused(partial(decode, text.encode(), Codec.JSON))


@pytest.mark.parametrize("data", [b"1e400", b"-1e400", b'{"x": [1e999]}'])
def test_json_overflowing_floats_refused(data: bytes) -> None:
    """Numbers that overflow to infinity are refused too."""
    assert "infinite" in refused(lambda: decode(data, Codec.JSON))


def test_json_huge_integer_literal_refused() -> None:
    """An integer literal too long for Python's int parser is a BadRequest, not a ValueError."""
    refused(lambda: decode(b"1" * 5000, Codec.JSON))


@pytest.mark.parametrize("data", [b"[" * 100_000, b'{"a":' * 100_000, nested(5000)])
def test_json_deep_nesting_refused_without_recursion_error(data: bytes) -> None:
    """Pathologically nested JSON is a BadRequest, never a RecursionError."""
    assert "nested deeper" in refused(lambda: decode(data, Codec.JSON))


def test_json_depth_limit_is_exact() -> None:
    """MAX_DEPTH nested arrays decode; one more is refused."""
    assert decode(nested(MAX_DEPTH), Codec.JSON) is not None
    assert "nested deeper" in refused(lambda: decode(nested(MAX_DEPTH + 1), Codec.JSON))


@pytest.mark.parametrize("data", [b"\x91" * 100_000, b"\x81\xa1a" * 100_000])
def test_msgpack_deep_nesting_refused(data: bytes) -> None:
    """Pathologically nested MessagePack is a BadRequest, never a RecursionError."""
    refused(lambda: decode(data, Codec.MSGPACK))


def test_msgpack_depth_limit_is_exact() -> None:
    """MAX_DEPTH nested MessagePack arrays decode; one more is refused."""
    assert decode(b"\x91" * (MAX_DEPTH - 1) + b"\x90", Codec.MSGPACK) is not None
    assert "nested deeper" in refused(lambda: decode(b"\x91" * MAX_DEPTH + b"\x90", Codec.MSGPACK))


@pytest.mark.parametrize(
    "data", [b"", b"\x92\x01", b"\xc1", msgpack.packb(1) + b"\x01", b"\xd9\x05ab", b"\xd4\xfe\x00"]
)
def test_malformed_msgpack_refused(data: bytes) -> None:
    """Truncated, reserved-byte, trailing-garbage or negative-ext-type MessagePack is refused."""
    assert "MessagePack" in refused(lambda: decode(data, Codec.MSGPACK))


@pytest.mark.parametrize(
    "value",
    [b"raw", {"a": b"raw"}, [msgpack.ExtType(5, b"x")], msgpack.ExtType(127, b"")],
    ids=["bin", "nested-bin", "ext", "empty-ext"],
)
def test_msgpack_bin_and_ext_refused(value: object) -> None:
    """bin and ext values are refused with a reason that says to send strings."""
    data = msgpack.packb(value, use_bin_type=True)
    assert "binary and extension" in refused(lambda: decode(data, Codec.MSGPACK))


def test_msgpack_timestamp_ext_refused_as_extension() -> None:
    """The predefined timestamp extension is an extension value like any other."""
    data = msgpack.packb(msgpack.Timestamp(seconds=1, nanoseconds=0))
    assert "binary and extension" in refused(lambda: decode(data, Codec.MSGPACK))


@pytest.mark.parametrize(
    "value", [{1: "a"}, {"ok": {None: 1}}, {b"k": 1}, {True: 1}, {1.5: 1}], ids=["int", "nil", "bin", "bool", "float"]
)
def test_msgpack_non_str_map_keys_refused(value: object) -> None:
    """Map keys other than strings are refused; JSON could not carry them."""
    data = msgpack.packb(value, use_bin_type=True, strict_types=False)
    assert "keys must be strings" in refused(lambda: decode(data, Codec.MSGPACK))


def test_msgpack_unhashable_map_key_refused() -> None:
    """A map keyed by an array is refused rather than crashing the unpacker."""
    refused(lambda: decode(b"\x81\x91\x01\x02", Codec.MSGPACK))


@pytest.mark.parametrize("value", [float("nan"), [float("inf")], {"x": float("-inf")}])
def test_msgpack_non_finite_floats_refused(value: object) -> None:
    """MessagePack can carry NaN and infinities; JSON cannot, so they are refused."""
    data = msgpack.packb(value)
    assert "NaN and infinite" in refused(lambda: decode(data, Codec.MSGPACK))


@pytest.mark.parametrize("data", [b'"\\ud800"', b'{"p":"\\udfff"}', b'["a\\ud83d"]'])
def test_json_lone_surrogates_refused_or_reencodable(data: bytes) -> None:
    """A document decode accepts can be re-encoded in both codecs (else decode must refuse it)."""
    try:
        value = decode(data, Codec.JSON)
    except BadRequest:
        return
    encode(value, Codec.JSON)
    encode(value, Codec.MSGPACK)


@pytest.mark.parametrize("data", [b"18446744073709551616", b"[-9223372036854775809]", b'{"p": 100000000000000000000}'])
def test_json_integers_refused_or_msgpack_encodable(data: bytes) -> None:
    """An integer decode accepts from JSON is either refused or encodable as MessagePack."""
    try:
        value = decode(data, Codec.JSON)
    except BadRequest:
        return
    encode(value, Codec.MSGPACK)


def test_json_integers_at_msgpack_limits_are_fine() -> None:
    """Integers at the edges of MessagePack's range decode from JSON and encode as MessagePack."""
    for number in (2**64 - 1, -(2**63)):
        value = decode(str(number).encode(), Codec.JSON)
        assert msgpack.unpackb(encode(value, Codec.MSGPACK)) == number


# -- poll bodies -------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", list(Codec))
def test_parse_poll_empty_means_empty_object(codec: Codec) -> None:
    """An empty payload is a poll without observe."""
    assert parse_poll(b"", codec) == PollBody(observe=None)


@pytest.mark.parametrize(
    ("data", "observe"),
    [(b"{}", None), (b'{"observe": true}', True), (b'{"observe": false}', False), (b'{"observe": null}', None)],
)
def test_parse_poll_json(data: bytes, observe: bool | None) -> None:
    """The three documented poll bodies parse."""
    assert parse_poll(data, Codec.JSON) == PollBody(observe=observe)


def test_parse_poll_ignores_extra_fields() -> None:
    """Unknown poll fields are ignored, so newer devices keep working."""
    assert parse_poll(b'{"observe": true, "since": 5}', Codec.JSON).observe is True


def test_parse_poll_msgpack() -> None:
    """A MessagePack poll body parses like its JSON twin."""
    assert parse_poll(msgpack.packb({"observe": True}), Codec.MSGPACK) == PollBody(observe=True)


@pytest.mark.parametrize("data", [b'{"observe": "yes"}', b'{"observe": 1}', b'{"observe": "true"}', b'{"observe": []}'])
def test_parse_poll_non_bool_observe_refused(data: bytes) -> None:
    """observe must be a real boolean; the reason names the field."""
    assert "observe" in refused(lambda: parse_poll(data, Codec.JSON))


@pytest.mark.parametrize("data", [b"[]", b'[{"observe": true}]', b"null", b"true", b'"x"', b"0"])
def test_parse_poll_non_object_refused(data: bytes) -> None:
    """A poll body that is not an object is refused with an example of a good one."""
    assert "poll body must be an object" in refused(lambda: parse_poll(data, Codec.JSON))


def test_parse_poll_malformed_refused() -> None:
    """Malformed JSON polls are refused."""
    assert "malformed JSON" in refused(lambda: parse_poll(b"{", Codec.JSON))


# -- result bodies -----------------------------------------------------------------------------
FULL_RESULT = {"id": 42, "statusCode": 200, "reasonPhrase": "OK", "payload": "Success"}
FULL_ITEM = ResultItem(id=42, statusCode=200, reasonPhrase="OK", payload="Success")


def results_json(value: object) -> bytes:
    return json.dumps(value).encode()


def test_parse_results_single_object() -> None:
    """The RFC schema's single result object is accepted as a one-item list."""
    assert parse_results(results_json(FULL_RESULT), Codec.JSON) == [FULL_ITEM]


def test_parse_results_array() -> None:
    """The tutorial's array of results parses in order."""
    second = {"id": 43, "statusCode": 102}
    items = parse_results(results_json([FULL_RESULT, second]), Codec.JSON)
    assert items == [FULL_ITEM, ResultItem(id=43, statusCode=102)]


def test_parse_results_optional_fields_default_to_none() -> None:
    """reasonPhrase and payload are optional."""
    (item,) = parse_results(b'{"id": 1, "statusCode": 500}', Codec.JSON)
    assert (item.id, item.status_code, item.reason_phrase, item.payload) == (1, 500, None, None)


def test_parse_results_extra_fields_ignored() -> None:
    """Fields the contract does not name are ignored."""
    body = results_json([{**FULL_RESULT, "extra": {"x": 1}, "timestamp": 5}])
    assert parse_results(body, Codec.JSON) == [FULL_ITEM]


def test_parse_results_structured_payload() -> None:
    """A result payload may be any JSON value."""
    (item,) = parse_results(b'{"id": 1, "statusCode": 200, "payload": {"a": [1, null]}}', Codec.JSON)
    assert item.payload == {"a": [1, None]}


def test_parse_results_msgpack() -> None:
    """MessagePack result bodies parse like JSON ones."""
    assert parse_results(msgpack.packb([FULL_RESULT]), Codec.MSGPACK) == [FULL_ITEM]


def test_parse_results_empty_array_refused() -> None:
    """An empty result array reports nothing and is refused."""
    assert "empty" in refused(lambda: parse_results(b"[]", Codec.JSON))


@pytest.mark.parametrize("body", [{"id": 1}, [{"id": 1}], [FULL_RESULT, {"id": 2}]])
def test_parse_results_missing_status_code_refused(body: object) -> None:
    """A result without statusCode is refused with a reason naming statusCode."""
    assert "statusCode" in refused(lambda: parse_results(results_json(body), Codec.JSON))


@pytest.mark.parametrize("body", [{"statusCode": 200}, [{"statusCode": 200}]])
def test_parse_results_missing_id_refused(body: object) -> None:
    """A result without id is refused naming id."""
    assert "id" in refused(lambda: parse_results(results_json(body), Codec.JSON))


@pytest.mark.parametrize("code", [99, 600, 0, -200, 1000])
def test_parse_results_status_code_out_of_range_refused(code: int) -> None:
    """statusCode must be an HTTP-style code from 100 to 599."""
    assert "statusCode" in refused(lambda: parse_results(results_json({"id": 1, "statusCode": code}), Codec.JSON))


@pytest.mark.parametrize("code", [100, 199, 200, 599])
def test_parse_results_status_code_bounds_accepted(code: int) -> None:
    """The bounds 100 and 599 are inclusive."""
    assert parse_results(results_json({"id": 1, "statusCode": code}), Codec.JSON)[0].status_code == code


@pytest.mark.parametrize("bad_id", ["1", "42", 1.0, True, None, [1]])
def test_parse_results_non_integer_id_refused(bad_id: object) -> None:
    """id is a strict integer: strings, floats and booleans are refused naming id."""
    assert "id" in refused(lambda: parse_results(results_json({"id": bad_id, "statusCode": 200}), Codec.JSON))


@pytest.mark.parametrize("code", ["200", 200.0, True])
def test_parse_results_non_integer_status_code_refused(code: object) -> None:
    """statusCode is a strict integer."""
    assert "statusCode" in refused(lambda: parse_results(results_json({"id": 1, "statusCode": code}), Codec.JSON))


def test_parse_results_long_reason_phrase_refused() -> None:
    """reasonPhrase is capped at 1024 characters."""
    ok = {"id": 1, "statusCode": 200, "reasonPhrase": "x" * 1024}
    assert parse_results(results_json(ok), Codec.JSON)[0].reason_phrase == "x" * 1024
    too_long = {**ok, "reasonPhrase": "x" * 1025}
    assert "reasonPhrase" in refused(lambda: parse_results(results_json(too_long), Codec.JSON))


def test_parse_results_non_string_reason_phrase_refused() -> None:
    """reasonPhrase must be text."""
    body = results_json({"id": 1, "statusCode": 200, "reasonPhrase": 5})
    assert "reasonPhrase" in refused(lambda: parse_results(body, Codec.JSON))


@pytest.mark.parametrize("data", [b"5", b'"ok"', b"null", b"true"])
def test_parse_results_scalar_refused(data: bytes) -> None:
    """A scalar result body is refused with the expected shape in the reason."""
    assert "results must be an array" in refused(lambda: parse_results(data, Codec.JSON))


@pytest.mark.parametrize("data", [b"[5]", b'[{"id": 1, "statusCode": 200}, "x"]', b"[[]]"])
def test_parse_results_array_of_non_objects_refused(data: bytes) -> None:
    """Array items must be result objects; the reason points at the bad index."""
    reason = refused(lambda: parse_results(data, Codec.JSON))
    assert reason[0].isdigit()


@pytest.mark.parametrize("data", [b"", b"[", b"\xff"])
def test_parse_results_undecodable_refused(data: bytes) -> None:
    """Bodies that do not decode are refused before validation."""
    refused(lambda: parse_results(data, Codec.JSON))


@pytest.mark.parametrize("big", [2**63, 2**64, 10**30, -(2**63) - 1])
def test_parse_results_id_outside_int64_refused(big: int) -> None:
    """Result ids must fit the store's signed 64-bit integer."""
    refused(lambda: parse_results(results_json({"id": big, "statusCode": 200}), Codec.JSON))


# -- invoke bodies -----------------------------------------------------------------------------
def test_parse_invoke_empty() -> None:
    """An empty invoke body means a null payload and the default TTL."""
    assert parse_invoke(b"") == InvokeBody(payload=None, ttl=None)


def test_parse_invoke_payload_and_ttl() -> None:
    """payload may be any JSON value; ttl is seconds."""
    body = parse_invoke(b'{"payload": {"delay": [1, 2]}, "ttl": 2.5}')
    assert body.payload == {"delay": [1, 2]}
    assert body.ttl == 2.5


@pytest.mark.parametrize("data", [b"{}", b'{"payload": null}', b'{"ttl": null}'])
def test_parse_invoke_defaults(data: bytes) -> None:
    """Missing and null fields mean the defaults."""
    assert parse_invoke(data) == InvokeBody()


@pytest.mark.parametrize("ttl", [b"0", b"-1", b"-0.001", b"0.0"])
def test_parse_invoke_non_positive_ttl_refused(ttl: bytes) -> None:
    """ttl must be greater than zero; the reason names ttl."""
    assert "ttl" in refused(lambda: parse_invoke(b'{"ttl": ' + ttl + b"}"))


@pytest.mark.parametrize("data", [b'{"ttl": NaN}', b'{"ttl": Infinity}', b'{"ttl": 1e400}'])
def test_parse_invoke_non_finite_ttl_refused(data: bytes) -> None:
    """Non-finite TTLs never reach the model."""
    refused(lambda: parse_invoke(data))


@pytest.mark.parametrize("data", [b'{"payload": 1, "tll": 5}', b'{"commandTtl": 5}', b'{"x": null}'])
def test_parse_invoke_unknown_field_refused(data: bytes) -> None:
    """Unknown fields are refused (a typo must not silently drop a TTL)."""
    assert "Extra inputs are not permitted" in refused(lambda: parse_invoke(data))


@pytest.mark.parametrize("data", [b"[]", b'"reboot"', b"null", b"5", b"[{}]"])
def test_parse_invoke_non_object_refused(data: bytes) -> None:
    """An invoke body must be an object; the reason shows its shape."""
    assert "invoke body must be an object" in refused(lambda: parse_invoke(data))


@pytest.mark.parametrize("data", [b"{", b"\xff", b"NaN"])
def test_parse_invoke_undecodable_refused(data: bytes) -> None:
    """Invoke bodies are JSON; anything else is refused."""
    refused(lambda: parse_invoke(data))


# -- reply bodies ------------------------------------------------------------------------------
def test_error_and_ok_bodies() -> None:
    """Reply bodies follow the KP1 shape."""
    assert error_body(404, "no such command") == {"statusCode": 404, "reasonPhrase": "no such command"}
    assert ok_body() == {"statusCode": 200, "reasonPhrase": "OK"}


# -- properties: arbitrary input raises only BadRequest ----------------------------------------
JSONISH_BYTES = st.text(st.sampled_from('[]{}":,0123456789.eE+-truefalsnNIiyx\\u \x00ü'), max_size=60).map(
    str.encode
)
ANY_BYTES = st.binary(max_size=200) | JSONISH_BYTES


def only_bad_request(fn: Callable[[], object]) -> None:
    """Call fn; returning or raising BadRequest is fine, any other exception propagates."""
    reason = "returned"
    try:
        fn()
    except BadRequest as exc:
        reason = exc.reason
    assert reason


@settings(max_examples=300, deadline=None)
@given(data=ANY_BYTES)
def test_arbitrary_bytes_raise_only_bad_request(data: bytes) -> None:
    """decode and every parse_* function return or raise BadRequest for any bytes, in both codecs."""
    for codec in Codec:
        only_bad_request(partial(decode, data, codec))
        only_bad_request(partial(parse_poll, data, codec))
        only_bad_request(partial(parse_results, data, codec))
    only_bad_request(partial(parse_invoke, data))


@settings(max_examples=200, deadline=None)
@given(value=JSON_VALUES)
def test_well_formed_documents_raise_only_bad_request(value: Any) -> None:
    """Valid JSON of the wrong shape reaches the validators and still raises only BadRequest."""
    for candidate in (value, [value], {"observe": value}, {"id": value, "statusCode": 200}, {"ttl": value}):
        data = encode(candidate, Codec.JSON)
        only_bad_request(partial(parse_poll, data, Codec.JSON))
        only_bad_request(partial(parse_results, data, Codec.JSON))
        only_bad_request(partial(parse_invoke, data))
