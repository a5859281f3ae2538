"""The embedded broker: endpoint association, direct reply delivery, startup and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import aiomqtt
import paho.mqtt.client as mqtt
import pytest
from amqtt.broker import Broker
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from broker_bridge.bridge import Delivered
from broker_bridge.broker import EmbeddedBroker, InProcessLink, LinkClosed
from broker_bridge.broker_auth import GuardedBroker
from broker_bridge.errors import StartupError

BRIDGE_ID = "broker-bridge-test"
TIMEOUT = 5.0
QUIET = 0.5  # how long "nothing arrives" is watched for, after a barrier made it very likely already
PAYLOAD = b'[{"id":1,"payload":{}}]'


class Seen:
    """Records on_endpoint_seen calls so tests can wait for them."""

    def __init__(self) -> None:
        self.calls: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    async def __call__(self, app_version: str, token: str) -> None:
        self.calls.put_nowait((app_version, token))

    async def next(self) -> tuple[str, str]:
        return await asyncio.wait_for(self.calls.get(), TIMEOUT)


class Device:
    """A Kaa-style paho-mqtt device: it registers message callbacks and never has to subscribe."""

    def __init__(self, port: int, client_id: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._port = port
        self.replies: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._subscribed = asyncio.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_connect = lambda *_: self._call(self._connected.set)
        self.client.on_disconnect = lambda *_: self._call(self._disconnected.set)
        self.client.on_subscribe = lambda *_: self._call(self._subscribed.set)

    def _call(self, func: Callable[..., Any], *args: Any) -> None:
        # paho calls back from its own thread; a late callback after the loop closed must not raise there.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(func, *args)

    def on_reply(self, topic: str) -> None:
        self.client.message_callback_add(
            topic, lambda _c, _u, msg: self._call(self.replies.put_nowait, (msg.topic, msg.payload))
        )

    async def connect(self) -> None:
        self.client.connect("127.0.0.1", self._port)
        self.client.loop_start()
        await asyncio.wait_for(self._connected.wait(), TIMEOUT)

    async def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        await asyncio.wait_for(self._subscribed.wait(), TIMEOUT)

    def publish(self, topic: str, payload: bytes = b"{}") -> None:
        self.client.publish(topic, payload, qos=1)

    async def stop(self) -> None:
        self.client.disconnect()
        await asyncio.wait_for(self._disconnected.wait(), TIMEOUT)
        self.client.loop_stop()

    async def reply(self) -> tuple[str, bytes]:
        return await asyncio.wait_for(self.replies.get(), TIMEOUT)


async def assert_quiet(queue: asyncio.Queue[Any]) -> None:
    """Nothing more arrives on queue within QUIET seconds."""
    try:
        item = await asyncio.wait_for(queue.get(), QUIET)
    except TimeoutError:
        return
    pytest.fail(f"unexpected {item!r}")


def token() -> str:
    return f"tok-{uuid.uuid4().hex[:8]}"


def status_topic(app_version: str, endpoint: str) -> str:
    return f"kp1/{app_version}/cex/{endpoint}/command/reboot/status"


@pytest.fixture
def seen() -> Seen:
    """The on_endpoint_seen recorder of the broker under test."""
    return Seen()


@pytest.fixture(params=["tcp", "in-process"])
def bridge_mode(request: pytest.FixtureRequest) -> str:
    """How the bridge reaches the broker: as a TCP client, or through the broker's in-process link."""
    mode: str = request.param
    return mode


@pytest.fixture
async def broker(port: int, seen: Seen, bridge_mode: str) -> AsyncIterator[EmbeddedBroker]:
    """A running embedded broker on a free port."""
    async with EmbeddedBroker(
        host="127.0.0.1",
        port=port,
        bridge_client_id=BRIDGE_ID,
        on_endpoint_seen=seen,
        in_process_bridge=bridge_mode == "in-process",
    ) as running:
        yield running


@pytest.fixture
async def device(broker: EmbeddedBroker, port: int) -> AsyncIterator[Callable[[str], Awaitable[Device]]]:
    """Makes connected devices; stops those still running before the broker stops."""
    made: list[Device] = []

    async def make(client_id: str) -> Device:
        made.append(Device(port, client_id))
        await made[-1].connect()
        return made[-1]

    yield make
    for one in made:
        one.client.disconnect()
        one.client.loop_stop()


class Publisher(Protocol):
    async def publish(self, topic: str, payload: bytes, *, qos: int) -> None: ...


