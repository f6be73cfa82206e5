"""Every SQL statement of the ingest service, and only SQL.

The service owns the transaction (`transaction()`), and passes its connection to the methods
here; driver errors become domain errors at that boundary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast
from uuid import UUID

import asyncpg

from profiles.common.v1 import types_pb2
from services.ingest.errors import StorageUnavailable
from services.ingest.validation import RejectedEvent, ValidEvent
from shared.errors import Aborted

# Dedupe: events is partitioned by time and cannot hold a unique index on an event's key
# (0024_events_partitioned.sql), so each batch first claims its events' keys in event_keys:
# ON CONFLICT DO NOTHING makes a retried or concurrent duplicate (which waits on the key) claim
# nothing, and RETURNING tells which keys are new; only their events are then stored. The
# claim joins the same rows as the insert after it, with the same locks (taken here first,
# through identity's contracts), so a key is claimed exactly when its event is stored.
CLAIM_INSTALLATION_EVENT_KEYS = """
    INSERT INTO event_keys (project_id, event_key, receive_time)
    SELECT $1, profiles_ingest_event_key(k.installation_id, NULL, k.event_id), $2
    FROM unnest($3::text[], $4::text[]) WITH ORDINALITY AS k(installation_id, event_id, ord)
    JOIN identity_read_installation_links($1, $3::text[]) i
        ON i.installation_id = k.installation_id
    ORDER BY k.ord
    ON CONFLICT DO NOTHING
    RETURNING event_key"""

CLAIM_CUSTOM_ID_EVENT_KEYS = """
    INSERT INTO event_keys (project_id, event_key, receive_time)
    SELECT $1, profiles_ingest_event_key(NULL, k.custom_id, k.event_id), $2
    FROM unnest($3::text[], $4::text[], $5::uuid[])
         WITH ORDINALITY AS k(custom_id, event_id, resolved_profile_id, ord)
    JOIN identity_apply_profile_locks($1, $5::uuid[]) p ON p.profile_id = k.resolved_profile_id
    ORDER BY p.profile_id, k.ord
    ON CONFLICT DO NOTHING
    RETURNING event_key"""

# Installation events take their profile from identity's installation links in the same
# statement, each installation locked FOR SHARE by identity's read contract
# (identity_read_installation_links): identity moves an installation FOR UPDATE, so an event
# racing a merge, Identify or Logout waits for it and lands on the installation's profile as of
# its commit, never on a profile the installation already left. Only the events whose key the
# claim above returned ($12) are stored; RETURNING tells which rows are new. An installation
# missing here (erased since it was resolved) yields no row (nor key), and the caller resolves
# it again. ORDER BY ord keeps event_seq in request order.
INSERT_INSTALLATION_EVENTS = """
    INSERT INTO events (project_id, installation_id, event_id, profile_id, kind, name,
                        event_time, receive_time, session_id, platform, payload, imported)
    SELECT $1, e.installation_id, e.event_id, i.profile_id, e.kind, e.name,
           e.event_time, $2, e.session_id, e.platform, e.payload, $3
    FROM unnest($4::text[], $5::text[], $6::smallint[], $7::text[], $8::timestamptz[],
                $9::text[], $10::smallint[], $11::jsonb[])
         WITH ORDINALITY AS e(installation_id, event_id, kind, name, event_time, session_id,
                              platform, payload, ord)
    JOIN unnest($12::uuid[]) AS f(event_key)
        ON f.event_key = profiles_ingest_event_key(e.installation_id, NULL, e.event_id)
    JOIN identity_read_installation_links($1, $4::text[]) i
        ON i.installation_id = e.installation_id
    ORDER BY e.ord
    RETURNING installation_id, event_id, profile_id, event_seq"""

# Server-side events name the profile identity resolved for their custom ID; a merge since
# then left it a tombstone pointing at its survivor in one hop, hence its live profile. The
# profiles are locked FOR NO KEY UPDATE (not FOR SHARE) by identity's
# identity_apply_profile_locks because this transaction bumps their versions next: two share
# locks upgrading to update locks would deadlock. Locks are taken in profile_id order so
# concurrent batches queue instead of deadlocking. Only events whose key was claimed ($13) are
# stored.
INSERT_CUSTOM_ID_EVENTS = """
    INSERT INTO events (project_id, custom_id, event_id, profile_id, kind, name,
                        event_time, receive_time, session_id, platform, payload, imported)
    SELECT $1, e.custom_id, e.event_id, p.live_profile_id, e.kind, e.name,
           e.event_time, $2, e.session_id, e.platform, e.payload, $3
    FROM unnest($4::text[], $5::text[], $6::smallint[], $7::text[], $8::timestamptz[],
                $9::text[], $10::smallint[], $11::jsonb[], $12::uuid[])
         WITH ORDINALITY AS e(custom_id, event_id, kind, name, event_time, session_id,
                              platform, payload, resolved_profile_id, ord)
    JOIN unnest($13::uuid[]) AS f(event_key)
        ON f.event_key = profiles_ingest_event_key(NULL, e.custom_id, e.event_id)
    JOIN identity_apply_profile_locks($1, $12::uuid[]) p ON p.profile_id = e.resolved_profile_id
    ORDER BY p.profile_id, e.ord
    RETURNING custom_id, event_id, profile_id, event_seq"""

# Which of the events not inserted above already exist (duplicates: their key is held); the rest
# lost their installation or profile meanwhile. Only run when some events were not inserted.
SELECT_EXISTING_INSTALLATION_EVENTS = """
    SELECT k.installation_id, k.event_id
    FROM unnest($2::text[], $3::text[]) AS k(installation_id, event_id)
    JOIN event_keys e
        ON e.project_id = $1
        AND e.event_key = profiles_ingest_event_key(k.installation_id, NULL, k.event_id)"""

SELECT_EXISTING_CUSTOM_ID_EVENTS = """
    SELECT k.custom_id, k.event_id
    FROM unnest($2::text[], $3::text[]) AS k(custom_id, event_id)
    JOIN event_keys e
        ON e.project_id = $1
        AND e.event_key = profiles_ingest_event_key(NULL, k.custom_id, k.event_id)"""

# An event whose attribute operations the profile refused (attribute limit) is not kept;
# the delete happens in the inserting transaction, so nobody ever sees the row (events' delete
# trigger drops its key with it: a retry is judged again).
DELETE_EVENTS = "DELETE FROM events WHERE project_id = $1 AND event_seq = ANY($2::bigint[])"

# Bumps the version of every profile the batch touched (read-your-writes for query's caches)
# and, by locking them in profile_id order first, serializes the state updates below per
# profile: two batches for one profile apply attributes one after the other, without
# deadlocking each other. The profiles are identity's: it publishes the rule
# (identity_apply_profile_versions), run here in ingest's transaction.
BUMP_PROFILE_VERSIONS = """
    SELECT profile_id, version FROM identity_apply_profile_versions($1, $2::uuid[])"""

# The custom attributes the touched profiles hold now, for the limit of 50 per profile. The
# profile locks above keep them current until the batch commits.
SELECT_HELD_CUSTOM_ATTRIBUTES = """
    SELECT profile_id, name FROM profile_attributes
    WHERE project_id = $1 AND profile_id = ANY($2::uuid[]) AND NOT native
        AND value IS NOT NULL"""

# Every accepted operation joins its attribute's log (0010_attribute_replay.sql), keyed by
# replay order. A retried event was refused as a duplicate before it got here, so a key is
# never written twice.
INSERT_ATTRIBUTE_OPERATIONS = """
    INSERT INTO attribute_operations (project_id, profile_id, native, name, event_time,
                                      event_id, origin, position, kind, value)
    SELECT $1, o.* FROM unnest($2::uuid[], $3::boolean[], $4::text[], $5::timestamptz[],
                               $6::text[], $7::text[], $8::smallint[], $9::text[], $10::jsonb[])
         AS o"""

# Then each touched attribute's state is replayed from its earliest new operation (the fold
# continues from the stored state when they all come after it). The rule lives in
# profiles_ingest_fold_attribute, which identity's merge calls too. In key order, so two
# batches would lock rows in the same order (the profile locks serialize them anyway).
FOLD_ATTRIBUTES = """
    SELECT profiles_ingest_fold_attribute($1, f.profile_id, f.native, f.name, f.event_time,
                                          f.event_id, f.origin, f.position)
    FROM (
        SELECT DISTINCT ON (o.profile_id, o.native, o.name) o.*
        FROM unnest($2::uuid[], $3::boolean[], $4::text[], $5::timestamptz[], $6::text[],
                    $7::text[], $8::smallint[])
             AS o(profile_id, native, name, event_time, event_id, origin, position)
        ORDER BY o.profile_id, o.native, o.name, o.event_time, o.event_id COLLATE "C",
                 o.origin COLLATE "C", o.position
    ) f
    ORDER BY f.profile_id, f.native, f.name"""

# Consent follows the replay order of attributes: per profile, channel and kind, the change
# latest by (event time, event ID, origin) wins, within the batch (DISTINCT ON: a row cannot be
# updated twice per statement) and against the stored one (the WHERE).
UPSERT_SUBSCRIPTIONS = """
    INSERT INTO profile_subscriptions AS t (project_id, profile_id, channel, kind, subscribed,
                                            change_time, change_event_id, change_origin)
    SELECT DISTINCT ON (s.profile_id, s.channel, s.kind) $1, s.*
    FROM unnest($2::uuid[], $3::text[], $4::text[], $5::boolean[], $6::timestamptz[],
                $7::text[], $8::text[])
         AS s(profile_id, channel, kind, subscribed, change_time, change_event_id, change_origin)
    ORDER BY s.profile_id, s.channel, s.kind, s.change_time DESC,
             s.change_event_id COLLATE "C" DESC, s.change_origin COLLATE "C" DESC
    ON CONFLICT (project_id, profile_id, channel, kind) DO UPDATE SET
        subscribed = EXCLUDED.subscribed, change_time = EXCLUDED.change_time,
        change_event_id = EXCLUDED.change_event_id, change_origin = EXCLUDED.change_origin
    WHERE (t.change_time, t.change_event_id, t.change_origin)
        < (EXCLUDED.change_time, EXCLUDED.change_event_id, EXCLUDED.change_origin)"""

# One row per accepted event that names a session of an installation; the statement reduces
# them to one row per (installation, session), then merges that with what is stored. Per
# session of the batch: the span of event times; the profile of its earliest event and the
# platform of its latest (identity's merge moves profile_id later); the country of its earliest
# start that has one; the latest end by event time (ties: later in the batch) gives end_time
# and duration, else duration is the longest seen (a heartbeat's, or last activity minus
# start); every event counts. Merged with the stored row: the span widens, counts add up, the
# latest explicit end by event time sets end_time and duration, and until then duration is the
# longest seen; the first known country stays. Kinds are the profiles.common.v1.EventKind
# numbers of the names below (interpolated once, at import). Rows in key order, so two batches
# lock the same sessions in the same order. RETURNING gives the country of every touched
# session, which heartbeat and end events carry on the bus.
SESSION_START = int(types_pb2.EVENT_KIND_SESSION_START)
SESSION_HEARTBEAT = int(types_pb2.EVENT_KIND_SESSION_HEARTBEAT)
SESSION_END = int(types_pb2.EVENT_KIND_SESSION_END)
UPSERT_SESSIONS = f"""
    WITH e AS (
        SELECT * FROM unnest($2::text[], $3::text[], $4::uuid[], $5::smallint[], $6::smallint[],
                             $7::timestamptz[], $8::interval[], $9::text[])
             WITH ORDINALITY AS e(installation_id, session_id, profile_id, platform, kind,
                                  event_time, duration, country, ord)
    ),
    d AS (
        SELECT installation_id, session_id,
               (array_agg(profile_id ORDER BY event_time, ord))[1] AS profile_id,
               (array_agg(platform ORDER BY event_time DESC, ord DESC))[1] AS platform,
               (array_agg(country ORDER BY event_time, ord)
                    FILTER (WHERE kind = {SESSION_START} AND country <> ''))[1] AS country,
               min(event_time) AS start_time, max(event_time) AS last_activity_time,
               (array_agg(event_time ORDER BY event_time DESC, ord DESC)
                    FILTER (WHERE kind = {SESSION_END}))[1] AS end_time,
               (array_agg(duration ORDER BY event_time DESC, ord DESC)
                    FILTER (WHERE kind = {SESSION_END}))[1] AS end_duration,
               max(duration) FILTER (WHERE kind = {SESSION_HEARTBEAT}) AS longest_heartbeat,
               count(*) AS event_count, bool_or(kind = {SESSION_START}) AS started,
               bool_or(kind = {SESSION_END}) AS ended
        FROM e
        GROUP BY installation_id, session_id
    )
    INSERT INTO sessions AS s (project_id, installation_id, session_id, profile_id, platform,
        country, start_time, last_activity_time, end_time, duration, event_count, started,
        ended, closed)
    SELECT $1, d.installation_id, d.session_id, d.profile_id, d.platform, d.country,
           d.start_time, d.last_activity_time, d.end_time,
           CASE WHEN d.ended THEN coalesce(d.end_duration, '0')
                ELSE greatest(d.last_activity_time - d.start_time,
                              coalesce(d.longest_heartbeat, '0')) END,
           d.event_count, d.started, d.ended, d.ended
    FROM d
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

