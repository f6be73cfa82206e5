"""Every SQL statement of smart segments (profiles, sessions, stored states, distribution), and
only SQL; methods return model dataclasses. Custom segments and funnels have theirs in
definitions_repository.py.

Tables (services/segments/schema/0005_segments.sql): segment_profiles (who segments knows,
time zone, merge and erasure marks), segment_sessions (one row per session), segment_states (stored
classification per profile and platform, with its schedule of time-only transitions), and
segment_state_counts (profiles per stored segment and flag, kept by triggers on segment_states
in the same transactions, so no statement here maintains it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

import asyncpg

from services.segments.definitions_repository import DefinitionsTransaction
from services.segments.messages import change_to_bus
from services.segments.model import (
    ALL_PLATFORMS,
    PLATFORM_API,
    Classification,
    History,
    MembershipChange,
    SegmentFlag,
    Session,
    SessionUpdate,
    SmartSegment,
    Step,
    StoredState,
    Thresholds,
    valid_time_zone,
    zone_of,
)
from services.segments.transactions import (
    enqueue_changes,
    pooled_connection,
    race_safe_transaction,
)
from shared.erasure_record import ErasedProfile, erased_profiles_page, erasure_horizon
from shared.outbox import OutboxItem, enqueue_many
from shared.topics import SEGMENT_CHANGES

# Registers a profile on first sight (an event, or identity's ProfileCreated); an existing row,
# live, merged or erased, is left alone so that a late message cannot revive an erased profile.
INSERT_PROFILES = """
    INSERT INTO segment_profiles (project_id, profile_id)
    SELECT $1, p FROM unnest($2::uuid[]) AS p
    ON CONFLICT (project_id, profile_id) DO NOTHING"""

# Row locks on the profiles a transaction changes: every writer of a profile's sessions and
# states takes them first (merges in profile_id order), so two writers of one profile queue up
# instead of computing from each other's half-written rows.
LOCK_PROFILES = """
    SELECT profile_id, time_zone, merged_into, erase_time
    FROM segment_profiles
    WHERE project_id = $1 AND profile_id = ANY($2::uuid[])
    ORDER BY profile_id
    FOR UPDATE"""

# Reads resolve a merged-away ID through its row; merges flatten chains, so one hop is enough.
SELECT_PROFILE = """
    SELECT p.profile_id, p.erase_time, p.time_zone,
           s.profile_id AS survivor_id, s.erase_time AS survivor_erase_time,
           s.time_zone AS survivor_time_zone
    FROM segment_profiles p
    LEFT JOIN segment_profiles s
        ON s.project_id = p.project_id AND s.profile_id = p.merged_into
    WHERE p.project_id = $1 AND p.profile_id = $2"""

# The profile's time zone by ingest's rule (its timezone attribute, else its most recently seen
# installation's: 0045), the one GetProfile shows. Read under the profile's lock after ingest
# committed the events being handled, so the last writer stores the latest answer.
SELECT_PROFILE_TIME_ZONE = "SELECT ingest_read_profile_time_zone($1, $2)"

# The stored zone is a copy of the rule's answer (0046).
UPDATE_TIME_ZONE = """
    UPDATE segment_profiles SET time_zone = $3
    WHERE project_id = $1 AND profile_id = $2"""

# One row per session key, so replays and redeliveries update instead of adding: a known start
# beats a guessed one, otherwise the earliest start and the longest duration win; once an end
# was seen the session stays ended (0011). The platform is session_platform(stored, batch's)
# (services/segments/model.py): a device platform over API (4) whatever the order, else the
# batch's. The caller folds a batch to one row per key first (ON CONFLICT may touch a row only
# once per statement), and passes only sessions the batch counts (SessionUpdate.counted).
UPSERT_SESSIONS = """
    INSERT INTO segment_sessions AS s
        (project_id, profile_id, session_key, platform, start_time, start_known, duration_ms,
         ended)
    SELECT $1, $2, e.*
    FROM unnest($3::text[], $4::smallint[], $5::timestamptz[], $6::boolean[], $7::bigint[],
                $8::boolean[]) AS e
    ON CONFLICT (project_id, profile_id, session_key) DO UPDATE SET
        platform = CASE WHEN EXCLUDED.platform = 4 AND s.platform <> 4 THEN s.platform
                        ELSE EXCLUDED.platform END,
        start_time = CASE
            WHEN s.start_known AND NOT EXCLUDED.start_known THEN s.start_time
            WHEN EXCLUDED.start_known AND NOT s.start_known THEN EXCLUDED.start_time
            ELSE least(s.start_time, EXCLUDED.start_time) END,
        start_known = s.start_known OR EXCLUDED.start_known,
        duration_ms = greatest(s.duration_ms, EXCLUDED.duration_ms),
        ended = s.ended OR EXCLUDED.ended"""

# The sessions a batch saw only other events of (SessionUpdate.counted false) take their
# platform by session_platform(stored, batch's) like UPSERT_SESSIONS, when segments has them;
# they never make a row (they do not say a session happened).
UPDATE_SESSION_PLATFORMS = """
    UPDATE segment_sessions s
    SET platform = CASE WHEN e.platform = 4 AND s.platform <> 4 THEN s.platform
                        ELSE e.platform END
    FROM unnest($3::text[], $4::smallint[]) AS e(session_key, platform)
    WHERE s.project_id = $1 AND s.profile_id = $2 AND s.session_key = e.session_key
      AND s.platform <> e.platform"""

# A merge moves the source's sessions to the survivor in one statement; the parts of one session
# several profiles had (a person who logged out and back in within one SDK session: each profile
# had its part of it) are combined like a redelivery. Their platform is session_platform
# (services/segments/model.py), the later part the one whose activity (start + duration) ends
# later: among the moved parts the latest such device platform, API only when all are on API;
# against the survivor's part a device platform over API, else the later part's (the
# survivor's on a tie), as ingest's merge of sessions (0056).
MOVE_SESSIONS = """
    WITH moved AS (
        DELETE FROM segment_sessions WHERE project_id = $1 AND profile_id = ANY($2::uuid[])
        RETURNING session_key, platform, start_time, start_known, duration_ms, ended
    ),
    folded AS (
        SELECT m.session_key,
               coalesce((array_agg(m.platform ORDER BY
                             m.start_time + m.duration_ms * interval '1 millisecond',
                             m.platform) FILTER (WHERE m.platform <> 4))
                            [count(*) FILTER (WHERE m.platform <> 4)],
                        4::smallint) AS platform,
               coalesce(min(m.start_time) FILTER (WHERE m.start_known), min(m.start_time))
                   AS start_time,
               bool_or(m.start_known) AS start_known,
               max(m.duration_ms) AS duration_ms,
               bool_or(m.ended) AS ended
        FROM moved m
        GROUP BY m.session_key
    )
    INSERT INTO segment_sessions AS s
        (project_id, profile_id, session_key, platform, start_time, start_known, duration_ms,
         ended)
    SELECT $1, $3::uuid, f.*
    FROM folded f ORDER BY f.session_key
    ON CONFLICT (project_id, profile_id, session_key) DO UPDATE SET
        platform = CASE
            WHEN EXCLUDED.platform = 4 AND s.platform <> 4 THEN s.platform
            WHEN s.platform = 4 AND EXCLUDED.platform <> 4 THEN EXCLUDED.platform
            WHEN EXCLUDED.start_time + EXCLUDED.duration_ms * interval '1 millisecond'
                 > s.start_time + s.duration_ms * interval '1 millisecond'
                THEN EXCLUDED.platform
            ELSE s.platform END,
        start_time = CASE
            WHEN s.start_known AND NOT EXCLUDED.start_known THEN s.start_time
            WHEN EXCLUDED.start_known AND NOT s.start_known THEN EXCLUDED.start_time
            ELSE least(s.start_time, EXCLUDED.start_time) END,
        start_known = s.start_known OR EXCLUDED.start_known,
        duration_ms = greatest(s.duration_ms, EXCLUDED.duration_ms),
        ended = s.ended OR EXCLUDED.ended"""

# Marks merged-away profiles (and tombstones that pointed at them) as pointing at the survivor,
# so chains resolve in one hop; their own time zone is dropped (the survivor's counts).
MARK_MERGED = """
    UPDATE segment_profiles SET merged_into = $3, time_zone = NULL
    WHERE project_id = $1 AND (profile_id = ANY($2::uuid[]) OR merged_into = ANY($2::uuid[]))
      AND profile_id <> $3"""

# Erasure keeps only the ID and when, so entries still queued for it are skipped; everything
# else segments knew about the profile goes.
MARK_ERASED = """
    UPDATE segment_profiles
    SET erase_time = $3, merged_into = NULL, time_zone = NULL
    WHERE project_id = $1 AND profile_id = ANY($2::uuid[])"""
DELETE_SESSIONS = """
    DELETE FROM segment_sessions WHERE project_id = $1 AND profile_id = ANY($2::uuid[])"""
DELETE_STATES = """
    DELETE FROM segment_states WHERE project_id = $1 AND profile_id = ANY($2::uuid[])"""

# Totals over all sessions ever, per platform and over all (platform NULL), in one pass over
# the profile's rows (PK prefix); calendar days in the profile's zone.
SELECT_AGGREGATES = """
    SELECT platform, count(*) AS session_count, min(start_time) AS first_session_time,
           max(start_time) AS last_session_time,
           count(DISTINCT (start_time AT TIME ZONE $3)::date) AS total_active_days
    FROM segment_sessions
    WHERE project_id = $1 AND profile_id = $2
    GROUP BY GROUPING SETS ((platform), ())"""

# Only the sessions the windows need (segment_sessions_by_start), however long the history.
SELECT_RECENT_SESSIONS = """
    SELECT platform, start_time, duration_ms, ended
    FROM segment_sessions
    WHERE project_id = $1 AND profile_id = $2 AND start_time >= $3
    ORDER BY start_time"""

# The same for a batch of profiles (RecomputeAll, 200 at a time), each day count in its
# profile's zone ($3, aligned with $2): one statement instead of one per profile.
SELECT_AGGREGATES_MANY = """
    SELECT s.profile_id, s.platform, count(*) AS session_count,
           min(s.start_time) AS first_session_time, max(s.start_time) AS last_session_time,
           count(DISTINCT (s.start_time AT TIME ZONE z.zone)::date) AS total_active_days
    FROM unnest($2::uuid[], $3::text[]) AS z(profile_id, zone)
    JOIN segment_sessions s ON s.project_id = $1 AND s.profile_id = z.profile_id
    GROUP BY GROUPING SETS ((s.profile_id, s.platform), (s.profile_id))"""
SELECT_RECENT_SESSIONS_MANY = """
    SELECT profile_id, platform, start_time, duration_ms, ended
    FROM segment_sessions
    WHERE project_id = $1 AND profile_id = ANY($2::uuid[]) AND start_time >= $3
    ORDER BY profile_id, start_time"""
SELECT_STATES_FOR_UPDATE_MANY = """
    SELECT profile_id, platform, segment, flag, upcoming_times, upcoming_segments, upcoming_flags
    FROM segment_states
    WHERE project_id = $1 AND profile_id = ANY($2::uuid[])
    ORDER BY profile_id, platform
    FOR UPDATE"""

SELECT_STATES_FOR_UPDATE = """
    SELECT platform, segment, flag, upcoming_times, upcoming_segments, upcoming_flags
    FROM segment_states
    WHERE project_id = $1 AND profile_id = $2
    FOR UPDATE"""

UPSERT_STATE = """
    INSERT INTO segment_states AS s
        (project_id, profile_id, platform, segment, flag, next_transition_time,
         upcoming_times, upcoming_segments, upcoming_flags, update_time)
    VALUES ($1, $2, $3, $4, $5, coalesce($6::timestamptz, 'infinity'), $7, $8, $9, $10)
    ON CONFLICT (project_id, profile_id, platform) DO UPDATE SET
        segment = EXCLUDED.segment, flag = EXCLUDED.flag,
        next_transition_time = EXCLUDED.next_transition_time,
        upcoming_times = EXCLUDED.upcoming_times, upcoming_segments = EXCLUDED.upcoming_segments,
        upcoming_flags = EXCLUDED.upcoming_flags, update_time = EXCLUDED.update_time"""
# (next_transition_time NULL means "only a new session can change it": stored as 'infinity', so
# the distribution's "> now" test needs no IS NULL branch.)

# The sweep, over every project, oldest transition first through segment_states_due. SKIP
# LOCKED: a row an event transaction holds is being reclassified by it anyway, and replicas
# running the sweep take disjoint rows.
SELECT_DUE_STATES = """
    SELECT project_id, profile_id, platform, segment, flag,
           upcoming_times, upcoming_segments, upcoming_flags
    FROM segment_states
    WHERE next_transition_time <= $1
    ORDER BY next_transition_time
    LIMIT $2
    FOR UPDATE SKIP LOCKED"""

# The segments.* thresholds each project set, beside those its stored states were last
# recomputed with as a whole (segment_thresholds_applied, 0007): a project whose two differ needs
# a recomputation. Only projects with one or the other: a project that never set a threshold nor
# recomputed has run on the defaults throughout. ($1: the threshold setting names.)
SELECT_THRESHOLDS = """
    SELECT p.project_id, a.thresholds AS applied,
           (SELECT jsonb_object_agg(s.name, s.value) FROM project_settings s
            WHERE s.project_id = p.project_id AND s.name = ANY($1::text[])) AS current
    FROM projects p
    LEFT JOIN segment_thresholds_applied a ON a.project_id = p.project_id
    WHERE a.project_id IS NOT NULL
       OR EXISTS (SELECT 1 FROM project_settings s
                  WHERE s.project_id = p.project_id AND s.name = ANY($1::text[]))"""
UPSERT_THRESHOLDS_APPLIED = """
    INSERT INTO segment_thresholds_applied (project_id, thresholds, apply_time)
    VALUES ($1, $2, $3)
    ON CONFLICT (project_id) DO UPDATE SET
        thresholds = EXCLUDED.thresholds, apply_time = EXCLUDED.apply_time"""

# Segments' published read contract (services/segments/schema, segments_read_distribution):
# query calls the same function for its overview, so both are exact as of the `as_of` they
# pass. It reads the
# project's stored counts and corrects only its due rows, so its cost does not grow with the
# number of profiles.
SELECT_DISTRIBUTION = """
    SELECT segment, flag, profile_count FROM segments_read_distribution($1, $2::smallint, $3)"""


# -- the erasure sweep (erasure_sweep.py) -----------------------------------------------------
# (The record's horizon and row shape: shared/erasure_record.py.)
# A page of identity's record from a position on (its index, in its order; $2/$3 the last row
# of the previous page, NULL for the first), each erased ID with whether segments still keeps
# anything of it: a profile row not marked erased (a merged-away one too), a stored state, a
# custom segment membership, or sessions (a batch handled after the erasure's hook dropped them,
# while the profile was not marked erased yet). One primary-key (or by-profile index) probe per
# table and row: LATERAL subqueries with LIMIT 1, since EXISTS in the select list may be
# planned as a hash of the whole table, read at every sweep.
SELECT_ERASED_PROFILES = """
    SELECT e.position, e.project_id, e.profile_id,
        p.found IS NOT NULL OR s.found IS NOT NULL OR m.found IS NOT NULL
            OR x.found IS NOT NULL AS kept
    FROM (
        SELECT e.erase_position::text AS position, e.project_id, e.profile_id
        FROM identity_read_erased_profiles() e
        WHERE e.erase_position >= $1::text::xid8
            AND ($2::uuid IS NULL
                 OR (e.erase_position, e.project_id, e.profile_id)
                    > ($1::text::xid8, $2::uuid, $3::uuid))
        ORDER BY e.erase_position, e.project_id, e.profile_id
        LIMIT $4
    ) e
    LEFT JOIN LATERAL (
        SELECT true AS found FROM segment_profiles p
        WHERE p.project_id = e.project_id AND p.profile_id = e.profile_id
            AND p.erase_time IS NULL
        LIMIT 1
    ) p ON true
    LEFT JOIN LATERAL (
        SELECT true AS found FROM segment_states s
        WHERE s.project_id = e.project_id AND s.profile_id = e.profile_id LIMIT 1
    ) s ON true
    LEFT JOIN LATERAL (
        SELECT true AS found FROM custom_segment_members m
        WHERE m.project_id = e.project_id AND m.profile_id = e.profile_id LIMIT 1
    ) m ON true
    LEFT JOIN LATERAL (
        SELECT true AS found FROM segment_sessions x
        WHERE x.project_id = e.project_id AND x.profile_id = e.profile_id LIMIT 1
    ) x ON true
    ORDER BY e.position::xid8, e.project_id, e.profile_id"""


@dataclass(frozen=True, slots=True)
class ProfileRow:
    profile_id: UUID
    time_zone: str | None
    merged_into: UUID | None
    erase_time: datetime | None


@dataclass(frozen=True, slots=True)
class ResolvedProfile:
    """A requested profile ID resolved to its live profile; `erased` when it is gone."""

    profile_id: UUID
    erased: bool
    time_zone: str | None


@dataclass(frozen=True, slots=True)
class ProjectThresholds:
    """A project's current segment thresholds and those its stored states were last
    recomputed with as a whole."""

    project_id: UUID
    current: Thresholds
    applied: Thresholds


@dataclass(frozen=True, slots=True)
class DueState:
    project_id: UUID
    profile_id: UUID
    platform: int
    state: StoredState


def _stored(row: asyncpg.Record) -> StoredState:
    steps = tuple(
        Step(t, Classification(SmartSegment(s), SegmentFlag(f)))
        for t, s, f in zip(
            row["upcoming_times"], row["upcoming_segments"], row["upcoming_flags"], strict=True
        )
    )
    return StoredState(
        Classification(SmartSegment(row["segment"]), SegmentFlag(row["flag"])), steps
    )


def _session(r: asyncpg.Record) -> Session:
    return Session(
        r["start_time"], timedelta(milliseconds=r["duration_ms"]), r["platform"], r["ended"]
    )


def _history(row: asyncpg.Record, recent: Sequence[Session], zone: str) -> dict[int, History]:
    """One aggregate row (a platform, or all: platform NULL) as the History of that platform."""
    platform = ALL_PLATFORMS if row["platform"] is None else row["platform"]
    return {
        platform: History(
            session_count=row["session_count"],
            first_session_time=row["first_session_time"],
            last_session_time=row["last_session_time"],
            total_active_days=row["total_active_days"],
            recent_sessions=tuple(s for s in recent if platform in (ALL_PLATFORMS, s.platform)),
            time_zone=zone,
        )
    }


class SegmentsRepository:
    """Reads without a transaction, and opens the transactions of the service's use cases."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SegmentsTransaction]:
        """One short transaction; a lost race surfaces as ConcurrentChange after the rollback."""
        async with race_safe_transaction(self._pool) as conn:
            yield SegmentsTransaction(conn)

    async def resolve_profile(self, project_id: UUID, profile_id: UUID) -> ResolvedProfile | None:
        """The live profile of `profile_id` (itself or its survivor); None when unknown."""
        row = await self._pool.fetchrow(SELECT_PROFILE, project_id, profile_id)
        if row is None:
            return None
        if row["survivor_id"] is not None:
            return ResolvedProfile(
                row["survivor_id"],
                row["survivor_erase_time"] is not None,
                row["survivor_time_zone"],
            )
        return ResolvedProfile(row["profile_id"], row["erase_time"] is not None, row["time_zone"])

    async def histories(
        self, project_id: UUID, profile_id: UUID, time_zone: str | None, recent_since: datetime
    ) -> dict[int, History]:
        async with self._pool.acquire() as conn:
            return await SegmentsTransaction(pooled_connection(conn)).histories(
                project_id, profile_id, time_zone, recent_since
            )

    async def erasure_horizon(self) -> int:
        """Where the erasure sweep may start next time, if it reads the record now."""
        return await erasure_horizon(self._pool)

    async def erased_profiles(
        self, position: int, after: ErasedProfile | None, limit: int
    ) -> list[ErasedProfile]:
        """At most `limit` rows of identity's record of erasures from `position` on, after
        `after` (the previous page's last row), in the record's order."""
        return await erased_profiles_page(
            self._pool, SELECT_ERASED_PROFILES, position, after, limit
        )

    async def thresholds(self) -> list[ProjectThresholds]:
        """Every project that set a threshold or was recomputed, with both sets."""
        names = list(Thresholds().to_settings())
        rows = await self._pool.fetch(SELECT_THRESHOLDS, names)
        return [
            ProjectThresholds(
                r["project_id"],
                Thresholds.from_stored(r["current"]),
                Thresholds.from_stored(r["applied"]),
            )
            for r in rows
        ]

    async def record_thresholds(
        self, project_id: UUID, thresholds: Thresholds, now: datetime
    ) -> None:
        """Records that every stored state of the project was recomputed with `thresholds`."""
        await self._pool.execute(
            UPSERT_THRESHOLDS_APPLIED, project_id, thresholds.to_settings(), now
        )

    async def distribution(
        self, project_id: UUID, platform: int, as_of: datetime
    ) -> dict[Classification, int]:
        rows = await self._pool.fetch(SELECT_DISTRIBUTION, project_id, platform, as_of)
        return {
            Classification(SmartSegment(r["segment"]), SegmentFlag(r["flag"])): r["profile_count"]
            for r in rows
        }