class LinkPublisher:
    """The in-process link behind the aiomqtt publish call the tests make."""

    def __init__(self, link: InProcessLink) -> None:
        self.link = link

    async def publish(self, topic: str, payload: bytes, *, qos: int) -> None:
        await self.link.send(topic, payload, qos=qos)


@pytest.fixture
async def bridge(broker: EmbeddedBroker, port: int, bridge_mode: str) -> AsyncIterator[Publisher]:
    """The bridge's publishing side: an aiomqtt client using the bridge's client id, or the link."""
    if bridge_mode == "in-process":
        yield LinkPublisher(broker.link)
        return
    async with aiomqtt.Client("127.0.0.1", port, identifier=BRIDGE_ID) as client:
        yield client


async def test_unsubscribed_device_gets_reply(
    device: Callable[[str], Awaitable[Device]], bridge: Publisher, seen: Seen, app_version: str
) -> None:
    """A device that never subscribes is announced once and still receives its status reply."""
    endpoint = token()
    dev = await device("dev-1")
    dev.on_reply(status_topic(app_version, endpoint))
    dev.publish(f"kp1/{app_version}/dcx/{endpoint}/json/32")
    dev.publish(f"kp1/{app_version}/dcx/{endpoint}/json/33")
    assert await seen.next() == (app_version, endpoint)
    await bridge.publish(status_topic(app_version, endpoint), PAYLOAD, qos=1)
    assert await dev.reply() == (status_topic(app_version, endpoint), PAYLOAD)
    await assert_quiet(seen.calls)


async def test_subscribed_device_gets_one_copy(
    device: Callable[[str], Awaitable[Device]], bridge: Publisher, seen: Seen, app_version: str
) -> None:
    """A device subscribed to its status topic receives each reply exactly once."""
    endpoint = token()
    dev = await device("dev-sub")
    dev.on_reply(status_topic(app_version, endpoint))
    await dev.subscribe(status_topic(app_version, endpoint))
    assert await seen.next() == (app_version, endpoint)
    dev.publish(f"kp1/{app_version}/cex/{endpoint}/command/reboot")
    await bridge.publish(status_topic(app_version, endpoint), PAYLOAD, qos=1)
    assert await dev.reply() == (status_topic(app_version, endpoint), PAYLOAD)
    await assert_quiet(dev.replies)


async def test_replies_reach_only_their_endpoint(
    device: Callable[[str], Awaitable[Device]], bridge: Publisher, seen: Seen, app_version: str
) -> None:
    """A reply reaches only its endpoint's devices; the bridge's own publishes associate nothing."""
    mine, other, stray = token(), token(), token()
    everything = f"kp1/{app_version}/cex/+/command/+/status"
    dev_mine, dev_other = await device("dev-mine"), await device("dev-other")
    for dev, endpoint in ((dev_mine, mine), (dev_other, other)):
        dev.on_reply(everything)
        dev.publish(f"kp1/{app_version}/dcx/{endpoint}/json/1")
    assert {await seen.next(), await seen.next()} == {(app_version, mine), (app_version, other)}
    await bridge.publish(f"kp1/{app_version}/cex/{stray}/command/reboot", b"{}", qos=1)
    for endpoint in (stray, mine, other):
        await bridge.publish(status_topic(app_version, endpoint), PAYLOAD, qos=1)
    # Replies go out in publish order, so each device's first reply being its own rules out earlier ones.
    assert await dev_mine.reply() == (status_topic(app_version, mine), PAYLOAD)
    assert await dev_other.reply() == (status_topic(app_version, other), PAYLOAD)
    await assert_quiet(dev_mine.replies)
    await assert_quiet(dev_other.replies)
    await assert_quiet(seen.calls)


async def test_reconnect_announces_again(
    device: Callable[[str], Awaitable[Device]], bridge: Publisher, seen: Seen, app_version: str
) -> None:
    """A device that reconnects is announced again and receives replies on its new connection."""
    endpoint = token()
    first = await device("dev-re")
    first.publish(f"kp1/{app_version}/dcx/{endpoint}/json/1")
    assert await seen.next() == (app_version, endpoint)
    await first.stop()
    second = await device("dev-re")
    second.on_reply(status_topic(app_version, endpoint))
    second.publish(f"kp1/{app_version}/dcx/{endpoint}/json/1")
    assert await seen.next() == (app_version, endpoint)
    await bridge.publish(status_topic(app_version, endpoint), PAYLOAD, qos=1)
    assert await second.reply() == (status_topic(app_version, endpoint), PAYLOAD)


