"""Logins and topic isolation for the embedded broker, from the same files Mosquitto reads.

``password_file`` is Mosquitto's, as ``mosquitto_passwd`` writes it: ``user:$7$<iterations>$<salt>$<hash>``
(PBKDF2-HMAC-SHA512, Mosquitto 2.x) or ``user:$6$<salt>$<hash>`` (salted SHA-512, Mosquitto 1.x);
salt and hash are base64. Blank lines and ``#`` comments are skipped; anything else is a StartupError.

``acl_file`` is the subset of Mosquitto's ACL format that matters here::

    # comment
    topic [read|write|readwrite|deny] <filter>     before any user line: clients without a user name
    user <name>
    topic [read|write|readwrite|deny] <filter>     for that user
    pattern [read|write|readwrite|deny] <filter>   anywhere: every client, %u = user name, %c = client id

The access word may be left out (readwrite). As in Mosquitto: publishing needs write on the topic,
receiving a message needs read on its topic, and subscribing needs read on the filter, where a filter
counts only if an allowed filter covers *all* of it (``kp1/+/cex/%u/#`` allows ``kp1/a/cex/me/#`` but
not ``kp1/+/cex/+/#``). A matching deny rule wins over any allow rule; a subscription only partly
denied stands, and each delivery on it is checked. A pattern whose %u or %c would stand for an empty
value or one holding ``+``, ``#`` or ``/`` is skipped, so a client cannot widen a pattern through its
own name. ``topic`` lines before any ``user`` line are read but never apply here, since clients without
a user name are refused.

Policy:

- With a password file, every client must log in: clients without a user name are refused. The
  bridge's own client (its client id, user name = client id, and the per-process secret the runtime
  generates) always gets in and may do anything; nobody else may use the bridge's client id.
- A password file without an ACL file lets every logged-in user do everything (Mosquitto does the same).
- An ACL file without a password file is refused at startup: nobody could prove a user name, so its
  ``user`` sections could never apply.
- A client may not resume a persistent session that another user left behind, nor connect with a will
  on a topic it may not publish to.

Passwords are checked in a worker thread, so a slow hash never stalls the event loop; nothing is cached
beyond the parsed file.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import functools
import hashlib
import hmac
import logging
import os
import re
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntFlag, StrEnum
from pathlib import Path
from typing import Any

from amqtt.adapters import ReaderAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.mqtt.connect import ConnectPacket
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from broker_bridge.broker_acks import AckHolder, AckWhenHandled, DeferredAck, deferred_ack
from broker_bridge.errors import StartupError
from broker_bridge.routing import Subscriptions

_log = logging.getLogger(__name__)

PRINCIPAL = "broker_bridge.principal"  # key of our Principal in amqtt's Session.attributes
_MQTT_311 = 4
# CONNACK "connection refused: not authorised" (MQTT 3.1.1 return code 5), what Mosquitto answers too.
_CONNACK_REFUSED = bytes((0x20, 0x02, 0x00, 0x05))
_LOGIN_THREADS = min(4, os.cpu_count() or 1)


class Access(StrEnum):
    """What a client wants to do with a topic; the values are those of amqtt's Action."""

    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    RECEIVE = "receive"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a connection logged in as."""

    username: str | None
    client_id: str
    bridge: bool = False


# -- topics --------------------------------------------------------------------------------------


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` (a topic name) is matched by ``topic_filter``, as MQTT 3.1.1 defines it."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False  # [MQTT-4.7.2-1]
    wanted, levels = topic_filter.split("/"), topic.split("/")
    for index, level in enumerate(wanted):
        if level == "#":
            return True  # also matches the parent level itself: "a/#" matches "a"
        if index >= len(levels) or level not in ("+", levels[index]):
            return False
    return len(wanted) == len(levels)


def filter_covers(allowed: str, requested: str) -> bool:
    """Whether every topic that filter ``requested`` can match is also matched by filter ``allowed``."""
    if requested.startswith("$") and allowed[:1] in ("+", "#"):
        return False
    have, want = allowed.split("/"), requested.split("/")
    for index, level in enumerate(want):
        if index >= len(have):
            return False
        if have[index] == "#":
            return True
        if level == "#":
            return False  # "#" asks for every depth, which only "#" grants
        if have[index] != "+" and have[index] != level:
            return False  # a literal level covers only itself, never "+"
    return len(have) == len(want) or (len(have) == len(want) + 1 and have[-1] == "#")


def _valid_filter(topic_filter: str) -> bool:
    levels = topic_filter.split("/")
    return bool(topic_filter) and all(
        ("#" not in level or (level == "#" and index == len(levels) - 1)) and ("+" not in level or level == "+")
        for index, level in enumerate(levels)
    )


# -- password file -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Hash:
    iterations: int  # 0: Mosquitto 1.x salted SHA-512, one round
    salt: bytes
    digest: bytes

    def check(self, password: str) -> bool:
        secret = password.encode()
        if self.iterations:
            computed = hashlib.pbkdf2_hmac("sha512", secret, self.salt, self.iterations)
        else:
            computed = hashlib.sha512(secret + self.salt).digest()
        return hmac.compare_digest(computed, self.digest)


def _parse_hash(text: str) -> _Hash | None:
    parts = text.split("$")
    if len(parts) == 5 and parts[:2] == ["", "7"] and parts[2].isdigit() and int(parts[2]) > 0:
        iterations, salt, digest = int(parts[2]), parts[3], parts[4]
    elif len(parts) == 4 and parts[:2] == ["", "6"]:
        iterations, salt, digest = 0, parts[2], parts[3]
    else:
        return None
    try:
        return _Hash(iterations, base64.b64decode(salt, validate=True), base64.b64decode(digest, validate=True))
    except (binascii.Error, ValueError):
        return None


class PasswordFile:
    """A parsed Mosquitto password file."""

    def __init__(self, hashes: Mapping[str, _Hash]) -> None:
        self._hashes = dict(hashes)
        # Unknown users are checked against this too, so a refusal takes as long whether or not the name exists.
        slowest = max((known.iterations for known in self._hashes.values()), default=0)
        self._decoy = _Hash(slowest or 101, b"broker-bridge", b"")

    @classmethod
    def load(cls, path: Path) -> PasswordFile:
        return cls.parse(_read(path, "password file"), source=str(path))

    @classmethod
    def parse(cls, text: str, *, source: str = "password file") -> PasswordFile:
        hashes: dict[str, _Hash] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            username, sep, hashed = line.partition(":")
            parsed = _parse_hash(hashed) if sep and username else None
            if parsed is None:
                raise StartupError(
                    f"{source}:{number}: expected user:$7$... or user:$6$... as mosquitto_passwd writes them"
                )
            if username in hashes:
                raise StartupError(f"{source}:{number}: user {username!r} is listed twice")
            hashes[username] = parsed
        return cls(hashes)

    def verify(self, username: str, password: str) -> bool:
        """Whether the password is right; blocking (hundreds of ms for a strong hash), so run it in a thread."""
        known = self._hashes.get(username)
        if known is None:
            self._decoy.check(password)
            return False
        return known.check(password)


# -- ACL file ------------------------------------------------------------------------------------


class _Perm(IntFlag):
    DENY = 0
    READ = 1
    WRITE = 2


_ACCESS_WORDS = {"read": _Perm.READ, "write": _Perm.WRITE, "readwrite": _Perm.READ | _Perm.WRITE, "deny": _Perm.DENY}
_UNSAFE_IN_PATTERN = re.compile(r"[+#/]")


@dataclass(frozen=True, slots=True)
class _Rule:
    perm: _Perm
    topic: str


class Acl:
    """A parsed Mosquitto ACL file (see the module docstring for the subset understood)."""

    def __init__(
        self, *, anonymous: tuple[_Rule, ...], users: Mapping[str, tuple[_Rule, ...]], patterns: tuple[_Rule, ...]
    ) -> None:
        self._anonymous = anonymous
        self._users = dict(users)
        self._patterns = patterns

    @classmethod
    def load(cls, path: Path) -> Acl:
        return cls.parse(_read(path, "ACL file"), source=str(path))

    @classmethod
    def parse(cls, text: str, *, source: str = "ACL file") -> Acl:
        anonymous: list[_Rule] = []
        users: dict[str, list[_Rule]] = {}
        patterns: list[_Rule] = []
        section = anonymous
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            word, *more = re.split(r"\s+", line, maxsplit=1)
            rest = more[0].strip() if more else ""
            where = f"{source}:{number}"
            if word == "user":
                if not rest:
                    raise StartupError(f"{where}: 'user' needs a user name")
                section = users.setdefault(rest, [])
            elif word in ("topic", "pattern"):
                rule = _parse_rule(rest, where)
                (patterns if word == "pattern" else section).append(rule)
            else:
                raise StartupError(f"{where}: expected 'user', 'topic' or 'pattern', got {word!r}")
        return cls(
            anonymous=tuple(anonymous),
            users={name: tuple(rules) for name, rules in users.items()},
            patterns=tuple(patterns),
        )

    def permits(self, principal: Principal, access: Access, topic: str) -> bool:
        """Whether ``principal`` may publish to / receive from topic ``topic``, or subscribe to filter ``topic``."""
        rules = self._rules(principal)
        applies: Callable[[str, str], bool]
        if access is Access.SUBSCRIBE:
            applies = filter_covers
            needed = _Perm.READ
        else:
            if "+" in topic or "#" in topic:
                return False  # a topic name never holds a wildcard
            applies = topic_matches
            needed = _Perm.WRITE if access is Access.PUBLISH else _Perm.READ
        if any(rule.perm == _Perm.DENY and applies(rule.topic, topic) for rule in rules):
            return False
        return any(rule.perm & needed and applies(rule.topic, topic) for rule in rules)

    def _rules(self, principal: Principal) -> list[_Rule]:
        own = self._anonymous if principal.username is None else self._users.get(principal.username, ())
        rules = list(own)
        names = {"%u": principal.username or "", "%c": principal.client_id}
        for pattern in self._patterns:
            topic = pattern.topic
            for token, value in names.items():
                if token in topic:
                    if not value or _UNSAFE_IN_PATTERN.search(value):
                        break
                    topic = topic.replace(token, value)
            else:
                rules.append(_Rule(pattern.perm, topic))
        return rules


def _parse_rule(rest: str, where: str) -> _Rule:
    parts = rest.split(None, 1)
    if not parts:
        raise StartupError(f"{where}: a topic or pattern line needs a topic filter")
    if len(parts) == 1:
        perm, topic = _Perm.READ | _Perm.WRITE, parts[0]
    elif parts[0] in _ACCESS_WORDS:
        perm, topic = _ACCESS_WORDS[parts[0]], parts[1].strip()
    else:
        raise StartupError(f"{where}: access must be read, write, readwrite or deny, got {parts[0]!r}")
    if not _valid_filter(topic):
        raise StartupError(f"{where}: {topic!r} is not a valid MQTT topic filter")
    return _Rule(perm, topic)


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"cannot read the MQTT {what} {path}: {exc}") from exc


# -- the gate ------------------------------------------------------------------------------------


_Peer = tuple[str, int]


class AccessControl:
    """Decides who may connect and what each connection may do with which topic."""

    def __init__(
        self, *, bridge_client_id: str, bridge_password: str | None, passwords: PasswordFile, acl: Acl | None
    ) -> None:
        # None: the bridge is attached in-process and never logs in, so no login may use its id.
        if bridge_password == "":
            raise ValueError("with a password file the bridge needs a password of its own")
        self._bridge_client_id = bridge_client_id
        self._bridge_password = bridge_password
        self._passwords = passwords
        self.acl = acl
        # Our own threads: a burst of logins must not queue ahead of the DNS lookups and other work that
        # share the loop's default executor.
        self._threads = ThreadPoolExecutor(_LOGIN_THREADS, thread_name_prefix="mqtt-login")
        self._admitted: dict[_Peer, Principal] = {}

    @classmethod
    def from_files(
        cls, *, bridge_client_id: str, bridge_password: str | None, password_file: Path | None, acl_file: Path | None
    ) -> AccessControl | None:
        """The access control those files ask for; None when neither is given (anyone may do anything)."""
        if password_file is None:
            if acl_file is not None:
                raise StartupError(
                    f"the MQTT ACL file {acl_file} needs a password file (mqtt_password_file): without logins "
                    "nobody can prove a user name, so its user sections could never apply"
                )
            return None
        acl = Acl.load(acl_file) if acl_file is not None else None
        return cls(
            bridge_client_id=bridge_client_id,
            bridge_password=bridge_password,
            passwords=PasswordFile.load(password_file),
            acl=acl,
        )

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def login(self, *, client_id: str, username: str | None, password: str | None) -> Principal | None:
        """The principal these credentials prove, or None; the hash is computed in a worker thread."""
        if client_id == self._bridge_client_id:
            # The bridge's client id is reserved: taking it over would cut the bridge off its subscriptions.
            bridge = (
                self._bridge_password is not None
                and username == self._bridge_client_id
                and hmac.compare_digest((password or "").encode(), self._bridge_password.encode())
            )
            return Principal(username, client_id, bridge=True) if bridge else None
        if username is None:
            return None
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self._threads, self._passwords.verify, username, password or "")
        return Principal(username, client_id) if ok else None

    def permits(self, principal: Principal | None, access: Access, topic: str) -> bool:
        if principal is None:
            return False
        if principal.bridge or self.acl is None:
            return True
        return self.acl.permits(principal, access, topic)

    async def admit(self, connect: Any, peer: _Peer, sessions: Mapping[str, tuple[Any, Any]]) -> str | None:
        """Log a CONNECT in (hashes are checked in a thread); why it is refused, or None once admitted.
        LoginPlugin then finds the verdict by ``peer``."""
        principal = await self.login(client_id=connect.client_id, username=connect.username, password=connect.password)
        refusal = self._refusal(principal, connect, sessions)
        if refusal is None:
            assert principal is not None  # _refusal says so
            self._admitted[peer] = principal
        return refusal

    def _refusal(
        self, principal: Principal | None, connect: Any, sessions: Mapping[str, tuple[Any, Any]]
    ) -> str | None:
        if principal is None:
            return "bad or missing credentials"
        if connect.will_flag and not self.permits(principal, Access.PUBLISH, connect.will_topic or ""):
            return "will topic not writable"
        existing = sessions.get(principal.client_id)
        if not connect.clean_session_flag and existing is not None:
            owner: Principal | None = existing[0].attributes.get(PRINCIPAL)
            if owner is not None and (owner.username, owner.bridge) != (principal.username, principal.bridge):
                # Its subscriptions and queued messages were checked against another user's rights.
                return "persistent session belongs to another user"
        return None

    def claim(self, peer: _Peer) -> Principal | None:
        return self._admitted.pop(peer, None)

    def forget(self, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        if peer is not None:
            self._admitted.pop(peer, None)


async def screen(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    access: AccessControl | None,
    sessions: Mapping[str, tuple[Any, Any]],
    reserved: str | None,
) -> ReaderAdapter | None:
    """Read and check a connection's CONNECT before amqtt does: a reader that replays it to amqtt, or
    None once refused (with CONNACK "not authorised") or dropped.

    amqtt replaces or takes over a session with the same client id before it asks who the client is,
    so the login (``access``) and the ``reserved`` client id of the in-process bridge are checked
    here; so is a will topic with wildcards, which MQTT forbids and amqtt would route as it is."""
    source = _ReplayReader(reader)
    try:
        connect = await ConnectPacket.from_stream(source)
    except Exception as exc:  # garbage instead of a CONNECT: amqtt would drop the connection too
        _log.info("mqtt connection dropped: no valid CONNECT (%r)", exc)
        return None
    source.rewind()
    if connect.proto_name != "MQTT" or connect.proto_level != _MQTT_311:
        return source  # amqtt refuses these itself, with the right CONNACK, before touching any session
    peer = _peer(writer)
    if peer is None:
        return None
    will = connect.will_topic or ""
    refusal: str | None = None
    if reserved is not None and connect.client_id == reserved:
        refusal = "the bridge's own client id"
    elif connect.will_flag and ("+" in will or "#" in will):
        refusal = f"will topic {will!r} has wildcards"
    elif access is not None:
        refusal = await access.admit(connect, peer, sessions)
    if refusal is None:
        return source
    _log.info("mqtt connection refused: %s (client id %r, user %r)", refusal, connect.client_id, connect.username)
    writer.write(_CONNACK_REFUSED)
    await writer.drain()
    return None


def _peer(writer: asyncio.StreamWriter) -> _Peer | None:
    # The same (address, port) amqtt's StreamWriterAdapter.get_peer_info gives its Session.
    info = writer.get_extra_info("peername")
    return (info[0], info[1]) if info and len(info) >= 2 else None


class _ReplayReader(ReaderAdapter):  # type: ignore[misc]  # amqtt ships no type information
    """A StreamReaderAdapter that can hand amqtt the bytes of the CONNECT we already read."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._recorded: bytearray | None = bytearray()
        self._pending = bytearray()

    def rewind(self) -> None:
        self._pending, self._recorded = self._recorded or bytearray(), None

    async def read(self, n: int = -1) -> bytes:
        if self._pending:
            if n < 0:
                data = bytes(self._pending) + await self._reader.read()
                self._pending.clear()
                return data
            data = bytes(self._pending[:n])
            del self._pending[:n]
            return data + (await self._reader.readexactly(n - len(data)) if len(data) < n else b"")
        data = await (self._reader.read() if n < 0 else self._reader.readexactly(n))
        if self._recorded is not None:
            self._recorded += data
        return data

    def feed_eof(self) -> None:
        self._reader.feed_eof()


