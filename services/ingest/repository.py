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

from services.ingest.errors import StorageUnavailable
from services.ingest.model import HeldAttribute
from services.ingest.validation import RejectedEvent, ValidEvent
from shared.errors import Aborted

# Dedupe: events is partitioned by time and cannot hold a unique index on an event's key
# (0024_events_partitioned.sql), so each batch claims its events' keys in event_keys, in the same
# statement as the insert: ON CONFLICT DO NOTHING makes a retried or concurrent duplicate (which
# waits on the key) claim nothing, RETURNING tells which keys are new, and only their events
# are stored. The claim and the insert join the same locked rows (identity's contract, read
# once per statement), so a key is claimed exactly when its event is stored. Each event's key
# is computed once (the `e` CTE is read twice, hence materialized). The payloads come as one
# json array (the pool's json codec encodes the list in one call), zipped with the other
# columns by ROWS FROM: asyncpg encodes a jsonb[] argument element by element, with its
# iterable checks and a codec call each (bench.arguments: about 1 us of ingest's CPU per event
# more than one document, for about 0.2 us less of PostgreSQL's, which parses each payload into
# jsonb either way). One statement, not two:
# one round trip and one read of identity's rows per batch (issue 19's breakdown).
#
# Installation events take their profile from identity's installation links, each
# installation locked FOR SHARE by identity's read contract (identity_read_installation_links):
# identity moves an installation FOR UPDATE, so an event racing a merge, Identify or Logout
# waits for it and lands on the installation's profile as of its commit, never on a profile the
# installation already left. An installation missing here (erased since it was resolved)
# yields no row (nor key), and the caller resolves it again. ORDER BY ord keeps event_seq in
# request order.
INSERT_INSTALLATION_EVENTS = """
    WITH e AS (
        SELECT e.*, profiles_ingest_event_key(e.installation_id, NULL, e.event_id) AS event_key
        FROM ROWS FROM (unnest($4::text[]), unnest($5::text[]), unnest($6::smallint[]),
                        unnest($7::text[]), unnest($8::timestamptz[]), unnest($9::text[]),
                        unnest($10::smallint[]), json_array_elements($11::json))
             WITH ORDINALITY AS e(installation_id, event_id, kind, name, event_time, session_id,
                                  platform, payload, ord)
    ),
    links AS (
        SELECT installation_id, profile_id FROM identity_read_installation_links($1, $4::text[])
    ),
    claimed AS (
        INSERT INTO event_keys (project_id, event_key, receive_time)
        SELECT $1, e.event_key, $2
        FROM e JOIN links i ON i.installation_id = e.installation_id
        ORDER BY e.ord
        ON CONFLICT DO NOTHING
        RETURNING event_key
    )
    INSERT INTO events (project_id, installation_id, event_id, profile_id, kind, name,
                        event_time, receive_time, session_id, platform, payload, imported)
    SELECT $1, e.installation_id, e.event_id, i.profile_id, e.kind, e.name,
           e.event_time, $2, e.session_id, e.platform, e.payload::jsonb, $3
    FROM e
    JOIN claimed f ON f.event_key = e.event_key
    JOIN links i ON i.installation_id = e.installation_id
    ORDER BY e.ord
    RETURNING installation_id, event_id, profile_id, event_seq"""