async def test_takeover_keeps_new_connection(
    device: Callable[[str], Awaitable[Device]], bridge: Publisher, seen: Seen, app_version: str
) -> None:
    """A new connection under a client id still in use is announced, and the old one leaving keeps it."""
    endpoint = token()
    old = await device("dev-dup")
    old.publish(f"kp1/{app_version}/dcx/{endpoint}/json/1")
    assert await seen.next() == (app_version, endpoint)
    new = await device("dev-dup")
    new.on_reply(status_topic(app_version, endpoint))
    new.publish(f"kp1/{app_version}/dcx/{endpoint}/json/1")
    assert await seen.next() == (app_version, endpoint)
    await old.stop()
    await bridge.publish(status_topic(app_version, endpoint), PAYLOAD, qos=1)
    assert await new.reply() == (status_topic(app_version, endpoint), PAYLOAD)


async def test_failing_callback_is_logged(port: int, app_version: str, caplog: pytest.LogCaptureFixture) -> None:
    """An exception from on_endpoint_seen is logged and the reply is still delivered."""

    async def explode(app_version: str, token: str) -> None:
        raise RuntimeError("boom")

    endpoint, dev = token(), Device(port, "dev-boom")
    async with EmbeddedBroker(host="127.0.0.1", port=port, bridge_client_id=BRIDGE_ID, on_endpoint_seen=explode):
        try:
            await dev.connect()
            dev.on_reply(status_topic(app_version, endpoint))
            dev.publish(f"kp1/{app_version}/dcx/{endpoint}/json/1")
            async with aiomqtt.Client("127.0.0.1", port, identifier=BRIDGE_ID) as bridge:
                await bridge.publish(status_topic(app_version, endpoint), PAYLOAD, qos=1)
                assert await dev.reply() == (status_topic(app_version, endpoint), PAYLOAD)
        finally:
            dev.client.disconnect()
            dev.client.loop_stop()
    assert any("on_endpoint_seen failed" in r.message and r.exc_info for r in caplog.records)


async def test_port_taken(port: int) -> None:
    """A taken listen address fails with a StartupError that names both ways out."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(StartupError) as caught:
            async with EmbeddedBroker(host="127.0.0.1", port=port, bridge_client_id=BRIDGE_ID, on_endpoint_seen=Seen()):
                pytest.fail("the broker started on a taken port")
    reason = caught.value.reason
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in reason
    assert "--mqtt-listen" in reason
    assert "--broker-url" in reason


async def test_shutdown_with_clients_connected(port: int, app_version: str) -> None:
    """Shutdown is prompt with devices and a half-open socket connected and a callback still running."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hang(app_version: str, token: str) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    embedded = EmbeddedBroker(host="127.0.0.1", port=port, bridge_client_id=BRIDGE_ID, on_endpoint_seen=hang)
    await embedded.__aenter__()
    devices = [Device(port, f"dev-{n}") for n in range(3)]
    half_open = socket.create_connection(("127.0.0.1", port))  # connected, but never sends CONNECT
    try:
        for dev in devices:
            await dev.connect()
        await devices[0].subscribe(status_topic(app_version, token()))
        devices[1].publish(f"kp1/{app_version}/dcx/{token()}/json/1")
        await asyncio.wait_for(started.wait(), TIMEOUT)
        await asyncio.wait_for(embedded.__aexit__(None, None, None), TIMEOUT)
        assert cancelled.is_set()
    finally:
        half_open.close()
        for dev in devices:
            dev.client.loop_stop()


@pytest.fixture
async def linked(port: int, seen: Seen) -> AsyncIterator[InProcessLink]:
    """The in-process link of a running embedded broker, subscribed as the bridge subscribes."""
    async with EmbeddedBroker(
        host="127.0.0.1", port=port, bridge_client_id=BRIDGE_ID, on_endpoint_seen=seen, in_process_bridge=True
    ) as running:
        await running.link.subscribe(["kp1/+/cex/+/command/#", "kp1/+/cex/+/result/#"])
        yield running.link


async def wait_until(condition: Callable[[], bool], within_s: float = TIMEOUT) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def next_message(messages: AsyncIterator[Delivered]) -> Delivered:
    return await asyncio.wait_for(anext(messages), TIMEOUT)


