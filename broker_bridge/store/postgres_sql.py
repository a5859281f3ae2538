"""SQL text of the PostgreSQL store: the SQLite store's statements where PostgreSQL takes them as
they are (``?`` placeholders are numbered here), its own where the engines differ."""

from __future__ import annotations

import functools
import re

from broker_bridge.store import sqlite_rows as rows
from broker_bridge.store.postgres_schema import LOCK_SPACE

OPEN = "('pending', 'in_progress')"
FINISHED = "('executed', 'expired', 'cancelled')"
INSTANCE_SPACE = LOCK_SPACE + 1  # advisory locks held by running instances, keyed by hashtext(name)
PUSH_SPACE = LOCK_SPACE + 2  # advisory locks held while a target's list is read and published


@functools.cache
def numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2, ...`` (no statement here has a literal ``?``)."""
    counter = iter(range(1, 10_000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


COLUMNS = rows.COLUMNS
INSERT = numbered(
    "INSERT INTO commands (app_version, endpoint_token, command_type, payload, state, created_at, "
    "updated_at, expires_at, request_name, ephemeral, idempotency_key, rerun_of, invoked_by, device_seen, announced, "
    "announcer) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?) ON CONFLICT DO NOTHING RETURNING id"
)
# An invoke's insert, unless the endpoint already has $15 open commands: one round trip instead of a
# count and an insert. No row back: the limit, or the idempotency key taken (the caller tells which).
SUBMIT = (
    "INSERT INTO commands (app_version, endpoint_token, command_type, payload, state, created_at, "
    "updated_at, expires_at, request_name, ephemeral, idempotency_key, rerun_of, invoked_by, device_seen, announced, "
    "announcer) SELECT $1, $2, $3, $4, 'pending', $5, $6, $7, $8, $9, $10, $11, $12, $13, 0, $14 "
    "WHERE (SELECT count(*) "
    f"FROM commands WHERE app_version = $1 AND endpoint_token = $2 AND state IN {OPEN}) < $15 "
    "ON CONFLICT DO NOTHING RETURNING id"
)
# SUBMIT and, when it inserted, MARK_RETAINED_IF_OBSERVED: the invoke of several instances in one
# round trip (each statement of a batch costs the writer a round trip; measured with py-spy).
SUBMIT_MARKING = (
    f"WITH created AS ({SUBMIT}), marked AS (INSERT INTO observers (app_version, endpoint_token, "
    "command_type, retained, retained_format) SELECT $1, $2, $3, 1, '' FROM created "
    "ON CONFLICT (app_version, endpoint_token, command_type) DO UPDATE SET retained = 1, "
    "retained_format = observers.format WHERE observers.observe = 1 AND observers.retained = 0) "
    "SELECT id FROM created"
)
FIND_IDEMPOTENT = numbered(rows.FIND_IDEMPOTENT)
SELECT_ONE = f"SELECT {COLUMNS} FROM commands WHERE id = $1"
# Reports and cancels lock the row they decide on: another instance's decision on it waits.
SELECT_FOR_UPDATE = SELECT_ONE + " FOR UPDATE"
SELECT_MANY_FOR_UPDATE = f"SELECT {COLUMNS} FROM commands WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE"
UPDATE = numbered(
    "UPDATE commands SET state = ?, status_code = ?, reason_phrase = ?, result_payload = ?, updated_at = ?, "
    "log = ?, sent_at = coalesce(sent_at, ?), delivered_at = coalesce(delivered_at, ?), announced = 0, "
    "announcer = ? WHERE id = ? AND state = ? AND updated_at = ?"
)
# UPDATE for many rows at once (the reports and cancels of one batch), each only from the version it
# was decided on; RETURNING tells which were written.
UPDATE_MANY = (
    "UPDATE commands SET state = u.state, status_code = u.status_code, reason_phrase = u.reason_phrase, "
    "result_payload = u.result_payload, updated_at = u.updated_at, log = u.log, "
    "sent_at = coalesce(commands.sent_at, u.sent_at), delivered_at = coalesce(commands.delivered_at, u.delivered_at), "
    "announced = 0, announcer = $12 "
    "FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::bigint[], "
    "$8::bigint[], $9::bigint[], $10::text[], $11::bigint[]) AS u(state, status_code, reason_phrase, result_payload, "
    "updated_at, log, sent_at, delivered_at, id, old_state, old_updated_at) "
    "WHERE commands.id = u.id AND commands.state = u.old_state "
    "AND commands.updated_at = u.old_updated_at RETURNING commands.id"
)
OPEN_COUNT = numbered(rows.OPEN_COUNT)
OUTSTANDING = numbered(rows.OUTSTANDING)
OPEN_TARGETS = numbered(rows.OPEN_TARGETS)
OPEN_TARGETS_OF = numbered(rows.OPEN_TARGETS + " AND app_version = ? AND endpoint_token = ? ORDER BY command_type")
SELECT_OBSERVER = numbered(rows.SELECT_OBSERVER)
# Deliveries in one round trip (one target, or a push loop's chunk): for each target, numbered by its
# place in the arrays ($1-$3: app versions, tokens, types; $4: now), the observer's columns (NULL
# when it has no row) on every row, then its outstanding commands (none: one row of NULLs).
# Measured: separate observer and list reads were 40% of the store's time under load.
DELIVERIES = (
    "SELECT t.n, o.observe, o.format, CASE WHEN o.retained = 1 THEN coalesce(o.retained_format, o.format) END, "
    + ", ".join(f"c.{column.strip()}" for column in COLUMNS.split(","))
    + " FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS t(av, token, type, n) "
    "LEFT JOIN observers o ON o.app_version = t.av AND o.endpoint_token = t.token AND o.command_type = t.type "
    f"LEFT JOIN LATERAL (SELECT {COLUMNS} FROM commands WHERE app_version = t.av AND endpoint_token = t.token "
    f"AND command_type = t.type AND state IN {OPEN} AND expires_at > $4 ORDER BY id LIMIT $5) c ON true "
    "ORDER BY t.n, c.id"
)
ON_TARGET = "ON CONFLICT (app_version, endpoint_token, command_type)"
UPSERT_OBSERVER = numbered(
    "INSERT INTO observers AS o (app_version, endpoint_token, command_type, observe, format) "
    f"VALUES (?, ?, ?, ?, ?) {ON_TARGET} DO UPDATE SET observe = excluded.observe, format = excluded.format, "
    "retained_format = CASE WHEN o.retained = 1 THEN coalesce(o.retained_format, o.format) END"
)
MARK_RETAINED = numbered(
    "INSERT INTO observers (app_version, endpoint_token, command_type, retained, retained_format) "
    f"VALUES (?, ?, ?, 1, ?) {ON_TARGET} DO UPDATE SET retained = 1, retained_format = excluded.retained_format"
)
CLEAR_RETAINED = numbered(rows.CLEAR_RETAINED)
# The same for many targets (none twice: ON CONFLICT cannot touch a row twice in one statement).
MARK_RETAINED_MANY = (
    "INSERT INTO observers (app_version, endpoint_token, command_type, retained, retained_format) "
    "SELECT av, token, type, 1, fmt FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) "
    f"AS t(av, token, type, fmt) {ON_TARGET} DO UPDATE SET retained = 1, retained_format = excluded.retained_format"
)
# Rows another transaction holds are skipped, not waited for: that one is an invoke marking the
# target (its open command forbids the clear) or a poll (the mark stays, and only costs a deletion
# published later). Waiting made cycles with the other instances' batches (measured: 26 lock
# timeouts, each 100 ms and a batch run again one by one, in 8 s of two instances' load).
CLEAR_RETAINED_MANY = (
    "UPDATE observers SET retained = 0, retained_format = NULL WHERE (app_version, endpoint_token, command_type) "
    "IN (SELECT o.app_version, o.endpoint_token, o.command_type FROM observers o "
    "JOIN unnest($1::text[], $2::text[], $3::text[]) AS t(av, token, type) "
    "ON o.app_version = t.av AND o.endpoint_token = t.token AND o.command_type = t.type WHERE (o.observe = 0 "
    "OR NOT EXISTS (SELECT 1 FROM commands c WHERE c.app_version = t.av AND c.endpoint_token = t.token "
    f"AND c.command_type = t.type AND c.state IN {OPEN})) FOR UPDATE OF o SKIP LOCKED)"
)
RETAINED_TARGETS = rows.RETAINED_TARGETS
# Several instances sweep at once without waiting for each other: rows another sweep holds are skipped.
EXPIRE_DUE = (
    "UPDATE commands SET state = 'expired', updated_at = $1, announced = 0, announcer = $4 WHERE id IN ("
    f"SELECT id FROM (SELECT id FROM commands WHERE state IN {OPEN} AND expires_at <= $1 "
    "ORDER BY expires_at LIMIT $2) due ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) "
    "RETURNING id, app_version, endpoint_token, command_type"
)
GET_MANY = f"SELECT {COLUMNS} FROM commands WHERE id = ANY($1::bigint[]) ORDER BY id"
PURGE_FINISHED = (
    f"DELETE FROM commands WHERE id IN (SELECT id FROM commands WHERE state IN {FINISHED} "
    "AND updated_at < $1 ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
)
PURGE_EPHEMERAL = (
    "DELETE FROM commands WHERE id IN (SELECT id FROM commands WHERE ephemeral = 1 "
    "AND created_at < $1 ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
)
# A row another transaction holds is skipped: that one is changing it (a report, a cancel: its new
# state gets an event of its own) or adopting it; a mark skipped so only republishes the event after
# a reconnect (events are at least once). Waiting made lock cycles between instances (see above).
MARK_ANNOUNCED = (
    "UPDATE commands SET announced = 1 WHERE id IN (SELECT c.id FROM commands c "
    "JOIN unnest($1::bigint[], $2::bigint[]) AS a(id, updated_at) ON c.id = a.id AND c.updated_at = a.updated_at "
    "WHERE c.announced = 0 ORDER BY c.id FOR UPDATE OF c SKIP LOCKED)"
)
# An instance recovers the events it left unannounced, and those of instances that are not running
# (their advisory lock is free) and of one-shot CLI runs (no announcer).
RUNNING_INSTANCES = (
    "SELECT i.name FROM instances i JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted "
    f"AND l.classid = {INSTANCE_SPACE} AND l.objid = hashtext(i.name)::oid AND l.objsubid = 2"
)
UNANNOUNCED = (
    f"SELECT {COLUMNS} FROM commands WHERE announced = 0 AND id > $1 "
    f"AND (announcer IS NULL OR announcer = $3 OR announcer NOT IN ({RUNNING_INSTANCES})) ORDER BY id LIMIT $2"
)
# Events nobody is going to publish: left by an instance that is not running, or by a one-shot CLI
# run whose broker flush failed (no announcer, and older than a grace period). The adopter
# publishes them (at least once: a CLI flush may still be under way).
ADOPT_ORPHANS = (
    "UPDATE commands SET announcer = $1 WHERE id IN (SELECT id FROM commands WHERE announced = 0 "
    f"AND (announcer NOT IN ({RUNNING_INSTANCES}) OR (announcer IS NULL AND updated_at < $2)) "
    f"ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING {COLUMNS}"
)
INSTANCE_RECORDS = (
    "SELECT i.name, i.host, i.pid, i.embedded_broker, "
    "i.name = ANY(ARRAY(" + RUNNING_INSTANCES + ")) AS running FROM instances i ORDER BY i.name"
)
TRY_INSTANCE_LOCK = f"SELECT pg_try_advisory_lock({INSTANCE_SPACE}, hashtext($1))"
REGISTER_INSTANCE = (
    "INSERT INTO instances (name, host, pid, embedded_broker) VALUES ($1, $2, $3, $4) "
    "ON CONFLICT (name) DO UPDATE SET host = excluded.host, pid = excluded.pid, "
    "embedded_broker = excluded.embedded_broker, started_at = now()"
)
TRY_XACT_LOCK = f"SELECT pg_try_advisory_xact_lock({LOCK_SPACE}, $1)"
# Push locks: the keys of the targets whose lock this session got (others are being pushed elsewhere).
TRY_PUSH_LOCKS = f"SELECT k FROM unnest($1::int[]) AS k WHERE pg_try_advisory_lock({PUSH_SPACE}, k)"
RELEASE_PUSH_LOCKS = f"SELECT count(*) FROM unnest($1::int[]) AS k WHERE pg_advisory_unlock({PUSH_SPACE}, k)"

INSERT_DEVICE = numbered(rows.INSERT_DEVICE + " ON CONFLICT DO NOTHING")
# An update that would take another device's endpoint changes nothing (the unique index would abort
# the whole batch's transaction instead of refusing this one operation).
UPDATE_DEVICE = numbered(
    rows.UPDATE_DEVICE
    + " AND NOT EXISTS (SELECT 1 FROM devices o WHERE o.app_version = ? AND o.endpoint_token = ? AND o.device_id <> ?)"
)
DEVICE_EXISTS = "SELECT 1 FROM devices WHERE device_id = $1"
SELECT_DEVICE = f"SELECT {rows.DEVICE_SELECT} FROM devices WHERE device_id = $1"
SELECT_DEVICE_FOR = f"SELECT {rows.DEVICE_SELECT} FROM devices WHERE app_version = $1 AND endpoint_token = $2"
DELETE_DEVICE = "DELETE FROM devices WHERE device_id = $1"
MARK_SEEN_MANY = (
    "UPDATE devices d SET last_seen_at = s.at FROM unnest($1::text[], $2::text[], $3::bigint[]) AS s(av, token, at) "
    "WHERE d.app_version = s.av AND d.endpoint_token = s.token AND (d.last_seen_at IS NULL OR d.last_seen_at < s.at)"
)

# Rows locked in id order, as every batch locks them: no deadlock with another instance's batch.
_LOCKED_IN_ORDER = "commands.id IN (SELECT id FROM commands WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE)"
MARK_SENT = (
    "UPDATE commands SET sent_at = u.at FROM unnest($1::bigint[], $2::bigint[]) AS u(id, at) "
    f"WHERE commands.id = u.id AND commands.sent_at IS NULL AND {_LOCKED_IN_ORDER}"
)
MARK_DELIVERED = (
    "UPDATE commands SET delivered_at = u.at, sent_at = coalesce(commands.sent_at, u.at) "
    "FROM unnest($1::bigint[], $2::bigint[]) AS u(id, at) "
    f"WHERE commands.id = u.id AND commands.delivered_at IS NULL AND {_LOCKED_IN_ORDER}"
)
# Presence only moves forward in time: a change older than the last one recorded is stale.
MARK_PRESENCE_MANY = (
    "UPDATE devices d SET connected = s.c, connected_at = CASE WHEN s.c = 1 THEN s.at ELSE d.connected_at END, "
    "disconnected_at = CASE WHEN s.c = 1 THEN d.disconnected_at ELSE s.at END "
    "FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[]) AS s(av, token, c, at) "
    "WHERE d.app_version = s.av AND d.endpoint_token = s.token "
    "AND greatest(coalesce(d.connected_at, 0), coalesce(d.disconnected_at, 0)) < s.at"
)
DISCONNECT_ALL = numbered(rows.DISCONNECT_ALL)

INSERT_SECRET = "INSERT INTO secrets (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING value"
SELECT_SECRET = "SELECT value FROM secrets WHERE name = $1"
API_KEY_QUERY = "SELECT value FROM secrets WHERE name = 'api_key'"  # for the operator, with psql

FINAL_CHANNEL = "broker_bridge_final"  # NOTIFY payload: comma-separated ids of commands that became final
