"""The topic scheme: every device and admin topic shape, the builders, and parse/build round trips."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_bridge.errors import BadRequest
from broker_bridge.topics import (
    AdminAction,
    AdminRequest,
    Codec,
    DeviceRequest,
    Format,
    Resource,
    Target,
    TopicError,
    TopicScheme,
    error_topic,
    make_target,
    parse_positive_int,
    status_topic,
)

SCHEME = TopicScheme()
CUSTOM = TopicScheme(kp1_prefix="kp1", extension="cmd", admin_prefix="ops/admin", events_prefix="ops/events")
REBOOT = Target(app_version="app-v1", endpoint_token="dev1", command_type="reboot")
DEV = "kp1/app-v1/cex/dev1"
ADMIN = "cex/admin/app-v1/dev1"


def device_error(topic: str, scheme: TopicScheme = SCHEME) -> TopicError:
    with pytest.raises(TopicError) as info:
        scheme.parse_device(topic)
    return info.value


def admin_error(topic: str, scheme: TopicScheme = SCHEME) -> TopicError:
    with pytest.raises(TopicError) as info:
        scheme.parse_admin(topic)
    return info.value


# -- request / command ID levels ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("1", 1),
        ("42", 42),
        ("007", 7),
        ("999999999999999999", 999_999_999_999_999_999),
        ("0", None),
        ("000", None),
        ("-1", None),
        ("+1", None),
        (" 1", None),
        ("1.0", None),
        ("", None),
        ("abc", None),
        ("1000000000000000000", None),
        ("\u0661\u0662", None),
        ("\u00b2", None),
    ],
)
def test_parse_positive_int(level: str, expected: int | None) -> None:
    """Only 1-18 ASCII digits with a value above zero make an ID; leading zeros are tolerated."""
    assert parse_positive_int(level) == expected


# -- device tree: requests ---------------------------------------------------------------------
@pytest.mark.parametrize("resource", list(Resource))
@pytest.mark.parametrize(
    ("suffix", "fmt", "request_id"),
    [
        ("", Format.PLAIN, None),
        ("/json", Format.JSON, None),
        ("/msgpack", Format.MSGPACK, None),
        ("/7", Format.PLAIN, 7),
        ("/json/7", Format.JSON, 7),
        ("/msgpack/7", Format.MSGPACK, 7),
        ("/007", Format.PLAIN, 7),
        ("/999999999999999999", Format.PLAIN, 999_999_999_999_999_999),
    ],
)
def test_parse_device_every_shape(resource: Resource, suffix: str, fmt: Format, request_id: int | None) -> None:
    """Each documented device topic shape parses into resource, target, format and request ID."""
    topic = f"{DEV}/{resource.value}/reboot{suffix}"
    assert SCHEME.parse_device(topic) == DeviceRequest(
        topic=topic, resource=resource, target=REBOOT, format=fmt, request_id=request_id
    )


@pytest.mark.parametrize(
    ("fmt", "codec"), [(Format.PLAIN, Codec.JSON), (Format.JSON, Codec.JSON), (Format.MSGPACK, Codec.MSGPACK)]
)
def test_format_codec(fmt: Format, codec: Codec) -> None:
    """No format level and ``json`` mean JSON; ``msgpack`` means MessagePack."""
    assert fmt.codec is codec


@pytest.mark.parametrize("command_type", ["zero", "close-door", "RELAY_SWITCH", "a", "x" * 128])
def test_parse_device_real_world_names(command_type: str) -> None:
    """Tutorial app versions and the command type spellings real devices use are accepted."""
    topic = f"kp1/bspu542ikfmmfgrk47s0-v1/cex/my-device_01/command/{command_type}"
    request = SCHEME.parse_device(topic)
    assert request is not None
    assert request.target == Target(
        app_version="bspu542ikfmmfgrk47s0-v1", endpoint_token="my-device_01", command_type=command_type
    )
    assert request.request_id is None


# -- device tree: not ours ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "topic",
    [
        f"{DEV}/command/reboot/status",
        f"{DEV}/command/reboot/error",
        f"{DEV}/command/reboot/7/status",
        f"{DEV}/command/reboot/json/7/error",
        f"{DEV}/result/reboot/msgpack/7/status",
        f"{DEV}/result/reboot/7/error",
        f"{DEV}/command/reboot/msgpack/status",
        f"{DEV}/anything/at/all/status",
    ],
)
def test_parse_device_reply_topics_are_none(topic: str) -> None:
    """Our own replies and pushes come back through the subscription and are ignored."""
    assert SCHEME.parse_device(topic) is None


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "kp1",
        "kp1/app-v1/cex/dev1",
        "kp1/app-v1/cex/dev1/command",
        "kp1/app-v1/epmx/dev1/command/reboot",
        "kp1/app-v1/cmd/dev1/command/reboot/7",
        "kp2/app-v1/cex/dev1/command/reboot",
        "KP1/app-v1/cex/dev1/command/reboot",
        "xkp1/app-v1/cex/dev1/command/reboot",
        "/kp1/app-v1/cex/dev1/command/reboot",
        f"{ADMIN}/invoke/reboot",
        "cex/events/app-v1/dev1/reboot/42",
    ],
)
def test_parse_device_foreign_topics_are_none(topic: str) -> None:
    """Other extensions, other prefixes and too-short topics are not ours."""
    assert SCHEME.parse_device(topic) is None


# -- device tree: errors -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("topic", "words"),
    [
        (f"{DEV}/command/re.boot", "command type"),
        (f"{DEV}/command/re+boot", "command type"),
        (f"{DEV}/command/{'x' * 129}", "command type"),
        (f"{DEV}/command/", "command type"),
        ("kp1/app-v1/cex/dev.1/command/reboot", "endpoint token"),
        ("kp1/app-v1/cex//command/reboot", "endpoint token"),
        ("kp1//cex/dev1/command/reboot", "app version"),
        (f"{DEV}/commands/reboot", "resource"),
        (f"{DEV}/Command/reboot", "resource"),
        (f"{DEV}/status/reboot/json", "resource"),
        (f"{DEV}/command/reboot/xml", "unexpected"),
        (f"{DEV}/command/reboot/json/msgpack", "unexpected"),
        (f"{DEV}/command/reboot/json/extra", "unexpected"),
        (f"{DEV}/command/reboot/7/json", "unexpected"),
        (f"{DEV}/command/reboot/0", "unexpected"),
        (f"{DEV}/command/reboot/-1", "unexpected"),
        (f"{DEV}/command/reboot/1000000000000000000", "unexpected"),
        (f"{DEV}/command/reboot/", "unexpected"),
        (f"{DEV}/result/reboot/7/8/x", "unexpected"),
    ],
)
def test_parse_device_errors_without_request_id_have_no_reply(topic: str, words: str) -> None:
    """A malformed topic in our tree without a request ID is a 400 that nobody gets a reply for."""
    error = device_error(topic)
    assert isinstance(error, BadRequest)
    assert error.status_code == 400
    assert words in error.reason
    assert error.reply_topic is None


@pytest.mark.parametrize(
    ("topic", "words"),
    [
        (f"{DEV}/command/re.boot/5", "command type"),
        (f"{DEV}/result/re.boot/json/5", "command type"),
        ("kp1/app-v1/cex/dev.1/command/reboot/5", "endpoint token"),
        ("kp1/app-v1/cex/dev.1/result/reboot/msgpack/5", "endpoint token"),
        ("kp1/app-v1/cex//result/reboot/5", "endpoint token"),
        (f"{DEV}/commands/reboot/5", "resource"),
        (f"{DEV}/command/reboot/xml/5", "unexpected"),
        (f"{DEV}/command/reboot/json/json/5", "unexpected"),
        (f"{DEV}/result/reboot/7/8/9", "unexpected"),
        (f"{DEV}/command/reboot/0/5", "unexpected"),
        (f"{DEV}/command/reboot/extra/005", "unexpected"),
    ],
)
def test_parse_device_errors_with_request_id_reply_on_error_topic(topic: str, words: str) -> None:
    """A malformed topic ending in a request ID is answered on ``<topic>/error``."""
    error = device_error(topic)
    assert words in error.reason
    assert error.reply_topic == f"{topic}/error"


# -- device tree: builders and round trips -----------------------------------------------------
@pytest.mark.parametrize(
    ("resource", "fmt", "expected"),
    [
        (Resource.COMMAND, Format.PLAIN, f"{DEV}/command/reboot"),
        (Resource.COMMAND, Format.JSON, f"{DEV}/command/reboot/json"),
        (Resource.RESULT, Format.MSGPACK, f"{DEV}/result/reboot/msgpack"),
    ],
)
def test_device_topic_builder(resource: Resource, fmt: Format, expected: str) -> None:
    """device_topic spells the documented shape, with the format level only when one is given."""
    assert SCHEME.device_topic(resource, REBOOT, fmt) == expected


def test_device_topic_defaults_to_plain() -> None:
    """Without a format the topic has no format level."""
    assert SCHEME.device_topic(Resource.RESULT, REBOOT) == f"{DEV}/result/reboot"


@pytest.mark.parametrize("resource", list(Resource))
@pytest.mark.parametrize("fmt", list(Format))
@pytest.mark.parametrize("request_id", [None, 1, 42, 999_999_999_999_999_999])
def test_device_topic_round_trips(resource: Resource, fmt: Format, request_id: int | None) -> None:
    """parse_device(device_topic(...)[/rid]) gives back what was built."""
    topic = SCHEME.device_topic(resource, REBOOT, fmt)
    if request_id is not None:
        topic = f"{topic}/{request_id}"
    assert SCHEME.parse_device(topic) == DeviceRequest(
        topic=topic, resource=resource, target=REBOOT, format=fmt, request_id=request_id
    )


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        (Format.PLAIN, f"{DEV}/command/reboot/status"),
        (Format.JSON, f"{DEV}/command/reboot/json/status"),
        (Format.MSGPACK, f"{DEV}/command/reboot/msgpack/status"),
    ],
)
def test_push_topic(fmt: Format, expected: str) -> None:
    """Pushes go to the poll reply topic without request ID, which the bridge itself ignores."""
    topic = SCHEME.push_topic(REBOOT, fmt)
    assert topic == expected
    assert topic == status_topic(SCHEME.device_topic(Resource.COMMAND, REBOOT, fmt))
    assert SCHEME.parse_device(topic) is None


def test_status_and_error_topics() -> None:
    """Replies append one level to the request topic."""
    assert status_topic(f"{DEV}/command/reboot/7") == f"{DEV}/command/reboot/7/status"
    assert error_topic(f"{DEV}/command/reboot/7") == f"{DEV}/command/reboot/7/error"


def test_bridge_filters_default() -> None:
    """The bridge subscribes to both device resources and the whole admin tree."""
    assert SCHEME.bridge_filters() == ["kp1/+/cex/+/command/#", "kp1/+/cex/+/result/#", "cex/admin/#"]


def test_endpoint_base() -> None:
    """The endpoint base is prefix/app version/extension/token."""
    assert SCHEME.endpoint_base("app-v1", "dev1") == DEV


@pytest.mark.parametrize("command_type", ["status", "error"])
def test_command_types_named_like_reply_levels_are_reserved(command_type: str) -> None:
    """'status' and 'error' cannot be command types: kp1/.../command/status would read as a reply."""
    with pytest.raises(BadRequest, match="reserved"):
        make_target("app-v1", "dev1", command_type)


# -- admin tree --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("suffix", "action", "command_id", "request_id"),
    [
        ("invoke/reboot", AdminAction.INVOKE, None, None),
        ("invoke/reboot/9", AdminAction.INVOKE, None, 9),
        ("invoke/reboot/009", AdminAction.INVOKE, None, 9),
        ("cancel/reboot/42", AdminAction.CANCEL, 42, None),
        ("cancel/reboot/42/9", AdminAction.CANCEL, 42, 9),
        ("cancel/reboot/999999999999999999/1", AdminAction.CANCEL, 999_999_999_999_999_999, 1),
    ],
)
def test_parse_admin_every_shape(
    suffix: str, action: AdminAction, command_id: int | None, request_id: int | None
) -> None:
    """Invoke and cancel topics parse with and without request ID."""
    topic = f"{ADMIN}/{suffix}"
    assert SCHEME.parse_admin(topic) == AdminRequest(
        topic=topic, action=action, target=REBOOT, command_id=command_id, request_id=request_id
    )


@pytest.mark.parametrize(
    "topic",
    [
        f"{ADMIN}/invoke/reboot/status",
        f"{ADMIN}/invoke/reboot/9/status",
        f"{ADMIN}/invoke/reboot/9/error",
        f"{ADMIN}/cancel/reboot/42/9/error",
        f"{ADMIN}/cancel/reboot/42/status",
        f"{ADMIN}/status",
    ],
)
def test_parse_admin_reply_topics_are_none(topic: str) -> None:
    """Replies on the admin tree are ours and ignored."""
    assert SCHEME.parse_admin(topic) is None


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "cex/admin",
        "cex/administrator/app-v1/dev1/invoke/reboot",
        "cex/admins/app-v1/dev1/invoke/reboot",
        "ops/admin/app-v1/dev1/invoke/reboot",
        "/cex/admin/app-v1/dev1/invoke/reboot",
        "cex/events/app-v1/dev1/reboot/42",
        f"{DEV}/command/reboot",
    ],
)
def test_parse_admin_foreign_topics_are_none(topic: str) -> None:
    """Topics outside the admin prefix are not admin requests."""
    assert SCHEME.parse_admin(topic) is None


@pytest.mark.parametrize(
    "topic",
    [
        "cex/admin/",
        "cex/admin/app-v1/dev1/invoke",
        f"{ADMIN}/reboot",
        f"{ADMIN}/delete/reboot",
        f"{ADMIN}/INVOKE/reboot",
        f"{ADMIN}/invoke/re.boot",
        f"{ADMIN}/invoke/",
        "cex/admin/app-v1/dev.1/invoke/reboot",
        "cex/admin/app-v1//invoke/reboot",
        "cex/admin//dev1/invoke/reboot",
        f"{ADMIN}/invoke/reboot/x",
        f"{ADMIN}/invoke/reboot/0",
        f"{ADMIN}/cancel/reboot",
        f"{ADMIN}/cancel/reboot/abc",
        f"{ADMIN}/cancel/reboot/0",
        f"{ADMIN}/cancel/reboot/-1",
        f"{ADMIN}/cancel/reboot/1000000000000000000",
        f"{ADMIN}/cancel/reboot/42/x",
        f"{ADMIN}/cancel/reboot/42/9/x",
    ],
)
def test_parse_admin_errors_without_request_id_have_no_reply(topic: str) -> None:
    """Malformed admin topics without request ID raise TopicError with no reply topic."""
    error = admin_error(topic)
    assert error.status_code == 400
    assert error.reason
    assert error.reply_topic is None


@pytest.mark.parametrize(
    ("topic", "words"),
    [
        (f"{ADMIN}/delete/reboot/9", "admin topics are"),
        ("cex/admin/app-v1/invoke/reboot/9", "admin topics are"),
        (f"{ADMIN}/invoke/re.boot/9", "command type"),
        ("cex/admin/app-v1/dev.1/invoke/reboot/9", "endpoint token"),
        ("cex/admin/app-v1/dev.1/cancel/reboot/42/9", "endpoint token"),
        (f"{ADMIN}/invoke/reboot/5/9", "unexpected"),
        (f"{ADMIN}/invoke/reboot/x/9", "unexpected"),
        (f"{ADMIN}/cancel/reboot/42/5/9", "unexpected"),
        (f"{ADMIN}/cancel/reboot/abc/9", "command id"),
        (f"{ADMIN}/cancel/reboot/0/9", "command id"),
    ],
)
def test_parse_admin_errors_with_request_id_reply_on_error_topic(topic: str, words: str) -> None:
    """Malformed admin topics ending in a request ID are answered on ``<topic>/error``."""
    error = admin_error(topic)
    assert words in error.reason
    assert error.reply_topic == f"{topic}/error"


def test_parse_admin_cancel_error_does_not_take_command_id_for_request_id() -> None:
    """A bad cancel whose last level is the command ID (no request ID) has no reply topic."""
    error = admin_error("cex/admin/app-v1/dev.1/cancel/reboot/42")
    assert error.reply_topic is None


def test_admin_topic_builder() -> None:
    """admin_topic spells invoke and cancel topics; event_topic the event stream."""
    assert SCHEME.admin_topic(AdminAction.INVOKE, REBOOT) == f"{ADMIN}/invoke/reboot"
    assert SCHEME.admin_topic(AdminAction.CANCEL, REBOOT, 42) == f"{ADMIN}/cancel/reboot/42"
    assert SCHEME.event_topic(REBOOT, 42) == "cex/events/app-v1/dev1/reboot/42"


@pytest.mark.parametrize("request_id", [None, 1, 77])
def test_admin_topic_round_trips(request_id: int | None) -> None:
    """parse_admin(admin_topic(...)[/rid]) gives back action, target and IDs."""
    suffix = f"/{request_id}" if request_id is not None else ""
    invoke = SCHEME.admin_topic(AdminAction.INVOKE, REBOOT) + suffix
    cancel = SCHEME.admin_topic(AdminAction.CANCEL, REBOOT, 42) + suffix
    assert SCHEME.parse_admin(invoke) == AdminRequest(
        topic=invoke, action=AdminAction.INVOKE, target=REBOOT, command_id=None, request_id=request_id
    )
    assert SCHEME.parse_admin(cancel) == AdminRequest(
        topic=cancel, action=AdminAction.CANCEL, target=REBOOT, command_id=42, request_id=request_id
    )


def test_event_topics_are_not_requests() -> None:
    """Event topics parse as neither device nor admin requests."""
    topic = SCHEME.event_topic(REBOOT, 42)
    assert SCHEME.parse_device(topic) is None
    assert SCHEME.parse_admin(topic) is None


# -- custom prefixes ---------------------------------------------------------------------------
def test_custom_scheme_builders() -> None:
    """Every builder honours the configured prefixes and extension."""
    assert CUSTOM.bridge_filters() == ["kp1/+/cmd/+/command/#", "kp1/+/cmd/+/result/#", "ops/admin/#"]
    assert CUSTOM.device_topic(Resource.COMMAND, REBOOT) == "kp1/app-v1/cmd/dev1/command/reboot"
    assert CUSTOM.push_topic(REBOOT, Format.JSON) == "kp1/app-v1/cmd/dev1/command/reboot/json/status"
    assert CUSTOM.admin_topic(AdminAction.CANCEL, REBOOT, 3) == "ops/admin/app-v1/dev1/cancel/reboot/3"
    assert CUSTOM.event_topic(REBOOT, 3) == "ops/events/app-v1/dev1/reboot/3"


def test_custom_scheme_round_trips() -> None:
    """A custom scheme parses what it builds."""
    device = f"{CUSTOM.device_topic(Resource.RESULT, REBOOT, Format.MSGPACK)}/5"
    admin = f"{CUSTOM.admin_topic(AdminAction.CANCEL, REBOOT, 3)}/5"
    assert CUSTOM.parse_device(device) == DeviceRequest(
        topic=device, resource=Resource.RESULT, target=REBOOT, format=Format.MSGPACK, request_id=5
    )
    assert CUSTOM.parse_admin(admin) == AdminRequest(
        topic=admin, action=AdminAction.CANCEL, target=REBOOT, command_id=3, request_id=5
    )


def test_custom_scheme_ignores_default_trees() -> None:
    """Default-scheme topics are foreign to a custom scheme and vice versa."""
    assert CUSTOM.parse_device(f"{DEV}/command/reboot/5") is None
    assert CUSTOM.parse_admin(f"{ADMIN}/invoke/reboot/5") is None
    assert SCHEME.parse_device("kp1/app-v1/cmd/dev1/command/reboot/5") is None
    assert SCHEME.parse_admin("ops/admin/app-v1/dev1/invoke/reboot/5") is None


def test_custom_scheme_errors_reply_on_its_own_tree() -> None:
    """Errors in a custom tree name the custom topic as reply base."""
    assert device_error("kp1/app-v1/cmd/dev.1/command/reboot/5", CUSTOM).reply_topic == (
        "kp1/app-v1/cmd/dev.1/command/reboot/5/error"
    )
    assert admin_error("ops/admin/app-v1/dev1/invoke/re.boot/5", CUSTOM).reply_topic == (
        "ops/admin/app-v1/dev1/invoke/re.boot/5/error"
    )


def test_multi_level_kp1_prefix() -> None:
    """A KP1 prefix of several levels builds and parses."""
    scheme = TopicScheme(kp1_prefix="tenant/kp1")
    topic = f"{scheme.device_topic(Resource.COMMAND, REBOOT, Format.JSON)}/8"
    assert topic == "tenant/kp1/app-v1/cex/dev1/command/reboot/json/8"
    assert scheme.parse_device(topic) == DeviceRequest(
        topic=topic, resource=Resource.COMMAND, target=REBOOT, format=Format.JSON, request_id=8
    )
    assert scheme.parse_device(f"{DEV}/command/reboot") is None


# -- make_target -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("app_version", "token", "command_type", "words"),
    [
        ("", "dev1", "reboot", "app version"),
        ("app/v1", "dev1", "reboot", "app version"),
        ("app+v1", "dev1", "reboot", "app version"),
        ("app#v1", "dev1", "reboot", "app version"),
        ("app\x00v1", "dev1", "reboot", "app version"),
        ("app-v1", "", "reboot", "endpoint token"),
        ("app-v1", "dev.1", "reboot", "endpoint token"),
        ("app-v1", "dev/1", "reboot", "endpoint token"),
        ("app-v1", "dev+1", "reboot", "endpoint token"),
        ("app-v1", "dev#1", "reboot", "endpoint token"),
        ("app-v1", "dev\x001", "reboot", "endpoint token"),
        ("app-v1", "t" * 257, "reboot", "endpoint token of 257 characters"),  # was accepted up to 65,000 over MQTT
        ("a" * 257, "dev1", "reboot", "app version of 257 characters"),
        ("app-v1", "dev1", "", "command type"),
        ("app-v1", "dev1", "re boot", "command type"),
        ("app-v1", "dev1", "x" * 129, "command type"),
        ("app-v1", "dev1", "reboot\n", "command type"),
    ],
)
def test_make_target_refuses_bad_parts(app_version: str, token: str, command_type: str, words: str) -> None:
    """make_target raises BadRequest naming the part that is wrong."""
    with pytest.raises(BadRequest) as info:
        make_target(app_version, token, command_type)
    assert words in info.value.reason


def test_make_target_accepts_dotted_app_version_and_unicode_token() -> None:
    """App versions may contain dots; tokens may be any non-empty text without + # / ."""
    assert make_target("a" * 256, "t" * 256, "reboot").endpoint_token == "t" * 256  # the limits themselves
    assert make_target("app-v1.2", "gerät-ü", "reboot") == Target(
        app_version="app-v1.2", endpoint_token="gerät-ü", command_type="reboot"
    )