async def test_link_receives_in_publish_order(linked: InProcessLink, port: int, app_version: str) -> None:
    """Every QoS 1 message a device sends reaches the link, in order; the link's own replies do not."""
    endpoint = token()
    messages = linked.messages()
    async with aiomqtt.Client("127.0.0.1", port, identifier="dev-order", max_inflight_messages=200) as dev:
        # All in flight at once, so the broker's reading, routing and delivery overlap.
        topic = f"kp1/{app_version}/cex/{endpoint}/result/reboot"
        reading = asyncio.create_task(take_and_ack(linked, messages, 200))
        await asyncio.gather(*(dev.publish(f"{topic}/{n}", str(n).encode(), qos=1) for n in range(200)))
        got = await reading
    assert [m.payload for m in got] == [str(n).encode() for n in range(200)]
    assert {(m.topic.rsplit("/", 1)[0], m.qos) for m in got} == {(f"kp1/{app_version}/cex/{endpoint}/result/reboot", 1)}
    await linked.send(status_topic(app_version, endpoint), PAYLOAD, qos=1)  # matches command/#: a reply
    async with aiomqtt.Client("127.0.0.1", port, identifier="dev-after") as dev:
        reading = asyncio.create_task(take_and_ack(linked, messages, 1))
        await dev.publish(f"kp1/{app_version}/cex/{endpoint}/command/reboot", b"{}", qos=1)
    assert (await reading)[0].topic == f"kp1/{app_version}/cex/{endpoint}/command/reboot"
    assert linked.queued == 0


async def test_device_publish_acknowledged_only_once_the_bridge_acks(
    linked: InProcessLink, port: int, app_version: str
) -> None:
    """A device's QoS 1 result gets its PUBACK once the bridge acks it, not when the broker queued it;
    a publish the bridge does not take is acknowledged at once."""
    messages = linked.messages()
    async with aiomqtt.Client("127.0.0.1", port, identifier="dev-ack") as dev:
        await asyncio.wait_for(dev.publish(f"elsewhere/{token()}", b"x", qos=1), TIMEOUT)
        result = asyncio.create_task(dev.publish(f"kp1/{app_version}/cex/{token()}/result/reboot", b"[]", qos=1))
        message = await next_message(messages)
        await asyncio.sleep(QUIET)
        assert not result.done(), "PUBACKed before the bridge handled the message"
        linked.ack(message)
        await asyncio.wait_for(result, TIMEOUT)


async def test_unacked_messages_stay_unacknowledged_after_the_link_closes(
    port: int, seen: Seen, app_version: str
) -> None:
    """A backlog the bridge never handled (a stop) was never acknowledged: the device still owns it."""
    async with EmbeddedBroker(
        host="127.0.0.1", port=port, bridge_client_id=BRIDGE_ID, on_endpoint_seen=seen, in_process_bridge=True
    ) as running:
        await running.link.subscribe(["kp1/+/cex/+/result/#"])
        acked: list[int] = []
        dev = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-backlog")
        dev.on_publish = lambda _c, _u, mid, _rc, _p: acked.append(mid)
        dev.connect("127.0.0.1", port)
        dev.loop_start()
        try:
            topic = f"kp1/{app_version}/cex/{token()}/result/reboot"
            mids = [dev.publish(topic, str(n), qos=1).mid for n in range(50)]
            messages = running.link.messages()
            first = [await next_message(messages) for _ in range(10)]
            for message in first:
                running.link.ack(message)
            await wait_until(lambda: len(acked) >= 10)
            await asyncio.sleep(QUIET)
            assert sorted(acked) == sorted(mids[:10])
        finally:
            dev.disconnect()
            await asyncio.to_thread(dev.loop_stop)


async def take_and_ack(link: InProcessLink, messages: AsyncIterator[Delivered], count: int) -> list[Delivered]:
    """What the bridge does: take each message, then acknowledge it."""
    got = []
    for _ in range(count):
        got.append(message := await next_message(messages))
        link.ack(message)
    return got


async def test_link_retains_and_clears(linked: InProcessLink, port: int, app_version: str) -> None:
    """A retained publish through the link is kept for later subscribers; an empty one removes it."""
    topic = status_topic(app_version, token())
    await linked.send(topic, PAYLOAD, qos=1, retain=True)
    async with aiomqtt.Client("127.0.0.1", port, identifier="late-1") as late:
        await late.subscribe(topic, qos=1)
        message = await asyncio.wait_for(anext(late.messages), TIMEOUT)
        assert (message.payload, message.retain) == (PAYLOAD, True)
    await linked.send(topic, b"", qos=1, retain=True)
    async with aiomqtt.Client("127.0.0.1", port, identifier="late-2") as late:
        await late.subscribe(topic, qos=1)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(late.messages), QUIET)