# Server-side events name the profile identity resolved for their custom ID; a merge since
# then left it a tombstone pointing at its survivor in one hop, hence its live profile. The
# profiles are locked FOR NO KEY UPDATE (not FOR SHARE) by identity's
# identity_apply_profile_locks because this transaction bumps their versions next: two share
# locks upgrading to update locks would deadlock. Locks are taken in profile_id order so
# concurrent batches queue instead of deadlocking. Keys are claimed as above.
INSERT_CUSTOM_ID_EVENTS = """
    WITH e AS (
        SELECT e.*, profiles_ingest_event_key(NULL, e.custom_id, e.event_id) AS event_key
        FROM ROWS FROM (unnest($4::text[]), unnest($5::text[]), unnest($6::smallint[]),
                        unnest($7::text[]), unnest($8::timestamptz[]), unnest($9::text[]),
                        unnest($10::smallint[]), json_array_elements($11::json),
                        unnest($12::uuid[]))
             WITH ORDINALITY AS e(custom_id, event_id, kind, name, event_time, session_id,
                                  platform, payload, resolved_profile_id, ord)
    ),
    locked AS (
        SELECT profile_id, live_profile_id FROM identity_apply_profile_locks($1, $12::uuid[])
    ),
    claimed AS (
        INSERT INTO event_keys (project_id, event_key, receive_time)
        SELECT $1, e.event_key, $2
        FROM e JOIN locked p ON p.profile_id = e.resolved_profile_id
        ORDER BY p.profile_id, e.ord
        ON CONFLICT DO NOTHING
        RETURNING event_key
    )
    INSERT INTO events (project_id, custom_id, event_id, profile_id, kind, name,
                        event_time, receive_time, session_id, platform, payload, imported)
    SELECT $1, e.custom_id, e.event_id, p.live_profile_id, e.kind, e.name,
           e.event_time, $2, e.session_id, e.platform, e.payload::jsonb, $3
    FROM e
    JOIN claimed f ON f.event_key = e.event_key
    JOIN locked p ON p.profile_id = e.resolved_profile_id
    ORDER BY p.profile_id, e.ord
    RETURNING custom_id, event_id, profile_id, event_seq"""

# The events' totals (profile_event_counts) are added by ingest itself once it holds the
# touched profiles' locks (ADD_EVENT_COUNTS after BUMP_PROFILE_VERSIONS), not by the insert
# trigger inside the insert, where their row locks made concurrent batches wait for each
# other's whole transaction (0027_event_counts_after_profile_locks.sql). Transaction-local.
DEFER_EVENT_COUNTS = "SELECT set_config('profiles.event_counts', 'deferred', true)"

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

# The part of the transaction under the touched profiles' locks, in two calls
# (0027_batch_state_under_profile_locks.sql): concurrent batches over the same profiles wait
# for each other's locked part, so it makes as few round trips as it can. LOCK_BATCH_PROFILES
# bumps the profiles' versions (identity's rule, which locks them in profile_id order: two
# batches for one profile apply their state one after the other without deadlocking; query's
# caches see the new versions: read-your-writes), adds the inserted events' totals and keeps
# their crashes' last crash (0029), and
# answers the custom attributes the profiles with attribute operations hold now, for the
# limit of 50 per profile (the locks keep them current until commit).
LOCK_BATCH_PROFILES = """
    SELECT profile_id, version, attribute_names, attributes_held, attribute_times
    FROM profiles_ingest_lock_batch_profiles($1, $2::uuid[], $3::uuid[], $4::smallint[],
                                             $5::timestamptz[], $6::uuid[], $7::uuid[],
                                             $8::bigint[], $9::text[], $10::text[],
                                             $11::timestamptz[], $12::jsonb[])"""

# APPLY_BATCH_STATE writes every kind of derived state by event time, one set-based statement
# each, in the function: attribute operations joined to their logs and the touched attributes
# replayed (profiles_ingest_fold_attribute, the rule identity's merge runs too; every retried
# event was refused as a duplicate before, so no log key is written twice), the events refused
# for the limit deleted (in the inserting transaction: nobody ever sees them, and events'
# delete trigger drops their keys, so a retry is judged again), consent (per profile, channel
# and kind the change latest by (event time, event ID, origin) wins), installation details
# (per field the latest change by event time, profiles_ingest_field_wins) and sessions (spans
# widen, counts add up, the latest explicit end sets end and duration, the first known
# country stays). It answers the country of every touched session, which heartbeat and end
# events carry on the bus, and the imported installations (ImportTokens) holding the push
# token of an installation that started a session here, which the service then folds into it.
APPLY_BATCH_STATE = """
    SELECT what, installation_id, session_id, country, imported_installation_id
    FROM profiles_ingest_apply_batch_state(
        $1,
        $2::uuid[], $3::boolean[], $4::text[], $5::timestamptz[], $6::text[], $7::text[],
        $8::smallint[], $9::text[], $10::jsonb[],
        $11::bigint[],
        $12::uuid[], $13::text[], $14::text[], $15::boolean[], $16::timestamptz[], $17::text[],
        $18::text[],
        $19::text[], $20::timestamptz[], $21::smallint[], $22::jsonb[], $23::text[],
        $24::text[], $25::text[], $26::uuid[], $27::smallint[], $28::smallint[],
        $29::timestamptz[], $30::interval[], $31::text[])"""