# -- properties --------------------------------------------------------------------------------
LEVEL_TEXT = st.characters(exclude_categories=["Cs"], exclude_characters="/+#\x00")
APP_VERSIONS = st.text(LEVEL_TEXT, min_size=1, max_size=20)
TOKENS = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="/+#.\x00"), min_size=1, max_size=20)
COMMAND_TYPES = st.from_regex(r"[A-Za-z0-9_-]{1,128}", fullmatch=True).filter(lambda t: t not in {"status", "error"})
TARGETS = st.builds(Target, app_version=APP_VERSIONS, endpoint_token=TOKENS, command_type=COMMAND_TYPES)
IDS = st.integers(min_value=1, max_value=10**18 - 1)
SCHEMES = st.sampled_from([SCHEME, CUSTOM, TopicScheme(kp1_prefix="a/b", admin_prefix="x/y/z")])

INTERESTING_LEVELS = st.sampled_from(
    [
        "kp1", "cex", "cmd", "admin", "ops", "events", "command", "result", "invoke", "cancel", "json",
        "msgpack", "status", "error", "reboot", "re.boot", "dev1", "dev.1", "app-v1", "1", "5", "0", "007",
        "-1", "1000000000000000000", "", "+", "#", "\u0661",
    ]
)  # fmt: skip
TOPIC_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=60)
LEVELLED_TOPICS = st.lists(INTERESTING_LEVELS | TOPIC_TEXT, max_size=10).map("/".join)