@pytest.mark.parametrize("clean_session", [True, False])
async def test_link_client_id_is_reserved(
    linked: InProcessLink, port: int, app_version: str, clean_session: bool
) -> None:
    """No connection can take the link's client id, which would replace or take over its session."""
    with pytest.raises(aiomqtt.MqttError, match=r"[Nn]ot authori[sz]ed"):
        async with aiomqtt.Client("127.0.0.1", port, identifier=BRIDGE_ID, clean_session=clean_session):
            pass
    messages = linked.messages()
    async with aiomqtt.Client("127.0.0.1", port, identifier="dev-still") as dev:
        reading = asyncio.create_task(take_and_ack(linked, messages, 1))
        await dev.publish(f"kp1/{app_version}/cex/{token()}/command/reboot", b"{}", qos=1)
    assert (await reading)[0].payload == b"{}"


async def test_will_topic_with_wildcards_is_refused(linked: InProcessLink, port: int, app_version: str) -> None:
    """MQTT forbids wildcards in a will topic; amqtt would route such a will as it is, so it is refused."""
    will = aiomqtt.Will(f"kp1/{app_version}/cex/+/command/reboot", b"{}")
    with pytest.raises(aiomqtt.MqttError, match=r"[Nn]ot authori[sz]ed"):
        async with aiomqtt.Client("127.0.0.1", port, identifier="dev-wild-will", will=will):
            pass
    fine = aiomqtt.Will(f"kp1/{app_version}/cex/{token()}/command/reboot", b"{}")
    async with aiomqtt.Client("127.0.0.1", port, identifier="dev-fine-will", will=fine):
        pass


async def test_link_close_fails_what_is_not_routed(port: int, seen: Seen, app_version: str) -> None:
    """Closing the link fails queued and later publishes and ends its messages, instead of hanging."""
    async with EmbeddedBroker(
        host="127.0.0.1", port=port, bridge_client_id=BRIDGE_ID, on_endpoint_seen=seen, in_process_bridge=True
    ) as running:
        link = running.link
        messages = link.messages()
        queued = link.send(status_topic(app_version, token()), PAYLOAD, qos=1)  # the link's task has not run yet
        await link.close()
        with pytest.raises(LinkClosed):
            await queued
        with pytest.raises(LinkClosed):
            await link.send(status_topic(app_version, token()), PAYLOAD, qos=1)
        with pytest.raises(LinkClosed):
            await next_message(messages)


_LEVELS = st.sampled_from(["", "a", "b", "ab", "$SYS", "kp1", "+", "#", "a+", "b#"])


@settings(max_examples=3000, deadline=None)
@given(
    topic=st.lists(_LEVELS.filter(lambda lvl: lvl not in ("+", "#", "a+", "b#")), min_size=1, max_size=5),
    topic_filter=st.lists(_LEVELS, min_size=1, max_size=5),
)
def test_fast_routing_matches_exactly_as_amqtt(topic: list[str], topic_filter: list[str]) -> None:
    """GuardedBroker's cached-prefix shortcut decides every (topic, filter) pair as amqtt's own test does."""
    broker = GuardedBroker.__new__(GuardedBroker)  # _matches needs only the logger
    broker.logger = logging.getLogger("amqtt.test")
    joined_topic, joined_filter = "/".join(topic), "/".join(topic_filter)
    assert broker._matches(joined_topic, joined_filter) == Broker._matches(broker, joined_topic, joined_filter)


async def test_what_reaches_a_closed_bridge_session_is_not_acknowledged(
    linked: InProcessLink, port: int, app_version: str
) -> None:
    """After the bridge's session closed (a stop under way), the broker may still read a device's
    backlog: none of it may be PUBACKed, or the device forgets results nobody stored. (Before: the
    link's subscriptions were gone, so the broker PUBACKed such results at once.)"""
    async with aiomqtt.Client("127.0.0.1", port, identifier="dev-late") as dev:
        await linked.close()
        late = asyncio.create_task(dev.publish(f"kp1/{app_version}/cex/{token()}/result/reboot", b"[]", qos=1))
        await asyncio.sleep(QUIET)
        assert not late.done(), "PUBACKed a result that reached a closed bridge session"
        other = asyncio.create_task(dev.publish(f"elsewhere/{token()}", b"x", qos=1))
        await asyncio.sleep(QUIET)
        assert not other.done(), "the stopping broker still acknowledges publishes"
        for task in (late, other):
            task.cancel()
        await asyncio.gather(late, other, return_exceptions=True)