# The sweeper's statement, across projects like the outbox relay: open sessions idle since
# before $1 are closed at their last activity with the duration seen so far. SKIP LOCKED: a
# session being updated by an ingest batch is left for the next sweep; several sweepers
# (replicas) take disjoint rows. Oldest first, by the 10-minute bucket of the last activity
# (sessions_open_by_activity_bucket; 0032_sessions_hot_updates.sql): a session idle since
# before $1 has its bucket before $1, and the ones of the last bucket still active are skipped.
# Each profile's part of a session closes on its own (0054); a part with no country answers its
# session's, from another part, as the batches do.
CLOSE_IDLE_SESSIONS = """
    WITH idle AS (
        SELECT project_id, installation_id, session_id, profile_id FROM sessions
        WHERE NOT closed AND activity_bucket < $1 AND last_activity_time < $1
        ORDER BY activity_bucket
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    )
    UPDATE sessions s SET closed = true, end_time = s.last_activity_time,
        duration = greatest(s.duration, s.last_activity_time - s.start_time)
    FROM idle
    WHERE s.project_id = idle.project_id AND s.installation_id = idle.installation_id
        AND s.session_id = idle.session_id AND s.profile_id = idle.profile_id
    RETURNING s.project_id, s.installation_id, s.session_id, s.profile_id, s.platform,
              coalesce(s.country, (
                  SELECT p.country FROM sessions p
                  WHERE p.project_id = s.project_id AND p.installation_id = s.installation_id
                      AND p.session_id = s.session_id AND p.country IS NOT NULL
                  ORDER BY p.start_time, p.profile_id
                  LIMIT 1)) AS country,
              s.end_time, s.duration"""

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

# A push token names one device: of the installations (not imported) holding a (platform,
# token) that one of $2 holds, the one whose token was reported last (event time; on a tie, one
# of $2, the later arrival) keeps it, and those on another profile (identity's links) lose it
# and their opt-in, their times moved to the keeper's so that a late, older report cannot give
# it back. Installations of one profile keep theirs: a person's two phones, each its own token,
# may be one installation after login (Countly, PostHog mobile) beside their own of before it.
# The update re-checks each loser under its row lock: a report of the token it committed
# meanwhile, newer than the keeper's, keeps it. Answers each loser with its keeper. (The
# imported installations' tokens are reintegration's: FOLD_IMPORTED_INSTALLATION.)
MOVE_PUSH_TOKENS = """
    WITH reported AS (
        SELECT DISTINCT r.platform, r.push_token
        FROM installation_details r
        WHERE r.project_id = $1 AND r.installation_id = ANY($2::text[])
          AND r.push_token IS NOT NULL AND NOT r.imported
    ),
    holders AS (
        SELECT d.installation_id, d.platform, d.push_token,
               coalesce((d.field_times->>'push_token')::timestamptz, '-infinity') AS token_time,
               d.installation_id = ANY($2::text[]) AS reporting
        FROM reported r
        JOIN installation_details d
          ON d.project_id = $1 AND d.platform = r.platform AND d.push_token = r.push_token
        WHERE NOT d.imported
    ),
    ranked AS (
        SELECT h.*, l.profile_id,
               row_number() OVER (
                   PARTITION BY h.platform, h.push_token
                   ORDER BY h.token_time DESC, h.reporting DESC, h.installation_id DESC
               ) AS rank
        FROM holders h
        LEFT JOIN identity_read_installation_profiles(
            $1, ARRAY(SELECT installation_id FROM holders)) l USING (installation_id)
    ),
    moves AS (
        SELECT lost.installation_id, lost.platform, lost.push_token,
               kept.installation_id AS kept_by, kept.token_time,
               jsonb_build_object('push_token', kept.token_time,
                                  'push_opt_in', kept.token_time) AS changed
        FROM ranked lost
        JOIN ranked kept
          ON kept.platform = lost.platform AND kept.push_token = lost.push_token
         AND kept.rank = 1
        WHERE lost.rank > 1 AND lost.profile_id IS DISTINCT FROM kept.profile_id
    )
    UPDATE installation_details d
    SET push_token = NULL,
        push_opt_in = CASE WHEN profiles_ingest_field_wins(m.changed, d.field_times, 'push_opt_in')
                           THEN false ELSE d.push_opt_in END,
        field_times = profiles_ingest_field_times(m.changed, d.field_times)
    FROM moves m
    WHERE d.project_id = $1 AND d.installation_id = m.installation_id
      AND d.platform = m.platform AND d.push_token = m.push_token
      AND profiles_ingest_field_wins(m.changed, d.field_times, 'push_token')
    RETURNING d.installation_id, m.kept_by, m.token_time"""