# -- amqtt plugins and broker --------------------------------------------------------------------


def principal_of(session: Any) -> Principal | None:
    found: Principal | None = session.attributes.get(PRINCIPAL) if session is not None else None
    return found


class LoginPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt's half of a login: accepts what ``screen`` admitted and labels the session."""

    @dataclass
    class Config:
        access: Any  # AccessControl; Any because dacite, which amqtt uses to build this, cannot check it

    async def authenticate(self, *, session: Any) -> bool:
        access: AccessControl = self.context.config.access
        admitted = access.claim((session.remote_address, session.remote_port))
        session.attributes.pop(PRINCIPAL, None)
        if admitted is None or admitted.username != session.username:
            return False  # not screened: cannot happen through EmbeddedBroker's listener
        # amqtt picks the id of a client that sent none only after our screen, so take it from the session.
        session.attributes[PRINCIPAL] = Principal(admitted.username, session.client_id, bridge=admitted.bridge)
        return True


class TopicAclPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt ships no type information
    """Applies the ACL to every publish, subscribe and delivery amqtt routes."""

    @dataclass
    class Config:
        access: Any  # AccessControl, see LoginPlugin.Config

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None, action: Any = None) -> bool:
        access: AccessControl = self.context.config.access
        if topic is None or action is None:
            return False
        return access.permits(principal_of(session), Access(str(action)), topic)


