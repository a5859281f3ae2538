"""Versioned schema migrations for the SQLite store, tracked in ``PRAGMA user_version``."""

from __future__ import annotations

import sqlite3

# Each entry moves the schema from version N to N+1; never edit one that has shipped.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE commands (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids are never reused after purges
        app_version TEXT NOT NULL,
        endpoint_token TEXT NOT NULL,
        command_type TEXT NOT NULL,
        payload TEXT NOT NULL,                 -- JSON
        state TEXT NOT NULL CHECK (state IN ('pending', 'in_progress', 'executed', 'expired', 'cancelled')),
        status_code INTEGER,
        reason_phrase TEXT,
        result_payload TEXT NOT NULL DEFAULT 'null',
        created_at INTEGER NOT NULL,           -- microseconds since the Unix epoch, UTC
        updated_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        log TEXT NOT NULL DEFAULT '[]'         -- JSON array of [statusCode, reasonPhrase, payload, receivedAt]
    );
    -- Polls and pushes: the open commands of one target, in id order.
    CREATE INDEX commands_open ON commands (app_version, endpoint_token, command_type, id)
        WHERE state IN ('pending', 'in_progress');
    -- The expiry sweep reads only what is due.
    CREATE INDEX commands_due ON commands (expires_at) WHERE state IN ('pending', 'in_progress');
    -- The retention sweep reads only what is old and finished.
    CREATE INDEX commands_finished ON commands (updated_at)
        WHERE state IN ('executed', 'expired', 'cancelled');
    -- History listings filtered by endpoint.
    CREATE INDEX commands_endpoint ON commands (endpoint_token, app_version, id);
    CREATE TABLE observers (
        app_version TEXT NOT NULL,
        endpoint_token TEXT NOT NULL,
        command_type TEXT NOT NULL,
        observe INTEGER NOT NULL DEFAULT 1,    -- 0 once the device asked {"observe": false}
        format TEXT NOT NULL DEFAULT '',       -- '', 'json' or 'msgpack': how pushes are encoded
        retained INTEGER NOT NULL DEFAULT 0,   -- a non-empty list may be retained on the broker
        PRIMARY KEY (app_version, endpoint_token, command_type)
    ) WITHOUT ROWID;
    CREATE INDEX observers_retained ON observers (retained) WHERE retained = 1;
    """,
    """
    ALTER TABLE commands ADD COLUMN request_name TEXT;            -- alias used by the operator
    ALTER TABLE commands ADD COLUMN ephemeral INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE commands ADD COLUMN idempotency_key TEXT;
    CREATE UNIQUE INDEX commands_idempotency ON commands (app_version, endpoint_token, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    -- Ephemeral executions are deleted a day after creation; the sweep reads only those.
    CREATE INDEX commands_ephemeral ON commands (created_at) WHERE ephemeral = 1;
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        app_version TEXT NOT NULL,
        endpoint_token TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',     -- JSON object of strings
        manifest TEXT,                         -- JSON, or NULL: any command is allowed
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        UNIQUE (app_version, endpoint_token)
    );
    """,
    """
    -- A transactional outbox in one column: every change clears it in the same statement, the
    -- bridge sets it once the broker acknowledged the event, and republishes the rest after a crash.
    ALTER TABLE commands ADD COLUMN announced INTEGER NOT NULL DEFAULT 1;
    CREATE INDEX commands_unannounced ON commands (id) WHERE announced = 0;
    """,
    """
    -- With retained = 1: the format whose push topic holds the retained list ('' plain, 'json',
    -- 'msgpack'), so a device that switches formats gets the list on the old topic deleted.
    -- NULL: the observer's own format (marks made before this column).
    ALTER TABLE observers ADD COLUMN retained_format TEXT;
    """,
    """
    -- A re-run: the id of the command whose device, type and payload this one repeats.
    ALTER TABLE commands ADD COLUMN rerun_of INTEGER;
    -- /readyz writes here: proof that a commit goes through.
    CREATE TABLE health (id INTEGER PRIMARY KEY CHECK (id = 1), checked_at INTEGER NOT NULL);
    """,
    """
    -- When the device's last KP1 message came (microseconds; NULL: not since this column).
    ALTER TABLE devices ADD COLUMN last_seen_at INTEGER;
    """,
    """
    -- Who created a command (an API key's name, an MQTT username, cli:<user>); NULL before this column.
    ALTER TABLE commands ADD COLUMN invoked_by TEXT;
    -- 0: the endpoint had never sent a KP1 message when the command was invoked for it.
    ALTER TABLE commands ADD COLUMN device_seen INTEGER NOT NULL DEFAULT 1;
    -- First handed to the device, and proof it has it (microseconds; NULL: not known).
    ALTER TABLE commands ADD COLUMN sent_at INTEGER;
    ALTER TABLE commands ADD COLUMN delivered_at INTEGER;
    -- Presence where the broker tells it: 1 connected, 0 not, NULL unknown.
    ALTER TABLE devices ADD COLUMN connected INTEGER;
    ALTER TABLE devices ADD COLUMN connected_at INTEGER;
    ALTER TABLE devices ADD COLUMN disconnected_at INTEGER;
    """,
    """
    -- Fleet rollouts: the spec (JSON), where it stands, and one row per targeted device.
    CREATE TABLE rollouts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        spec TEXT NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('scheduled', 'in_progress', 'paused', 'completed', 'aborted', 'cancelled')),
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        started_at INTEGER,
        finished_at INTEGER,
        aborted_by TEXT,
        pace TEXT NOT NULL,                    -- JSON: the current rate, since when
        counts TEXT NOT NULL DEFAULT '{}',     -- JSON: members by state, kept with every step
        invoked_by TEXT
    );
    CREATE INDEX rollouts_active ON rollouts (id) WHERE state IN ('scheduled', 'in_progress', 'paused');
    CREATE TABLE rollout_members (
        rollout_id INTEGER NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        device_id TEXT NOT NULL,
        app_version TEXT NOT NULL,
        endpoint_token TEXT NOT NULL,
        state TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        command_id INTEGER,                         -- the latest attempt's command
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (rollout_id, position)
    );
    CREATE INDEX rollout_members_state ON rollout_members (rollout_id, state, position);
    """,
]


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to the newest version; returns it. Blocking: run it on the store's thread."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > len(MIGRATIONS):
        raise RuntimeError(f"database schema {version} is newer than this broker-bridge ({len(MIGRATIONS)})")
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {number}; COMMIT;")
    return len(MIGRATIONS)