# Each names the profile its installation belongs to as it arrives (identity's links; NULL for
# an installation identity does not know, and for a custom ID's), which the erasure and the export
# go by: a logout later moves the installation, not what arrived before it (0047).
#
# A retry stores nothing twice (0064): a row with an event ID has a dedupe key (origin as kept,
# event ID, reason and field path: profiles_ingest_rejected_key), claimed in event_keys in the
# same statement as the events' keys are. ON CONFLICT DO NOTHING RETURNING says which keys are
# new; a concurrent retry waits on the key and claims nothing. Only the first row of each
# claimed key is stored (a batch, or a group of batches, may carry the same refusal twice), and
# every row without an event ID, which has no identity. Keys are claimed in key order, so two
# batches sharing some queue instead of deadlocking. ORDER BY ord keeps rejected_seq in request
# order. Only batches with rejected events run this statement (insert_rejected_events).
INSERT_REJECTED_EVENTS = """
    WITH r AS (
        SELECT r.*, profiles_ingest_rejected_key(r.installation_id, r.custom_id, r.event_id,
                                                 r.reason, r.field_path) AS rejected_key
        FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                    $9::jsonb[])
             WITH ORDINALITY AS r(reason, field_path, message, event_id, installation_id,
                                  custom_id, payload, ord)
    ),
    claimed AS (
        INSERT INTO event_keys (project_id, event_key, receive_time)
        SELECT DISTINCT $1::uuid, rejected_key, $2::timestamptz
        FROM r WHERE rejected_key IS NOT NULL
        ORDER BY 2
        ON CONFLICT DO NOTHING
        RETURNING event_key
    ),
    kept AS (
        SELECT DISTINCT ON (r.rejected_key) r.*
        FROM r JOIN claimed c ON c.event_key = r.rejected_key
        ORDER BY r.rejected_key, r.ord
    )
    INSERT INTO rejected_events (project_id, receive_time, reason, field_path, message,
                                 event_id, installation_id, custom_id, payload, profile_id)
    SELECT $1, $2, k.reason, k.field_path, k.message, k.event_id, k.installation_id,
           k.custom_id, k.payload,
           (SELECT i.profile_id FROM identity_read_installations() i
            WHERE i.project_id = $1 AND i.installation_id = k.installation_id)
    FROM (SELECT * FROM kept UNION ALL SELECT * FROM r WHERE r.rejected_key IS NULL) k
    ORDER BY k.ord"""

# One attribute operation of an accepted event: profile, native, name, event time, event ID,
# origin (model.event_origin), position in the event, kind, value ({"type", "value"}, None for
# unset).
OperationRow = tuple[UUID, bool, str, datetime, str, str, int, str, dict[str, Any] | None]
# One accepted consent change: profile, channel, kind, subscribed, event time, event ID, origin.
SubscriptionRow = tuple[UUID, str, str, bool, datetime, str, str]
# One accepted installation event: installation ID, event time, platform, and the other
# fields it sets (None when it sets none).
InstallationChangeRow = tuple[str, datetime, int, dict[str, Any] | None]
# One inserted crash as its profile's last crash keeps it: profile, event_seq, event ID,
# installation ID (None for a custom ID's), event time, payload as stored (its name, reason and
# fatal read by profiles_ingest_crash_fields, 0038).
CrashRow = tuple[UUID, int, str, str | None, datetime, dict[str, Any]]
# One accepted event naming a session: installation ID, session ID, profile, platform, kind,
# event time, duration (heartbeat and end, else None), country (session start, else "").
SessionEventRow = tuple[str, str, UUID, int, int, datetime, timedelta | None, str]


