"""SQL text and row mapping of rollouts, shared by the SQLite and PostgreSQL stores (``?``
placeholders; ``postgres_sql.numbered`` turns them into ``$n``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from broker_bridge.rollouts import DeviceState, Member, Pace, Rollout, RolloutSpec, RolloutState
from broker_bridge.store.sqlite_rows import from_us, to_us

ROLLOUT_COLUMNS = (
    "id, spec, state, created_at, updated_at, started_at, finished_at, aborted_by, pace, counts, invoked_by"
)
INSERT_ROLLOUT = (
    "INSERT INTO rollouts (spec, state, created_at, updated_at, pace, counts, invoked_by) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
INSERT_MEMBER = (
    "INSERT INTO rollout_members (rollout_id, position, device_id, app_version, endpoint_token, state, updated_at) "
    "VALUES (?, ?, ?, ?, ?, 'queued', ?)"
)
MEMBER_COLUMNS = "position, device_id, app_version, endpoint_token, state, attempt, command_id, updated_at"
UPDATE_ROLLOUT = (
    "UPDATE rollouts SET state = ?, updated_at = ?, started_at = ?, finished_at = ?, aborted_by = ?, pace = ?, "
    "counts = ? WHERE id = ?"
)
ACTIVE_ROLLOUTS = "SELECT id FROM rollouts WHERE state IN ('scheduled', 'in_progress', 'paused') ORDER BY id"
# In-flight members whose command moved on (or is gone): what a step settles. A member still
# matching its command (sent: pending; in_progress: in_progress) is not read.
CHANGED_IN_FLIGHT = (
    f"SELECT {', '.join('m.' + c.strip() for c in MEMBER_COLUMNS.split(','))}, c.id "
    "FROM rollout_members m LEFT JOIN commands c ON c.id = m.command_id "
    "WHERE m.rollout_id = ? AND m.state IN ('sent', 'in_progress') AND (c.id IS NULL OR NOT ("
    "(m.state = 'sent' AND c.state = 'pending') OR (m.state = 'in_progress' AND c.state = 'in_progress')))"
)
OPEN_MEMBERS = (
    "SELECT position, command_id FROM rollout_members WHERE rollout_id = ? AND state IN ('sent', 'in_progress')"
)
QUEUED_MEMBERS = (
    f"SELECT {MEMBER_COLUMNS} FROM rollout_members WHERE rollout_id = ? AND state = 'queued' ORDER BY position LIMIT ?"
)
SET_MEMBER = "UPDATE rollout_members SET state = ?, updated_at = ? WHERE rollout_id = ? AND position = ?"
SENT_MEMBER = (
    "UPDATE rollout_members SET state = 'sent', attempt = attempt + 1, command_id = ?, updated_at = ? "
    "WHERE rollout_id = ? AND position = ?"
)
CANCEL_QUEUED = (
    "UPDATE rollout_members SET state = 'cancelled', updated_at = ? WHERE rollout_id = ? AND state = 'queued'"
)
COUNT_BY_STATE = "SELECT state, count(*) FROM rollout_members WHERE rollout_id = ? GROUP BY state"


def spec_text(spec: RolloutSpec) -> str:
    return spec.model_dump_json(exclude={"dry_run"})


def pace_text(pace: Pace) -> str:
    return json.dumps(
        {
            "per_minute": pace.per_minute,
            "since": to_us(pace.since),
            "sent_before": pace.sent_before,
            "next": pace.next_step,
        }
    )


def counts_text(counts: dict[DeviceState, int]) -> str:
    return json.dumps({s.value: n for s, n in sorted(counts.items()) if n})


def insert_params(draft: Rollout) -> tuple[Any, ...]:
    """INSERT_ROLLOUT's parameters."""
    us = to_us(draft.created_at)
    values = (spec_text(draft.spec), draft.state.value, us, us, pace_text(draft.pace), counts_text(draft.counts))
    return (*values, draft.invoked_by)


def _maybe(us: int | None) -> datetime | None:
    return None if us is None else from_us(us)


def to_rollout(row: Any) -> Rollout:
    pace = json.loads(row[8])
    return Rollout(
        id=row[0],
        spec=RolloutSpec.model_validate_json(row[1]),
        state=RolloutState(row[2]),
        created_at=from_us(row[3]),
        updated_at=from_us(row[4]),
        started_at=_maybe(row[5]),
        finished_at=_maybe(row[6]),
        aborted_by=row[7],
        pace=Pace(
            per_minute=pace["per_minute"],
            since=from_us(pace["since"]),
            sent_before=pace["sent_before"],
            next_step=pace["next"],
        ),
        counts={DeviceState(k): int(v) for k, v in json.loads(row[9]).items()},
        invoked_by=row[10],
    )


def rollout_params(rollout: Rollout) -> tuple[Any, ...]:
    """UPDATE_ROLLOUT's parameters."""
    return (
        rollout.state.value,
        to_us(rollout.updated_at),
        None if rollout.started_at is None else to_us(rollout.started_at),
        None if rollout.finished_at is None else to_us(rollout.finished_at),
        rollout.aborted_by,
        pace_text(rollout.pace),
        counts_text(rollout.counts),
        rollout.id,
    )


def to_member(row: Sequence[Any]) -> Member:
    """A member from MEMBER_COLUMNS."""
    return Member(
        position=row[0],
        device_id=row[1],
        app_version=row[2],
        endpoint_token=row[3],
        state=DeviceState(row[4]),
        attempt=row[5],
        command_id=row[6],
        updated_at=from_us(row[7]),
    )


def members_where(states: frozenset[DeviceState]) -> tuple[str, tuple[str, ...]]:
    if not states:
        return "", ()
    return f" AND state IN ({', '.join('?' * len(states))})", tuple(sorted(s.value for s in states))