@functools.lru_cache(maxsize=65536)
def _literal_head(topic_filter: str) -> str:
    """The levels of a filter before its first wildcard: every topic it matches starts with them."""
    head: list[str] = []
    for level in topic_filter.split("/"):
        if level in ("+", "#") or "+" in level or "#" in level:
            break
        head.append(level)
    return "/".join(head)


# The PUBACK of the message the current client loop is routing (a task's context is its own).
_ROUTING: contextvars.ContextVar[DeferredAck | None] = contextvars.ContextVar("routing", default=None)
# The bridge's ``bridge.Receipt`` for the message its in-process session is routing, if it hands
# commands to a device: told when a device session is handed it, and when that device PUBACKs it.
# Plugin events see it too (amqtt runs them in tasks, which copy the context).
RECEIPT: contextvars.ContextVar[Any] = contextvars.ContextVar("receipt", default=None)


def names_endpoint(topic_filter: str) -> bool:
    """Whether a subscription names one endpoint (kp1/{av}/{ext}/{token}/...): a device's own, not a
    monitor's wildcard over many devices, whose receiving a push proves nothing."""
    levels = topic_filter.split("/")
    return len(levels) > 3 and all(level not in ("+", "#", "") for level in (levels[1], levels[3]))


def note_delivery(receipt: Any, sending: asyncio.Future[Any], qos: int) -> None:
    """Handed to a device's session now; with QoS 1 or 2, delivered once it acknowledges."""
    receipt.sent()
    if qos > 0:
        sending.add_done_callback(lambda done: _delivered(receipt, done))