@dataclass(frozen=True, slots=True)
class BatchState:
    """What a batch writes under its profiles' locks, as rows of each kind (APPLY_BATCH_STATE)."""

    operations: Sequence[OperationRow] = ()
    refused_event_seqs: Sequence[int] = ()
    subscriptions: Sequence[SubscriptionRow] = ()
    installations: Sequence[InstallationChangeRow] = ()
    session_starters: Sequence[str] = ()
    session_events: Sequence[SessionEventRow] = ()


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as `width` column lists (empty lists for no rows), the unnest arrays' form."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(c) for c in zip(*rows, strict=True)]


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

    async def defer_event_counts(self, conn: asyncpg.Connection) -> None:
        """This transaction's event inserts leave the totals to add_event_counts."""
        await conn.execute(DEFER_EVENT_COUNTS)

    async def lock_batch_profiles(
        self,
        conn: asyncpg.Connection,
        project_id: UUID,
        inserted: Sequence[tuple[UUID, int, datetime]],
        held_of: Sequence[UUID],
        crashes: Sequence[CrashRow],
    ) -> tuple[dict[UUID, int], dict[UUID, dict[str, HeldAttribute]]]:
        """Locks and bumps the profiles of the `inserted` events (profile, kind, event time),
        adds those events to their totals and keeps the last crash of the inserted `crashes`
        (LOCK_BATCH_PROFILES); returns each profile's new version, and for the profiles of
        `held_of` their custom attributes (held or unset, with their latest change's time)."""
        profiles, kinds, times = (list(c) for c in zip(*inserted, strict=True))
        rows = await conn.fetch(
            LOCK_BATCH_PROFILES,
            project_id,
            sorted(set(profiles)),
            profiles,
            kinds,
            times,
            sorted(set(held_of)),
            *_columns(crashes, 6),
        )
        # Version rows first, then one row per asked profile with version NULL.
        versions = {r["profile_id"]: r["version"] for r in rows if r["version"] is not None}
        attributes = {
            r["profile_id"]: {
                name: HeldAttribute(held, time)
                for name, held, time in zip(
                    r["attribute_names"] or (),
                    r["attributes_held"] or (),
                    r["attribute_times"] or (),
                    strict=True,
                )
            }
            for r in rows
            if r["version"] is None
        }
        return versions, attributes

    async def apply_batch_state(
        self,
        conn: asyncpg.Connection,
        project_id: UUID,
        state: BatchState,
    ) -> tuple[dict[tuple[str, str], str], list[tuple[str, str]]]:
        """Applies the batch's derived state (APPLY_BATCH_STATE); returns (installation,
        session) -> the session's country ("" when unknown) for every touched session, and
        (installation ID, imported installation ID) for every installation of
        `state.session_starters` that holds the token of an imported installation not yet
        folded."""
        rows = await conn.fetch(
            APPLY_BATCH_STATE,
            project_id,
            *_columns(state.operations, 9),
            list(state.refused_event_seqs),
            *_columns(state.subscriptions, 7),
            *_columns(state.installations, 4),
            list(state.session_starters),
            *_columns(state.session_events, 8),
        )
        countries: dict[tuple[str, str], str] = {}
        reintegrations: list[tuple[str, str]] = []
        for r in rows:
            if r["what"] == "session":
                # A session two profiles have parts of answers once per part; the country
                # belongs to the installation's session, whichever part knows it.
                key = (r["installation_id"], r["session_id"])
                countries[key] = r["country"] or countries.get(key, "")
            else:
                reintegrations.append((r["installation_id"], r["imported_installation_id"]))
        return countries, reintegrations

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
        self,
        project_id: UUID,
        installation_ids: Sequence[str],
        conn: asyncpg.Connection | None = None,
    ) -> dict[str, tuple[UUID, bool]]:
        """installation ID -> (its profile, identified) for those linked to a profile (read
        on `conn` when given, else on a connection of the pool)."""
        rows = await (conn or self._pool).fetch(
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

    async def move_push_tokens(
        self, conn: asyncpg.Connection, project_id: UUID, installation_ids: Sequence[str]
    ) -> list[tuple[str, str, datetime | None]]:
        """Takes each token these installations hold from the other installations holding it
        (MOVE_PUSH_TOKENS): (installation that lost it, installation that keeps it, the
        keeper's token time) for each move."""
        rows = await conn.fetch(MOVE_PUSH_TOKENS, project_id, list(installation_ids))
        return [(r["installation_id"], r["kept_by"], r["token_time"]) for r in rows]

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