@settings(max_examples=300, deadline=None)
@given(
    scheme=SCHEMES,
    target=TARGETS,
    resource=st.sampled_from(Resource),
    fmt=st.sampled_from(Format),
    request_id=st.none() | IDS,
)
def test_device_round_trip_property(
    scheme: TopicScheme, target: Target, resource: Resource, fmt: Format, request_id: int | None
) -> None:
    """Any valid target, resource, format and request ID survives build then parse."""
    topic = scheme.device_topic(resource, target, fmt)
    if request_id is not None:
        topic = f"{topic}/{request_id}"
    assert scheme.parse_device(topic) == DeviceRequest(
        topic=topic, resource=resource, target=target, format=fmt, request_id=request_id
    )
    assert scheme.parse_device(status_topic(topic)) is None
    assert scheme.parse_device(error_topic(topic)) is None


@settings(max_examples=300, deadline=None)
@given(scheme=SCHEMES, target=TARGETS, command_id=st.none() | IDS, request_id=st.none() | IDS)
def test_admin_round_trip_property(
    scheme: TopicScheme, target: Target, command_id: int | None, request_id: int | None
) -> None:
    """Any valid invoke or cancel survives build then parse."""
    action = AdminAction.INVOKE if command_id is None else AdminAction.CANCEL
    topic = scheme.admin_topic(action, target, command_id)
    if request_id is not None:
        topic = f"{topic}/{request_id}"
    assert scheme.parse_admin(topic) == AdminRequest(
        topic=topic, action=action, target=target, command_id=command_id, request_id=request_id
    )
    assert scheme.parse_admin(status_topic(topic)) is None