# Installation upkeep for a whole batch in one statement, no read-modify-write in Python: one
# row per accepted installation event (its event time, platform, and the fields it sets as a
# JSON object, NULL for none). Per installation and field the batch's latest change by event
# time wins (ties: the later event of the batch), then the upsert keeps, per field, whichever
# of stored and new is later (profiles_ingest_field_wins); first/last seen widen. Rows in
# installation_id order, so two batches upserting the same installations lock them in the same
# order. RETURNING: per installation that started a session in this batch ($6) and now holds a
# push token, the imported installation (ImportTokens) holding the same token for its platform
# and not yet reintegrated, if any; the service then folds it into the real one.
UPSERT_INSTALLATION_DETAILS = """
    WITH batch AS (
        SELECT c.installation_id, c.event_time, c.ord,
               jsonb_build_object('platform', c.platform) || coalesce(c.changes, '{}') AS changes
        FROM unnest($2::text[], $3::timestamptz[], $4::smallint[], $5::jsonb[])
             WITH ORDINALITY AS c(installation_id, event_time, platform, changes, ord)
    ),
    latest AS (
        SELECT DISTINCT ON (b.installation_id, f.key) b.installation_id, f.key, f.value,
               b.event_time
        FROM batch b CROSS JOIN LATERAL jsonb_each(b.changes) AS f
        ORDER BY b.installation_id, f.key, b.event_time DESC, b.ord DESC
    ),
    merged AS (
        SELECT l.installation_id, jsonb_object_agg(l.key, l.value) AS v,
               jsonb_object_agg(l.key, l.event_time) AS times,
               min(s.first_seen) AS first_seen, max(s.last_seen) AS last_seen
        FROM latest l
        JOIN (SELECT installation_id, min(event_time) AS first_seen,
                     max(event_time) AS last_seen
              FROM batch GROUP BY installation_id) s USING (installation_id)
        GROUP BY l.installation_id
    ),
    upserted AS (
        INSERT INTO installation_details AS d (project_id, installation_id, platform,
            app_version, os_version, device_model, push_token, push_opt_in, language, timezone,
            uninstalled, field_times, first_seen, last_seen)
        SELECT $1, m.installation_id, (m.v->>'platform')::smallint, m.v->>'app_version',
               m.v->>'os_version', m.v->>'device_model', m.v->>'push_token',
               (m.v->>'push_opt_in')::boolean, m.v->>'language', m.v->>'timezone',
               coalesce((m.v->>'uninstalled')::boolean, false), m.times, m.first_seen,
               m.last_seen
        FROM merged m
        ORDER BY m.installation_id
        ON CONFLICT (project_id, installation_id) DO UPDATE SET
            platform = CASE WHEN profiles_ingest_field_wins(EXCLUDED.field_times,
                d.field_times, 'platform') THEN EXCLUDED.platform ELSE d.platform END,
            app_version = CASE WHEN profiles_ingest_field_wins(EXCLUDED.field_times,
                d.field_times, 'app_version') THEN EXCLUDED.app_version ELSE d.app_version END,
            os_version = CASE WHEN profiles_ingest_field_wins(EXCLUDED.field_times,
                d.field_times, 'os_version') THEN EXCLUDED.os_version ELSE d.os_version END,
            device_model = CASE WHEN profiles_ingest_field_wins(EXCLUDED.field_times,
                d.field_times, 'device_model') THEN EXCLUDED.device_model
                ELSE d.device_model END,
            push_token = CASE WHEN profiles_ingest_field_wins(EXCLUDED.field_times,
                d.field_times, 'push_token') THEN EXCLUDED.push_token ELSE d.push_token END,
            push_opt_in = CASE WHEN profiles_ingest_field_wins(EXCLUDED.field_times,
                d.field_times, 'push_opt_in') THEN EXCLUDED.push_opt_in ELSE d.push_opt_in END,
            language = CASE WHEN profiles_ingest_field_wins(EXCLUDED.field_times,
                d.field_times, 'language') THEN EXCLUDED.language ELSE d.language END,
            timezone = CASE WHEN profiles_ingest_field_wins(EXCLUDED.field_times,
                d.field_times, 'timezone') THEN EXCLUDED.timezone ELSE d.timezone END,
            uninstalled = CASE WHEN profiles_ingest_field_wins(EXCLUDED.field_times,
                d.field_times, 'uninstalled') THEN EXCLUDED.uninstalled ELSE d.uninstalled END,
            field_times = profiles_ingest_field_times(EXCLUDED.field_times, d.field_times),
            first_seen = least(d.first_seen, EXCLUDED.first_seen),
            last_seen = greatest(d.last_seen, EXCLUDED.last_seen)
        RETURNING d.installation_id, d.platform, d.push_token
    )
    SELECT u.installation_id, t.installation_id AS imported_installation_id
    FROM upserted u
    JOIN installation_details t
        ON t.project_id = $1 AND t.platform = u.platform AND t.push_token = u.push_token
           AND t.imported AND t.installation_id <> u.installation_id
    WHERE u.installation_id = ANY($6::text[]) AND u.push_token IS NOT NULL
    ORDER BY u.installation_id, t.installation_id"""

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
    JOIN LATERAL identity_read_installation_profiles($1, ARRAY[d.installation_id]) i ON true
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