class SegmentsTransaction:
    """The statements of one open transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def record_thresholds(
        self, project_id: UUID, thresholds: Thresholds, now: datetime
    ) -> None:
        """Records, in this transaction, that every stored state of the project follows
        `thresholds`."""
        await self._conn.execute(
            UPSERT_THRESHOLDS_APPLIED, project_id, thresholds.to_settings(), now
        )

    async def lock_profiles(
        self, project_id: UUID, profile_ids: Sequence[UUID]
    ) -> dict[UUID, ProfileRow]:
        """Registers the profiles not yet known, then locks them all (in profile_id order)."""
        ids = sorted(set(profile_ids))
        await self._conn.execute(INSERT_PROFILES, project_id, ids)
        rows = await self._conn.fetch(LOCK_PROFILES, project_id, ids)
        return {
            r["profile_id"]: ProfileRow(
                r["profile_id"],
                r["time_zone"],
                r["merged_into"],
                r["erase_time"],
            )
            for r in rows
        }

    async def register_profiles(self, project_id: UUID, profile_ids: Sequence[UUID]) -> None:
        await self._conn.execute(INSERT_PROFILES, project_id, sorted(set(profile_ids)))

    async def enqueue_changes(
        self, project_id: UUID, profile_id: UUID, changes: Sequence[MembershipChange]
    ) -> None:
        """Adds the changes to the outbox, in this transaction and in order."""
        await enqueue_many(
            self._conn,
            [
                OutboxItem(
                    project_id,
                    SEGMENT_CHANGES,
                    change_to_bus(project_id, profile_id, c),
                    profile_id,
                )
                for c in changes
            ],
        )

    async def profile_time_zone(self, project_id: UUID, profile_id: UUID) -> str | None:
        """The profile's time zone by ingest's rule (None: none, or one zoneinfo does not
        know, which counts as UTC like no zone)."""
        zone = await self._conn.fetchval(SELECT_PROFILE_TIME_ZONE, project_id, profile_id)
        return zone if zone and valid_time_zone(zone) else None

    async def update_time_zone(
        self, project_id: UUID, profile_id: UUID, time_zone: str | None
    ) -> None:
        await self._conn.execute(UPDATE_TIME_ZONE, project_id, profile_id, time_zone)

    async def upsert_sessions(
        self, project_id: UUID, profile_id: UUID, sessions: Sequence[SessionUpdate]
    ) -> None:
        """Stores the batch's sessions (one update per key): the counted ones, and the platform
        of those it saw only other events of."""
        counted = [s for s in sessions if s.counted]
        if counted:
            await self._conn.execute(
                UPSERT_SESSIONS,
                project_id,
                profile_id,
                [s.session_key for s in counted],
                [s.platform for s in counted],
                [s.start_time for s in counted],
                [s.start_known for s in counted],
                [s.duration // timedelta(milliseconds=1) for s in counted],
                [s.ended for s in counted],
            )
        # Only a device platform can change a stored one (session_platform): a batch of a
        # session's events all on API (the edge's, most of Countly's) costs no statement.
        seen = [s for s in sessions if not s.counted and s.platform != PLATFORM_API]
        if seen:
            await self._conn.execute(
                UPDATE_SESSION_PLATFORMS,
                project_id,
                profile_id,
                [s.session_key for s in seen],
                [s.platform for s in seen],
            )

    async def move_sessions(
        self, project_id: UUID, source_ids: Sequence[UUID], target_id: UUID
    ) -> None:
        await self._conn.execute(MOVE_SESSIONS, project_id, list(source_ids), target_id)

    async def mark_merged(
        self, project_id: UUID, source_ids: Sequence[UUID], target_id: UUID
    ) -> None:
        await self._conn.execute(MARK_MERGED, project_id, list(source_ids), target_id)

    async def erase(self, project_id: UUID, profile_ids: Sequence[UUID], now: datetime) -> None:
        ids = list(profile_ids)
        await self._conn.execute(DELETE_SESSIONS, project_id, ids)
        await self._conn.execute(DELETE_STATES, project_id, ids)
        await self._conn.execute(MARK_ERASED, project_id, ids, now)

    async def delete_states(self, project_id: UUID, profile_ids: Sequence[UUID]) -> None:
        await self._conn.execute(DELETE_STATES, project_id, list(profile_ids))

    def definitions(self) -> DefinitionsTransaction:
        """The custom segment statements, in this same transaction."""
        return DefinitionsTransaction(self._conn)

    async def histories(
        self, project_id: UUID, profile_id: UUID, time_zone: str | None, recent_since: datetime
    ) -> dict[int, History]:
        """The profile's history over all platforms (key 0) and per platform it has sessions
        on; `recent_sessions` are those started at or after `recent_since`."""
        zone = zone_of(time_zone).key
        aggregates = await self._conn.fetch(SELECT_AGGREGATES, project_id, profile_id, zone)
        recent = [
            _session(r)
            for r in await self._conn.fetch(
                SELECT_RECENT_SESSIONS, project_id, profile_id, recent_since
            )
        ]
        histories = {ALL_PLATFORMS: History.empty(zone)}
        for row in aggregates:
            histories.update(_history(row, recent, zone))
        return histories

    async def histories_many(
        self, project_id: UUID, time_zones: dict[UUID, str | None], recent_since: datetime
    ) -> dict[UUID, dict[int, History]]:
        """`histories` of several profiles (keys of `time_zones`) in two statements."""
        ids = list(time_zones)
        zones = {p: zone_of(z).key for p, z in time_zones.items()}
        aggregates = await self._conn.fetch(
            SELECT_AGGREGATES_MANY, project_id, ids, [zones[p] for p in ids]
        )
        recent: dict[UUID, list[Session]] = {}
        for r in await self._conn.fetch(SELECT_RECENT_SESSIONS_MANY, project_id, ids, recent_since):
            recent.setdefault(r["profile_id"], []).append(_session(r))
        histories = {p: {ALL_PLATFORMS: History.empty(zones[p])} for p in ids}
        for row in aggregates:
            profile_id = row["profile_id"]
            histories[profile_id].update(
                _history(row, recent.get(profile_id, []), zones[profile_id])
            )
        return histories

    async def states_for_update_many(
        self, project_id: UUID, profile_ids: Sequence[UUID]
    ) -> dict[UUID, dict[int, StoredState]]:
        rows = await self._conn.fetch(SELECT_STATES_FOR_UPDATE_MANY, project_id, list(profile_ids))
        states: dict[UUID, dict[int, StoredState]] = {p: {} for p in profile_ids}
        for r in rows:
            states[r["profile_id"]][r["platform"]] = _stored(r)
        return states

    async def save_states_many(
        self,
        project_id: UUID,
        states: Iterable[tuple[UUID, int, StoredState]],
        now: datetime,
    ) -> None:
        await self._conn.executemany(
            UPSERT_STATE,
            [
                (
                    project_id,
                    profile_id,
                    platform,
                    int(state.classification.segment),
                    int(state.classification.flag),
                    state.next_transition_time,
                    [s.time for s in state.schedule],
                    [int(s.classification.segment) for s in state.schedule],
                    [int(s.classification.flag) for s in state.schedule],
                    now,
                )
                for profile_id, platform, state in states
            ],
        )

    async def enqueue_changes_many(
        self, project_id: UUID, changes: Sequence[tuple[UUID, MembershipChange]]
    ) -> None:
        """Adds the changes (profile, change) to the outbox, in this transaction and in order."""
        await enqueue_changes(self._conn, project_id, changes)

    async def states_for_update(self, project_id: UUID, profile_id: UUID) -> dict[int, StoredState]:
        rows = await self._conn.fetch(SELECT_STATES_FOR_UPDATE, project_id, profile_id)
        return {r["platform"]: _stored(r) for r in rows}

    async def save_states(
        self,
        project_id: UUID,
        profile_id: UUID,
        states: Iterable[tuple[int, StoredState]],
        now: datetime,
    ) -> None:
        await self.save_states_many(
            project_id, ((profile_id, platform, state) for platform, state in states), now
        )

    async def due_states(self, now: datetime, limit: int) -> list[DueState]:
        rows = await self._conn.fetch(SELECT_DUE_STATES, now, limit)
        return [DueState(r["project_id"], r["profile_id"], r["platform"], _stored(r)) for r in rows]