def check_parse_outcome(parse: Callable[[str], DeviceRequest | AdminRequest | None], topic: str) -> None:
    """Parse one topic; any exception other than TopicError fails the calling test."""
    request: DeviceRequest | AdminRequest | None = None
    error: TopicError | None = None
    try:
        request = parse(topic)
    except TopicError as exc:
        error = exc
    if error is not None and error.reply_topic is not None:
        assert error.reply_topic == error_topic(topic)
        assert parse_positive_int(topic.split("/")[-1]) is not None
    if request is not None:
        assert request.topic == topic


@settings(max_examples=300, deadline=None)
@given(scheme=SCHEMES, topic=TOPIC_TEXT | LEVELLED_TOPICS)
def test_parse_never_raises_anything_but_bad_request(scheme: TopicScheme, topic: str) -> None:
    """Arbitrary topics parse to None or a request, or raise TopicError (a BadRequest); nothing else."""
    check_parse_outcome(scheme.parse_device, topic)
    check_parse_outcome(scheme.parse_admin, topic)


@settings(max_examples=300, deadline=None)
@given(scheme=SCHEMES, tail=LEVELLED_TOPICS)
def test_parse_inside_our_trees_never_raises_anything_but_bad_request(scheme: TopicScheme, tail: str) -> None:
    """Arbitrary levels under our own prefixes reach the deep parser and still raise only BadRequest."""
    check_parse_outcome(scheme.parse_device, f"{scheme.kp1_prefix}/app-v1/{scheme.extension}/{tail}")
    check_parse_outcome(scheme.parse_device, f"{scheme.endpoint_base('app-v1', 'dev1')}/{tail}")
    check_parse_outcome(scheme.parse_admin, f"{scheme.admin_prefix}/{tail}")
    check_parse_outcome(scheme.parse_admin, f"{scheme.admin_prefix}/app-v1/dev1/{tail}")