# The current profile of installations (identity's link) and whether it is identified; read
# to decide the direction of a reintegration merge.
SELECT_INSTALLATION_PROFILES = """
    SELECT installation_id, profile_id, identified
    FROM identity_read_installation_profiles($1, $2::text[])"""

# Folds an imported installation into the SDK installation that sent a session with its token:
# no longer imported, token dropped (it is the real one's now), the real one recorded. Only
# while still imported, so two batches racing to fold it fold it once (RETURNING says who did).
FOLD_IMPORTED_INSTALLATION = """
    UPDATE installation_details
    SET imported = false, push_token = NULL, reintegrated_into = $3, reintegrate_time = $4
    WHERE project_id = $1 AND installation_id = $2 AND imported
    RETURNING installation_id"""

INSERT_REJECTED_EVENTS = """
    INSERT INTO rejected_events (project_id, receive_time, reason, field_path, message,
                                 event_id, installation_id, custom_id, payload)
    SELECT $1, $2, r.* FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                                  $8::text[], $9::jsonb[]) AS r"""

# One attribute operation of an accepted event: profile, native, name, event time, event ID,
# origin (model.event_origin), position in the event, kind, value ({"type", "value"}, None for
# unset).
OperationRow = tuple[UUID, bool, str, datetime, str, str, int, str, dict[str, Any] | None]
# One accepted consent change: profile, channel, kind, subscribed, event time, event ID, origin.
SubscriptionRow = tuple[UUID, str, str, bool, datetime, str, str]
# One accepted installation event: installation ID, event time, platform, and the other
# fields it sets (None when it sets none).
InstallationChangeRow = tuple[str, datetime, int, dict[str, Any] | None]
# One accepted event naming a session: installation ID, session ID, profile, platform, kind,
# event time, duration (heartbeat and end, else None), country (session start, else "").
SessionEventRow = tuple[str, str, UUID, int, int, datetime, timedelta | None, str]

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
        installation_ids = [e.installation_id for e in events]
        claimed = await conn.fetch(
            CLAIM_INSTALLATION_EVENT_KEYS,
            project_id,
            receive_time,
            installation_ids,
            [e.event_id for e in events],
        )
        if not claimed:
            return []
        rows = await conn.fetch(
            INSERT_INSTALLATION_EVENTS,
            project_id,
            receive_time,
            imported,
            installation_ids,
            *_event_columns(events),
            [r[0] for r in claimed],
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
        custom_ids = [e.custom_id for e in events]
        claimed = await conn.fetch(
            CLAIM_CUSTOM_ID_EVENT_KEYS,
            project_id,
            receive_time,
            custom_ids,
            [e.event_id for e in events],
            list(resolved_profile_ids),
        )
        if not claimed:
            return []
        rows = await conn.fetch(
            INSERT_CUSTOM_ID_EVENTS,
            project_id,
            receive_time,
            imported,
            custom_ids,
            *_event_columns(events),
            list(resolved_profile_ids),
            [r[0] for r in claimed],
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
        self, conn: asyncpg.Connection, project_id: UUID, events: Sequence[SessionEventRow]
    ) -> dict[tuple[str, str], str]:
        """Merges the batch's session events into the stored sessions (UPSERT_SESSIONS);
        returns (installation, session) -> the session's country ("" when unknown)."""
        if not events:
            return {}
        rows = await conn.fetch(UPSERT_SESSIONS, project_id, *map(list, zip(*events, strict=True)))
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

    async def held_custom_attributes(
        self, conn: asyncpg.Connection, project_id: UUID, profile_ids: Sequence[UUID]
    ) -> dict[UUID, set[str]]:
        """profile -> the names of the custom attributes it holds (a value, not unset)."""
        rows = await conn.fetch(SELECT_HELD_CUSTOM_ATTRIBUTES, project_id, list(profile_ids))
        held: dict[UUID, set[str]] = {}
        for r in rows:
            held.setdefault(r["profile_id"], set()).add(r["name"])
        return held

    async def add_attribute_operations(
        self,
        conn: asyncpg.Connection,
        project_id: UUID,
        operations: Sequence[OperationRow],
    ) -> None:
        """Adds the operations to their attributes' logs and replays the attributes touched."""
        if not operations:
            return
        columns = [list(c) for c in zip(*operations, strict=True)]
        await conn.execute(INSERT_ATTRIBUTE_OPERATIONS, project_id, *columns)
        await conn.execute(FOLD_ATTRIBUTES, project_id, *columns[:7])

    async def save_subscriptions(
        self,
        conn: asyncpg.Connection,
        project_id: UUID,
        changes: Sequence[SubscriptionRow],
    ) -> None:
        if not changes:
            return
        await conn.execute(
            UPSERT_SUBSCRIPTIONS, project_id, *[list(c) for c in zip(*changes, strict=True)]
        )

    async def save_installations(
        self,
        conn: asyncpg.Connection,
        project_id: UUID,
        changes: Sequence[InstallationChangeRow],
        session_starters: Sequence[str],
    ) -> list[tuple[str, str]]:
        """Applies the batch's installation changes by event time (UPSERT_INSTALLATION_DETAILS);
        returns (installation ID, imported installation ID) for every installation of
        `session_starters` that holds the token of an imported installation not yet folded."""
        if not changes:
            return []
        rows = await conn.fetch(
            UPSERT_INSTALLATION_DETAILS,
            project_id,
            [c[0] for c in changes],
            [c[1] for c in changes],
            [c[2] for c in changes],
            [c[3] for c in changes],
            list(session_starters),
        )
        return [(r[0], r[1]) for r in rows]

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

    async def installation_profiles(
        self, project_id: UUID, installation_ids: Sequence[str]
    ) -> dict[str, tuple[UUID, bool]]:
        """installation ID -> (its profile, identified) for those linked to a profile."""
        rows = await self._pool.fetch(
            SELECT_INSTALLATION_PROFILES, project_id, list(installation_ids)
        )
        return {r["installation_id"]: (r["profile_id"], r["identified"]) for r in rows}

    async def fold_imported_installation(
        self,
        conn: asyncpg.Connection,
        project_id: UUID,
        imported_installation_id: str,
        installation_id: str,
        now: datetime,
    ) -> bool:
        """Marks the imported installation folded into `installation_id`; False when it was
        not (or no longer) imported."""
        row = await conn.fetchrow(
            FOLD_IMPORTED_INSTALLATION, project_id, imported_installation_id, installation_id, now
        )
        return row is not None

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
