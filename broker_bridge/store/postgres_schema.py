"""Versioned schema migrations for the PostgreSQL store, tracked in ``broker_bridge_schema``.

The columns mirror the SQLite store's (times in microseconds since the epoch, JSON as text, flags
as integers), so the row mapping and most SQL text (``sqlite_rows``) serve both stores: a value
round-trips byte for byte (``jsonb`` would reorder keys and drop duplicates).

Several instances may start at once: each migration step runs under one transaction-scoped
advisory lock, so exactly one of them applies it and the others then see it applied.
"""

from __future__ import annotations

# The advisory lock "namespace" (first key of the two-int form) of everything broker-bridge locks.
LOCK_SPACE = 0x6262  # "bb"
MIGRATION_LOCK = 0
EXPIRY_LOCK = 1  # the expiry sweep: one instance at a time
RETENTION_LOCK = 2  # the retention and ephemeral sweeps

# Each entry moves the schema from version N to N+1; never edit one that has shipped.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE commands (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- never reused after purges
        app_version TEXT NOT NULL,
        endpoint_token TEXT NOT NULL,
        command_type TEXT NOT NULL,
        payload TEXT NOT NULL,                 -- JSON
        state TEXT NOT NULL CHECK (state IN ('pending', 'in_progress', 'executed', 'expired', 'cancelled')),
        status_code INTEGER,
        reason_phrase TEXT,
        result_payload TEXT NOT NULL DEFAULT 'null',
        created_at BIGINT NOT NULL,            -- microseconds since the Unix epoch, UTC
        updated_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        log TEXT NOT NULL DEFAULT '[]',        -- JSON array of [statusCode, reasonPhrase, payload, receivedAt]
        request_name TEXT,
        ephemeral INTEGER NOT NULL DEFAULT 0,
        idempotency_key TEXT,
        announced INTEGER NOT NULL DEFAULT 1,  -- 0: the latest change has no acknowledged event yet
        announcer TEXT,                        -- the instance that publishes that event
        rerun_of BIGINT                        -- a re-run: the command whose device, type and payload it repeats
    );
    CREATE INDEX commands_open ON commands (app_version, endpoint_token, command_type, id)
        WHERE state IN ('pending', 'in_progress');
    CREATE INDEX commands_due ON commands (expires_at) WHERE state IN ('pending', 'in_progress');
    CREATE INDEX commands_finished ON commands (updated_at)
        WHERE state IN ('executed', 'expired', 'cancelled');
    CREATE INDEX commands_endpoint ON commands (endpoint_token, app_version, id);
    CREATE UNIQUE INDEX commands_idempotency ON commands (app_version, endpoint_token, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX commands_ephemeral ON commands (created_at) WHERE ephemeral = 1;
    CREATE INDEX commands_unannounced ON commands (id) WHERE announced = 0;
    CREATE TABLE observers (
        app_version TEXT NOT NULL,
        endpoint_token TEXT NOT NULL,
        command_type TEXT NOT NULL,
        observe INTEGER NOT NULL DEFAULT 1,
        format TEXT NOT NULL DEFAULT '',
        retained INTEGER NOT NULL DEFAULT 0,
        retained_format TEXT,
        PRIMARY KEY (app_version, endpoint_token, command_type)
    );
    CREATE INDEX observers_retained ON observers (retained) WHERE retained = 1;
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        app_version TEXT NOT NULL,
        endpoint_token TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        manifest TEXT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        UNIQUE (app_version, endpoint_token)
    );
    -- /readyz writes here: proof that a commit goes through.
    CREATE TABLE health (instance TEXT PRIMARY KEY, checked_at BIGINT NOT NULL);
    -- Values generated once and shared by every instance (the API key when none is configured).
    CREATE TABLE secrets (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    -- Every instance that ever ran against this database; running ones hold their advisory lock.
    CREATE TABLE instances (
        name TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        embedded_broker BOOLEAN NOT NULL,
        started_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    """,
    """
    -- When the device's last KP1 message came (microseconds; NULL: not since this column).
    ALTER TABLE devices ADD COLUMN last_seen_at BIGINT;
    """,
    """
    -- Who created a command (an API key's name, an MQTT username, cli:<user>); NULL before this column.
    ALTER TABLE commands ADD COLUMN invoked_by TEXT;
    -- 0: the endpoint had never sent a KP1 message when the command was invoked for it.
    ALTER TABLE commands ADD COLUMN device_seen INTEGER NOT NULL DEFAULT 1;
    -- First handed to the device, and proof it has it (microseconds; NULL: not known).
    ALTER TABLE commands ADD COLUMN sent_at BIGINT;
    ALTER TABLE commands ADD COLUMN delivered_at BIGINT;
    -- Presence where the broker tells it: 1 connected, 0 not, NULL unknown.
    ALTER TABLE devices ADD COLUMN connected INTEGER;
    ALTER TABLE devices ADD COLUMN connected_at BIGINT;
    ALTER TABLE devices ADD COLUMN disconnected_at BIGINT;
    """,
    """
    -- Fleet rollouts: the spec (JSON), where it stands, and one row per targeted device.
    CREATE TABLE rollouts (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        spec TEXT NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('scheduled', 'in_progress', 'paused', 'completed', 'aborted', 'cancelled')),
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        started_at BIGINT,
        finished_at BIGINT,
        aborted_by TEXT,
        pace TEXT NOT NULL,                    -- JSON: the current rate, since when
        counts TEXT NOT NULL DEFAULT '{}',     -- JSON: members by state, kept with every step
        invoked_by TEXT
    );
    CREATE INDEX rollouts_active ON rollouts (id) WHERE state IN ('scheduled', 'in_progress', 'paused');
    CREATE TABLE rollout_members (
        rollout_id BIGINT NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        device_id TEXT NOT NULL,
        app_version TEXT NOT NULL,
        endpoint_token TEXT NOT NULL,
        state TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        command_id BIGINT,                         -- the latest attempt's command
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (rollout_id, position)
    );
    CREATE INDEX rollout_members_state ON rollout_members (rollout_id, state, position);
    """,
]

CREATE_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS broker_bridge_schema (version INTEGER NOT NULL)"
