"""Every SQL statement of the ingest service, and only SQL.

The service owns the transaction (`transaction()`), and passes its connection to the methods
here; driver errors become domain errors at that boundary.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast
from uuid import UUID

import asyncpg

from services.ingest.errors import StorageUnavailable
from services.ingest.model import (
    AttributeState,
    InstallationState,
    PendingOperation,
    SessionDelta,
    TimedSubscriptionChange,
    Value,
)
from services.ingest.validation import RejectedEvent, ValidEvent
from shared.errors import Aborted

# Installation events take their profile from `installations` in the same statement, FOR SHARE:
# identity moves an installation FOR UPDATE, so an event racing a merge, Identify or Logout
# waits for it and lands on the installation's profile as of its commit, never on a profile the
# installation already left. ON CONFLICT DO NOTHING against the dedupe index makes a retried or
# concurrent duplicate insert nothing; RETURNING tells which rows are new. An installation
# missing here (erased since it was resolved) yields no row, and the caller resolves it again.
# ORDER BY ord keeps event_seq in request order.
INSERT_INSTALLATION_EVENTS = """
    INSERT INTO events (project_id, installation_id, event_id, profile_id, kind, name,
                        event_time, receive_time, session_id, platform, payload, imported)
    SELECT $1, e.installation_id, e.event_id, i.profile_id, e.kind, e.name,
           e.event_time, $2, e.session_id, e.platform, e.payload, $3
    FROM unnest($4::text[], $5::text[], $6::smallint[], $7::text[], $8::timestamptz[],
                $9::text[], $10::smallint[], $11::jsonb[])
         WITH ORDINALITY AS e(installation_id, event_id, kind, name, event_time, session_id,
                              platform, payload, ord)
    JOIN installations i ON i.project_id = $1 AND i.installation_id = e.installation_id
    ORDER BY e.ord
    FOR SHARE OF i
    ON CONFLICT (project_id, installation_id, event_id) WHERE installation_id IS NOT NULL
    DO NOTHING
    RETURNING installation_id, event_id, profile_id, event_seq"""

# Server-side events name the profile identity resolved for their custom ID; a merge since
# then left it a tombstone pointing at its survivor in one hop, hence coalesce(merged_into).
# The row is locked FOR NO KEY UPDATE (not FOR SHARE) because this transaction bumps the
# profile's version next: two share locks upgrading to update locks would deadlock. Locks are
# taken in profile_id order so concurrent batches queue instead of deadlocking.
INSERT_CUSTOM_ID_EVENTS = """
    INSERT INTO events (project_id, custom_id, event_id, profile_id, kind, name,
                        event_time, receive_time, session_id, platform, payload, imported)
    SELECT $1, e.custom_id, e.event_id, coalesce(p.merged_into, p.profile_id), e.kind, e.name,
           e.event_time, $2, e.session_id, e.platform, e.payload, $3
    FROM unnest($4::text[], $5::text[], $6::smallint[], $7::text[], $8::timestamptz[],
                $9::text[], $10::smallint[], $11::jsonb[], $12::uuid[])
         WITH ORDINALITY AS e(custom_id, event_id, kind, name, event_time, session_id,
                              platform, payload, resolved_profile_id, ord)
    JOIN profiles p ON p.project_id = $1 AND p.profile_id = e.resolved_profile_id
    ORDER BY p.profile_id, e.ord
    FOR NO KEY UPDATE OF p
    ON CONFLICT (project_id, custom_id, event_id) WHERE custom_id IS NOT NULL
    DO NOTHING
    RETURNING custom_id, event_id, profile_id, event_seq"""

# Which of the events not inserted above already exist (duplicates); the rest lost their
# installation or profile meanwhile. Only run when some events were not inserted.
SELECT_EXISTING_INSTALLATION_EVENTS = """
    SELECT e.installation_id, e.event_id
    FROM unnest($2::text[], $3::text[]) AS k(installation_id, event_id)
    JOIN events e ON e.project_id = $1 AND e.installation_id = k.installation_id
                 AND e.event_id = k.event_id"""

SELECT_EXISTING_CUSTOM_ID_EVENTS = """
    SELECT e.custom_id, e.event_id
    FROM unnest($2::text[], $3::text[]) AS k(custom_id, event_id)
    JOIN events e ON e.project_id = $1 AND e.custom_id = k.custom_id AND e.event_id = k.event_id"""

# An event whose attribute operations the profile refused (attribute limit) is not kept;
# the delete happens in the inserting transaction, so nobody ever sees the row.
DELETE_EVENTS = "DELETE FROM events WHERE project_id = $1 AND event_seq = ANY($2::bigint[])"

# Bumps the version of every profile the batch touched (read-your-writes for query's caches)
# and, by locking them in profile_id order first, serializes the state updates below per
# profile: two batches for one profile apply attributes one after the other, without
# deadlocking each other.
BUMP_PROFILE_VERSIONS = """
    WITH locked AS (
        SELECT profile_id FROM profiles
        WHERE project_id = $1 AND profile_id = ANY($2::uuid[])
        ORDER BY profile_id
        FOR NO KEY UPDATE
    )
    UPDATE profiles p SET version = p.version + 1, update_time = now()
    FROM locked
    WHERE p.project_id = $1 AND p.profile_id = locked.profile_id
    RETURNING p.profile_id, p.version"""

# All attributes of the touched profiles: the rules need the current state of the operated
# ones and the count of custom ones (limit of 50). The profile locks above keep them current.
SELECT_ATTRIBUTES = """
    SELECT profile_id, native, name, base, base_time, set_once, pending, update_time
    FROM profile_attributes
    WHERE project_id = $1 AND profile_id = ANY($2::uuid[])"""

# The service computed each touched attribute's whole new state; one upsert writes them.
# pending travels as JSON text: asyncpg would read a Python list inside jsonb[] as a dimension.
UPSERT_ATTRIBUTES = """
    INSERT INTO profile_attributes (project_id, profile_id, native, name, value, value_type,
                                    base, base_time, set_once, pending, update_time)
    SELECT $1, a.profile_id, a.native, a.name, a.value, a.value_type, a.base, a.base_time,
           a.set_once, a.pending::jsonb, a.update_time
    FROM unnest($2::uuid[], $3::boolean[], $4::text[], $5::jsonb[], $6::text[], $7::jsonb[],
                $8::timestamptz[], $9::boolean[], $10::text[], $11::timestamptz[])
         AS a(profile_id, native, name, value, value_type, base, base_time, set_once, pending,
              update_time)
    ON CONFLICT (project_id, profile_id, native, name) DO UPDATE SET
        value = EXCLUDED.value, value_type = EXCLUDED.value_type, base = EXCLUDED.base,
        base_time = EXCLUDED.base_time, set_once = EXCLUDED.set_once,
        pending = EXCLUDED.pending, update_time = EXCLUDED.update_time"""

# Latest change by event time wins: the WHERE keeps a stored newer change against a late one.
# The batch is reduced to one row per key first (a row cannot be updated twice per statement).
UPSERT_SUBSCRIPTIONS = """
    INSERT INTO profile_subscriptions (project_id, profile_id, channel, kind, subscribed,
                                       change_time)
    SELECT $1, s.* FROM unnest($2::uuid[], $3::text[], $4::text[], $5::boolean[],
                              $6::timestamptz[]) AS s
    ON CONFLICT (project_id, profile_id, channel, kind) DO UPDATE SET
        subscribed = EXCLUDED.subscribed, change_time = EXCLUDED.change_time
    WHERE profile_subscriptions.change_time <= EXCLUDED.change_time"""

# One row per (installation, session) of the batch, merged with what is stored: the span of
# event times widens, counts add up, the latest explicit end by event time sets end_time and
# duration, and until then duration is the longest seen. The first known country stays.
# profile_id is kept from the first event (identity's merge moves it). Rows in key order, so
# two batches lock the same sessions in the same order. RETURNING gives the country of every
# touched session, which heartbeat and end events carry on the bus.
UPSERT_SESSIONS = """
    INSERT INTO sessions AS s (project_id, installation_id, session_id, profile_id, platform,
        country, start_time, last_activity_time, end_time, duration, event_count, started,
        ended, closed)
    SELECT $1, d.installation_id, d.session_id, d.profile_id, d.platform, nullif(d.country, ''),
           d.start_time, d.last_activity_time, d.end_time, d.duration, d.event_count,
           d.started, d.ended, d.ended
    FROM unnest($2::text[], $3::text[], $4::uuid[], $5::smallint[], $6::text[],
                $7::timestamptz[], $8::timestamptz[], $9::timestamptz[], $10::interval[],
                $11::integer[], $12::boolean[], $13::boolean[])
         AS d(installation_id, session_id, profile_id, platform, country, start_time,
              last_activity_time, end_time, duration, event_count, started, ended)
    ORDER BY d.installation_id, d.session_id
    ON CONFLICT (project_id, installation_id, session_id) DO UPDATE SET
        platform = EXCLUDED.platform,
        country = coalesce(s.country, EXCLUDED.country),
        start_time = least(s.start_time, EXCLUDED.start_time),
        last_activity_time = greatest(s.last_activity_time, EXCLUDED.last_activity_time),
        end_time = CASE
            WHEN EXCLUDED.ended AND (NOT s.ended OR EXCLUDED.end_time >= s.end_time)
                THEN EXCLUDED.end_time
            ELSE s.end_time END,
        duration = CASE
            WHEN EXCLUDED.ended AND (NOT s.ended OR EXCLUDED.end_time >= s.end_time)
                THEN EXCLUDED.duration
            WHEN s.ended THEN s.duration
            ELSE greatest(s.duration, EXCLUDED.duration,
                          greatest(s.last_activity_time, EXCLUDED.last_activity_time)
                          - least(s.start_time, EXCLUDED.start_time)) END,
        event_count = s.event_count + EXCLUDED.event_count,
        started = s.started OR EXCLUDED.started,
        ended = s.ended OR EXCLUDED.ended,
        closed = s.closed OR EXCLUDED.ended
    RETURNING installation_id, session_id, country"""

# The sweeper's statement, across projects like the outbox relay: open sessions idle since
# before $1 are closed at their last activity with the duration seen so far. SKIP LOCKED: a
# session being updated by an ingest batch is left for the next sweep; several sweepers
# (replicas) take disjoint rows. Oldest first through sessions_open_by_activity.
CLOSE_IDLE_SESSIONS = """
    WITH idle AS (
        SELECT project_id, installation_id, session_id FROM sessions
        WHERE NOT closed AND last_activity_time < $1
        ORDER BY last_activity_time
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    )
    UPDATE sessions s SET closed = true, end_time = s.last_activity_time,
        duration = greatest(s.duration, s.last_activity_time - s.start_time)
    FROM idle
    WHERE s.project_id = idle.project_id AND s.installation_id = idle.installation_id
        AND s.session_id = idle.session_id
    RETURNING s.project_id, s.installation_id, s.session_id, s.profile_id, s.platform,
              s.country, s.end_time, s.duration"""

SELECT_INSTALLATION_DETAILS = """
    SELECT installation_id, platform, app_version, os_version, device_model, push_token,
           push_opt_in, language, timezone, uninstalled, field_times, first_seen, last_seen
    FROM installation_details
    WHERE project_id = $1 AND installation_id = ANY($2::text[])"""

# Rows in installation_id order, so two batches upserting the same installations lock them in
# the same order. The per-field merge was done by the service under the profile locks.
UPSERT_INSTALLATION_DETAILS = """
    INSERT INTO installation_details (project_id, installation_id, platform, app_version,
        os_version, device_model, push_token, push_opt_in, language, timezone, uninstalled,
        field_times, first_seen, last_seen)
    SELECT $1, d.* FROM unnest($2::text[], $3::smallint[], $4::text[], $5::text[], $6::text[],
                              $7::text[], $8::boolean[], $9::text[], $10::text[],
                              $11::boolean[], $12::jsonb[], $13::timestamptz[],
                              $14::timestamptz[]) AS d
    ORDER BY 2
    ON CONFLICT (project_id, installation_id) DO UPDATE SET
        platform = EXCLUDED.platform, app_version = EXCLUDED.app_version,
        os_version = EXCLUDED.os_version, device_model = EXCLUDED.device_model,
        push_token = EXCLUDED.push_token, push_opt_in = EXCLUDED.push_opt_in,
        language = EXCLUDED.language, timezone = EXCLUDED.timezone,
        uninstalled = EXCLUDED.uninstalled, field_times = EXCLUDED.field_times,
        first_seen = EXCLUDED.first_seen, last_seen = EXCLUDED.last_seen"""

# Installations that already hold one of the tokens for its platform (imported earlier, or
# sent by an SDK), with their current profile; the partial index by push token serves it.
# An SDK installation is preferred to an imported one, then the smallest ID, so the answer is
# stable.
SELECT_TOKEN_HOLDERS = """
    SELECT DISTINCT ON (d.platform, d.push_token) d.platform, d.push_token, d.installation_id,
           i.profile_id
    FROM unnest($2::smallint[], $3::text[]) AS k(platform, push_token)
    JOIN installation_details d ON d.project_id = $1 AND d.platform = k.platform
                                AND d.push_token = k.push_token
    JOIN installations i ON i.project_id = $1 AND i.installation_id = d.installation_id
    ORDER BY d.platform, d.push_token, d.imported, d.installation_id"""

# The imported installations' details. Their IDs derive from the token, so a concurrent import
# of the same token conflicts here and only one is reported IMPORTED (RETURNING).
INSERT_IMPORTED_INSTALLATIONS = """
    INSERT INTO installation_details (project_id, installation_id, platform, push_token,
        push_opt_in, field_times, first_seen, last_seen, imported)
    SELECT $1, t.installation_id, t.platform, t.push_token, t.push_opt_in,
           jsonb_build_object('platform', $6::text, 'push_token', $6::text,
                              'push_opt_in', $6::text),
           $7, $7, true
    FROM unnest($2::text[], $3::smallint[], $4::text[], $5::boolean[])
         AS t(installation_id, platform, push_token, push_opt_in)
    ORDER BY t.installation_id
    ON CONFLICT (project_id, installation_id) DO NOTHING
    RETURNING installation_id"""

INSERT_REJECTED_EVENTS = """
    INSERT INTO rejected_events (project_id, receive_time, reason, field_path, message,
                                 event_id, installation_id, custom_id, payload)
    SELECT $1, $2, r.* FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                                  $8::text[], $9::jsonb[]) AS r"""

DETAIL_COLUMNS = (
    "platform",
    "app_version",
    "os_version",
    "device_model",
    "push_token",
    "push_opt_in",
    "language",
    "timezone",
    "uninstalled",
)

# Lost races PostgreSQL settles by aborting one side: the whole transaction is retried.
CONFLICTS: tuple[type[Exception], ...] = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)
UNAVAILABLE: tuple[type[Exception], ...] = (
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.TooManyConnectionsError,
    OSError,
)


class TransactionConflict(Aborted):
    reason = "TRANSACTION_CONFLICT"


@dataclass(frozen=True, slots=True)
class ClosedSession:
    """A session the sweeper closed for lack of activity."""

    project_id: UUID
    installation_id: str
    session_id: str
    profile_id: UUID
    platform: int
    country: str
    end_time: datetime
    duration: timedelta


@dataclass(frozen=True, slots=True)
class InsertedEvent:
    origin: str  # installation ID or custom ID
    event_id: str
    profile_id: UUID
    event_seq: int


def _event_columns(events: Sequence[ValidEvent]) -> list[list[Any]]:
    return [
        [e.event_id for e in events],
        [e.kind for e in events],
        [e.name for e in events],
        [e.event_time for e in events],
        [e.session_id for e in events],
        [e.platform for e in events],
        [e.payload for e in events],
    ]


class IngestRepository:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection in a transaction; conflicts raise TransactionConflict, outages
        StorageUnavailable (both after rollback)."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                yield cast(asyncpg.Connection, conn)
        except CONFLICTS as exc:
            raise TransactionConflict("the batch lost a race; retry it") from exc
        except UNAVAILABLE as exc:
            raise StorageUnavailable("the batch could not be committed; retry it") from exc

    async def insert_installation_events(
        self,
        conn: asyncpg.Connection,
        project_id: UUID,
        receive_time: datetime,
        imported: bool,
        events: Sequence[ValidEvent],
    ) -> list[InsertedEvent]:
        if not events:
            return []
        rows = await conn.fetch(
            INSERT_INSTALLATION_EVENTS,
            project_id,
            receive_time,
            imported,
            [e.installation_id for e in events],
            *_event_columns(events),
        )
        return [
            InsertedEvent(r["installation_id"], r["event_id"], r["profile_id"], r["event_seq"])
            for r in rows
        ]

    async def insert_custom_id_events(
        self,
        conn: asyncpg.Connection,
        project_id: UUID,
        receive_time: datetime,
        imported: bool,
        events: Sequence[ValidEvent],
        resolved_profile_ids: Sequence[UUID],
    ) -> list[InsertedEvent]:
        if not events:
            return []
        rows = await conn.fetch(
            INSERT_CUSTOM_ID_EVENTS,
            project_id,
            receive_time,
            imported,
            [e.custom_id for e in events],
            *_event_columns(events),
            list(resolved_profile_ids),
        )
        return [
            InsertedEvent(r["custom_id"], r["event_id"], r["profile_id"], r["event_seq"])
            for r in rows
        ]

    async def existing_events(
        self,
        conn: asyncpg.Connection,
        project_id: UUID,
        keys: Sequence[tuple[str, str]],
        *,
        by_custom_id: bool,
    ) -> set[tuple[str, str]]:
        """Which (origin, event_id) keys are stored already."""
        if not keys:
            return set()
        query = (
            SELECT_EXISTING_CUSTOM_ID_EVENTS
            if by_custom_id
            else (SELECT_EXISTING_INSTALLATION_EVENTS)
        )
        rows = await conn.fetch(query, project_id, [k[0] for k in keys], [k[1] for k in keys])
        return {(r[0], r[1]) for r in rows}

    async def delete_events(
        self, conn: asyncpg.Connection, project_id: UUID, event_seqs: Sequence[int]
    ) -> None:
        if event_seqs:
            await conn.execute(DELETE_EVENTS, project_id, list(event_seqs))

    async def bump_profile_versions(
        self, conn: asyncpg.Connection, project_id: UUID, profile_ids: Sequence[UUID]
    ) -> dict[UUID, int]:
        """Raises the profiles' versions; returns the new version of each."""
        if not profile_ids:
            return {}
        rows = await conn.fetch(BUMP_PROFILE_VERSIONS, project_id, sorted(set(profile_ids)))
        return {r["profile_id"]: r["version"] for r in rows}

    async def save_sessions(
        self, conn: asyncpg.Connection, project_id: UUID, deltas: Sequence[SessionDelta]
    ) -> dict[tuple[str, str], str]:
        """Merges the deltas into the stored sessions; returns (installation, session) ->
        the session's country ("" when unknown)."""
        if not deltas:
            return {}
        rows = await conn.fetch(
            UPSERT_SESSIONS,
            project_id,
            [d.installation_id for d in deltas],
            [d.session_id for d in deltas],
            [UUID(d.profile_id) for d in deltas],
            [d.platform for d in deltas],
            [d.country for d in deltas],
            [d.start_time for d in deltas],
            [d.last_activity_time for d in deltas],
            [d.end_time for d in deltas],
            [d.duration for d in deltas],
            [d.event_count for d in deltas],
            [d.started for d in deltas],
            [d.ended for d in deltas],
        )
        return {(r["installation_id"], r["session_id"]): r["country"] or "" for r in rows}

    async def close_idle_sessions(
        self, conn: asyncpg.Connection, idle_before: datetime, limit: int
    ) -> list[ClosedSession]:
        rows = await conn.fetch(CLOSE_IDLE_SESSIONS, idle_before, limit)
        return [
            ClosedSession(
                project_id=r["project_id"],
                installation_id=r["installation_id"],
                session_id=r["session_id"],
                profile_id=r["profile_id"],
                platform=r["platform"],
                country=r["country"] or "",
                end_time=r["end_time"],
                duration=r["duration"],
            )
            for r in rows
        ]

    async def attributes(
        self, conn: asyncpg.Connection, project_id: UUID, profile_ids: Sequence[UUID]
    ) -> dict[UUID, dict[tuple[bool, str], AttributeState]]:
        rows = await conn.fetch(SELECT_ATTRIBUTES, project_id, list(profile_ids))
        states: dict[UUID, dict[tuple[bool, str], AttributeState]] = {}
        for r in rows:
            states.setdefault(r["profile_id"], {})[(r["native"], r["name"])] = AttributeState(
                base=None if r["base"] is None else Value.from_json(r["base"]),
                base_time=r["base_time"],
                set_once=r["set_once"],
                pending=tuple(PendingOperation.from_json(p) for p in r["pending"]),
                update_time=r["update_time"],
            )
        return states

    async def save_attributes(
        self,
        conn: asyncpg.Connection,
        project_id: UUID,
        states: Sequence[tuple[UUID, bool, str, AttributeState]],
    ) -> None:
        if not states:
            return
        values = [s.value for _, _, _, s in states]
        await conn.execute(
            UPSERT_ATTRIBUTES,
            project_id,
            [p for p, _, _, _ in states],
            [n for _, n, _, _ in states],
            [name for _, _, name, _ in states],
            [None if v is None else v.to_json() for v in values],
            [None if v is None else v.type for v in values],
            [None if s.base is None else s.base.to_json() for _, _, _, s in states],
            [s.base_time for _, _, _, s in states],
            [s.set_once for _, _, _, s in states],
            [json.dumps([p.to_json() for p in s.pending]) for _, _, _, s in states],
            [s.update_time for _, _, _, s in states],
        )

    async def save_subscriptions(
        self,
        conn: asyncpg.Connection,
        project_id: UUID,
        changes: Sequence[TimedSubscriptionChange],
    ) -> None:
        if not changes:
            return
        await conn.execute(
            UPSERT_SUBSCRIPTIONS,
            project_id,
            [UUID(c.profile_id) for c in changes],
            [c.change.channel for c in changes],
            [c.change.kind for c in changes],
            [c.change.subscribed for c in changes],
            [c.time for c in changes],
        )

    async def installation_details(
        self, conn: asyncpg.Connection, project_id: UUID, installation_ids: Sequence[str]
    ) -> dict[str, InstallationState]:
        rows = await conn.fetch(SELECT_INSTALLATION_DETAILS, project_id, list(installation_ids))
        found = {}
        for r in rows:
            times = {k: datetime.fromisoformat(v) for k, v in r["field_times"].items()}
            values = {k: r[k] for k in DETAIL_COLUMNS if k in times}
            found[r["installation_id"]] = InstallationState(
                values, times, r["first_seen"], r["last_seen"]
            )
        return found

    async def save_installation_details(
        self,
        conn: asyncpg.Connection,
        project_id: UUID,
        states: Sequence[tuple[str, InstallationState]],
    ) -> None:
        if not states:
            return
        columns: list[list[Any]] = [
            [s.values.get(c, False if c == "uninstalled" else None) for _, s in states]
            for c in DETAIL_COLUMNS
        ]
        await conn.execute(
            UPSERT_INSTALLATION_DETAILS,
            project_id,
            [i for i, _ in states],
            *columns,
            [{k: t.isoformat() for k, t in s.times.items()} for _, s in states],
            [s.first_seen for _, s in states],
            [s.last_seen for _, s in states],
        )

    async def insert_rejected_events(
        self,
        conn: asyncpg.Connection,
        project_id: UUID,
        receive_time: datetime,
        rejected: Sequence[RejectedEvent],
    ) -> None:
        if not rejected:
            return
        await conn.execute(
            INSERT_REJECTED_EVENTS,
            project_id,
            receive_time,
            [r.rejection.reason for r in rejected],
            [r.rejection.field_path for r in rejected],
            [r.rejection.message for r in rejected],
            [r.event_id for r in rejected],
            [r.installation_id or None for r in rejected],
            [r.custom_id or None for r in rejected],
            [r.raw for r in rejected],
        )

    async def token_holders(
        self, project_id: UUID, tokens: Sequence[tuple[int, str]]
    ) -> dict[tuple[int, str], tuple[str, UUID]]:
        """(platform, token) -> (installation ID, profile) for tokens already held."""
        if not tokens:
            return {}
        rows = await self._pool.fetch(
            SELECT_TOKEN_HOLDERS, project_id, [t[0] for t in tokens], [t[1] for t in tokens]
        )
        return {
            (r["platform"], r["push_token"]): (r["installation_id"], r["profile_id"]) for r in rows
        }

    async def insert_imported_installations(
        self,
        conn: asyncpg.Connection,
        project_id: UUID,
        installations: Sequence[tuple[str, int, str, bool]],
        now: datetime,
    ) -> set[str]:
        """Inserts (installation ID, platform, token, opt-in) rows; returns the IDs inserted
        (the others existed already)."""
        if not installations:
            return set()
        rows = await conn.fetch(
            INSERT_IMPORTED_INSTALLATIONS,
            project_id,
            [i[0] for i in installations],
            [i[1] for i in installations],
            [i[2] for i in installations],
            [i[3] for i in installations],
            now.isoformat(),
            now,
        )
        return {r["installation_id"] for r in rows}