def _delivered(receipt: Any, done: asyncio.Future[Any]) -> None:
    # False: the reply delivery of broker.py that failed (it says so in its result, not by raising).
    if not done.cancelled() and done.exception() is None and done.result() is not False:
        receipt.delivered()


class GuardedBroker(Broker):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt's Broker with two leaks closed (amqtt 0.12.1 internals, overridden whole), faster routing,
    and QoS 1 publishes acknowledged once their subscribers took them (broker_acks)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions = Subscriptions()  # the same table, indexed by filter (routing.py)
        # Set when the bridge's session closes (a stop): from then on no client's QoS 1 publish is
        # acknowledged, since nothing will store it (broker_acks.AckWhenHandled).
        self.acks_held = False

    async def _handle_message_delivery(self, client_session: Any, handler: Any, wait_deliver: Any) -> bool:
        ack = deferred_ack(wait_deliver.result())
        token = _ROUTING.set(ack)
        try:
            routed: bool = await super()._handle_message_delivery(client_session, handler, wait_deliver)
        finally:
            _ROUTING.reset(token)
            if ack is not None:
                ack.release()  # PUBACK now, unless a subscriber such as the bridge still holds it
        return routed

    async def _broadcast_message(
        self, session: Any, topic: str | None, data: bytes | bytearray | None, force_qos: int | None = None
    ) -> None:
        broadcast: dict[str, Any] = {"session": session, "topic": topic, "data": data}
        if force_qos is not None:
            broadcast["qos"] = force_qos
        if (ack := _ROUTING.get()) is not None:
            ack.hold()  # released once the broadcast has reached every subscriber
            broadcast["ack"] = ack
        if (receipt := RECEIPT.get()) is not None:
            broadcast["receipt"] = receipt
        await self._broadcast_queue.put(broadcast)

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[Any]]) -> None:
        broadcast = await self._broadcast_queue.get()
        ack: DeferredAck | None = broadcast.get("ack")
        try:
            await self._route(broadcast, running_tasks, ack)
        finally:
            if ack is not None:
                ack.release()

    async def _route(
        self, broadcast: dict[str, Any], running_tasks: deque[asyncio.Task[Any]], ack: DeferredAck | None
    ) -> None:
        # amqtt's _run_broadcast, with the matching filters looked up in the index instead of testing every
        # filter (O(subscriptions) per message: 9% of the embedded service's CPU with 100 devices).
        topic = broadcast["topic"]
        publisher = principal_of(broadcast.get("session"))
        sender = publisher.username if publisher is not None else None
        for topic_filter in self._subscriptions.matching(topic):
            for target_session, sub_qos in list(self._subscriptions.get(topic_filter, ())):
                qos = broadcast.get("qos", sub_qos)
                if not await self._topic_filtering(target_session, topic=topic, action=Action.RECEIVE):
                    self.logger.info(f"{target_session.client_id} not allowed to receive messages from TOPIC {topic}.")
                    continue
                connected = target_session.transitions.state == "connected"
                if not connected:
                    # amqtt's rule: queue for a persistent, non-anonymous session at QoS 1 or 2 [MQTT 3.1.2.4]
                    if not target_session.clean_session and qos in (1, 2) and not target_session.is_anonymous:
                        await self._retain_broadcast_message(broadcast, qos, target_session)
                    continue
                handler = self._get_handler(target_session)
                if isinstance(handler, AckHolder):
                    handler.take(topic, bytes(broadcast["data"]), qos, ack, sender)  # at once: keeps routing order
                elif handler:
                    sending = asyncio.ensure_future(handler.mqtt_publish(topic, broadcast["data"], qos, retain=False))
                    if (receipt := broadcast.get("receipt")) is not None and names_endpoint(topic_filter):
                        note_delivery(receipt, sending, qos)
                    running_tasks.append(sending)

    def _matches(self, topic: str, a_filter: str) -> bool:
        # amqtt routes every message by testing it against every subscription filter (10% of the
        # embedded broker's CPU under the benchmark load, where most filters are other devices'). A
        # wildcard filter's literal head is cached, so a filter for another endpoint fails on one
        # startswith instead of a split of both strings; what passes gets amqtt's own full test.
        if "+" not in a_filter and "#" not in a_filter:
            return topic == a_filter
        if not topic.startswith(_literal_head(a_filter)):
            return False
        matched: bool = super()._matches(topic, a_filter)
        return matched

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[Any, Any]:
        handler, session = await super()._initialize_client_session(reader, writer, remote_address, remote_port)
        AckWhenHandled.adopt(handler, lambda: self.acks_held)
        # A resumed persistent session keeps the address of its previous connection; LoginPlugin finds the
        # screened verdict by the current one.
        session.remote_address, session.remote_port = remote_address, remote_port
        return handler, session

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Any) -> None:
        # amqtt sends retained messages without the RECEIVE check its live routing makes, and on every CONNECT
        # calls this for every filter *any* client holds: send only what this session subscribed to and may read.
        topic_filter, qos = subscription
        holders = self._subscriptions.get(topic_filter, ())
        handler = self._get_handler(session)
        if handler is None or all(held.client_id != session.client_id for held, _ in holders):
            return
        sends = []
        for retained in list(self._retained_messages.values()):
            if self._matches(retained.topic, topic_filter) and await self._topic_filtering(
                session, retained.topic, Action.RECEIVE
            ):
                send = handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)
                sends.append(asyncio.ensure_future(send))
        if sends:
            await asyncio.wait(sends)
