"""Every SQL statement of segments, and only SQL; methods return model dataclasses.

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
from typing import Any, cast
from uuid import UUID

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from services.segments.errors import ConcurrentChange
from services.segments.filter_sql import (
    SqlBuilder,
    compile_filter,
    funnel_counts_sql,
    funnel_occurrences_sql,
)
from services.segments.messages import change_to_bus
from services.segments.model import (
    ALL_PLATFORMS,
    Classification,
    CustomSegment,
    FilterNode,
    Funnel,
    FunnelDefinition,
    History,
    MembershipChange,
    SegmentDefinition,
    SegmentFlag,
    Session,
    SessionUpdate,
    SmartSegment,
    Step,
    StoredState,
    Thresholds,
    filter_from_json,
    filter_to_json,
    steps_from_json,
    steps_to_json,
    zone_of,
)
from shared.outbox import OutboxItem, enqueue_many
from shared.topics import SEGMENT_CHANGES

# Lost races between writers of the same profiles (an event transaction that followed a merged
# ID into its survivor while a merge locked them the other way round): the transaction rolled
# back entirely and may be retried.
RACE_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)

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
    SELECT profile_id, time_zone, time_zone_time, merged_into, erase_time
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

# The latest time zone signal by event time wins, whatever order the events arrive in.
UPDATE_TIME_ZONE = """
    UPDATE segment_profiles SET time_zone = $3, time_zone_time = $4
    WHERE project_id = $1 AND profile_id = $2
      AND (time_zone_time IS NULL OR time_zone_time <= $4)"""

# One row per session key, so replays and redeliveries update instead of adding: a known start
# beats a guessed one, otherwise the earliest start and the longest duration win; once an end
# was seen the session stays ended (0011). The caller folds a batch to one row per key first
# (ON CONFLICT may touch a row only once per statement).
UPSERT_SESSIONS = """
    INSERT INTO segment_sessions AS s
        (project_id, profile_id, session_key, platform, start_time, start_known, duration_ms,
         ended)
    SELECT $1, $2, e.*
    FROM unnest($3::text[], $4::smallint[], $5::timestamptz[], $6::boolean[], $7::bigint[],
                $8::boolean[]) AS e
    ON CONFLICT (project_id, profile_id, session_key) DO UPDATE SET
        start_time = CASE
            WHEN s.start_known AND NOT EXCLUDED.start_known THEN s.start_time
            WHEN EXCLUDED.start_known AND NOT s.start_known THEN EXCLUDED.start_time
            ELSE least(s.start_time, EXCLUDED.start_time) END,
        start_known = s.start_known OR EXCLUDED.start_known,
        duration_ms = greatest(s.duration_ms, EXCLUDED.duration_ms),
        ended = s.ended OR EXCLUDED.ended"""

# A merge moves the source's sessions to the survivor in one statement; a session both have
# (never expected: session keys include the installation) is combined like a redelivery.
MOVE_SESSIONS = """
    WITH moved AS (
        DELETE FROM segment_sessions WHERE project_id = $1 AND profile_id = ANY($2::uuid[])
        RETURNING session_key, platform, start_time, start_known, duration_ms, ended
    )
    INSERT INTO segment_sessions AS s
        (project_id, profile_id, session_key, platform, start_time, start_known, duration_ms,
         ended)
    SELECT DISTINCT ON (session_key) $1, $3::uuid, m.*
    FROM moved m ORDER BY session_key, start_known DESC, duration_ms DESC
    ON CONFLICT (project_id, profile_id, session_key) DO UPDATE SET
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
    UPDATE segment_profiles SET merged_into = $3, time_zone = NULL, time_zone_time = NULL
    WHERE project_id = $1 AND (profile_id = ANY($2::uuid[]) OR merged_into = ANY($2::uuid[]))
      AND profile_id <> $3"""

# Erasure keeps only the ID and when, so entries still queued for it are skipped; everything
# else segments knew about the profile goes.
MARK_ERASED = """
    UPDATE segment_profiles
    SET erase_time = $3, merged_into = NULL, time_zone = NULL, time_zone_time = NULL
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

# READ CONTRACT: the function is defined and documented in 0005_segments.sql; query calls the
# same function for its overview, so both are exact as of the `as_of` they pass. It reads the
# project's stored counts and corrects only its due rows, so its cost does not grow with the
# number of profiles.
SELECT_DISTRIBUTION = """
    SELECT segment, flag, profile_count FROM segment_distribution($1, $2::smallint, $3)"""


@dataclass(frozen=True, slots=True)
class ProfileRow:
    profile_id: UUID
    time_zone: str | None
    time_zone_time: datetime | None
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


def _connection(conn: PoolConnectionProxy[asyncpg.Record]) -> asyncpg.Connection:
    """A pooled connection typed as the Connection it stands for (it forwards every call)."""
    return cast(asyncpg.Connection, conn)


@asynccontextmanager
async def _race_safe_transaction(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """One short transaction; a lost race surfaces as ConcurrentChange after the rollback."""
    try:
        async with pool.acquire() as conn, conn.transaction():
            yield _connection(conn)
    except RACE_ERRORS as exc:
        raise ConcurrentChange("a concurrent change to the same profiles won; retry") from exc


class SegmentsRepository:
    """Reads without a transaction, and opens the transactions of the service's use cases."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SegmentsTransaction]:
        """One short transaction; a lost race surfaces as ConcurrentChange after the rollback."""
        async with _race_safe_transaction(self._pool) as conn:
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
            return await SegmentsTransaction(_connection(conn)).histories(
                project_id, profile_id, time_zone, recent_since
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
                r["time_zone_time"],
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

    async def update_time_zone(
        self, project_id: UUID, profile_id: UUID, time_zone: str | None, event_time: datetime
    ) -> None:
        await self._conn.execute(UPDATE_TIME_ZONE, project_id, profile_id, time_zone, event_time)

    async def upsert_sessions(
        self, project_id: UUID, profile_id: UUID, sessions: Sequence[SessionUpdate]
    ) -> None:
        if not sessions:
            return
        await self._conn.execute(
            UPSERT_SESSIONS,
            project_id,
            profile_id,
            [s.session_key for s in sessions],
            [s.platform for s in sessions],
            [s.start_time for s in sessions],
            [s.start_known for s in sessions],
            [s.duration // timedelta(milliseconds=1) for s in sessions],
            [s.ended for s in sessions],
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
        await _enqueue_changes(self._conn, project_id, changes)

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


# --- custom segments and funnels ------------------------------------------------------------

# Serializes definition writes of one project (the count limit and the name check happen in
# the same transaction as the insert); `kind` keeps segments and funnels apart.
LOCK_DEFINITIONS = """
    SELECT pg_advisory_xact_lock(hashtextextended($2::text || ':' || $1::uuid::text, 0))"""

# The size is the sum of the segment's counter shards (custom_segment_sizes, kept by triggers on
# custom_segment_members, 0007): a few rows whatever the number of profiles, read in the same
# statement (one snapshot) as the segment and its last evaluation time.
SELECT_SEGMENT_COLUMNS = """
    SELECT segment_id, display_name, description, filter, create_time, create_seq,
           definition_hash, evaluate_time,
           (SELECT coalesce(sum(z.member_count), 0) FROM custom_segment_sizes z
            WHERE z.project_id = g.project_id AND z.segment_id = g.segment_id) AS size
    FROM custom_segments g"""
SELECT_SEGMENT_BY_ID = SELECT_SEGMENT_COLUMNS + " WHERE project_id = $1 AND segment_id = $2"
SELECT_SEGMENT_BY_REQUEST_ID = SELECT_SEGMENT_COLUMNS + " WHERE project_id = $1 AND request_id = $2"
# Oldest first, keyset on create_seq (custom_segments_by_seq).
LIST_SEGMENTS = (
    SELECT_SEGMENT_COLUMNS
    + " WHERE project_id = $1 AND create_seq > $2 ORDER BY create_seq LIMIT $3"
)
SEGMENT_NAME_TAKEN = """
    SELECT EXISTS (SELECT 1 FROM custom_segments
                   WHERE project_id = $1 AND lower(display_name) = lower($2))"""
COUNT_SEGMENTS = "SELECT count(*) FROM custom_segments WHERE project_id = $1"
INSERT_SEGMENT = """
    INSERT INTO custom_segments (project_id, segment_id, display_name, description, filter,
                                 request_id, definition_hash, create_time, evaluate_time)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)"""
DELETE_SEGMENT = """
    DELETE FROM custom_segments WHERE project_id = $1 AND segment_id = $2 RETURNING 1"""
DELETE_SEGMENT_MEMBERS = """
    DELETE FROM custom_segment_members WHERE project_id = $1 AND segment_id = $2"""
# After the members: their trigger has brought the shards to zero; the rows go with the segment.
DELETE_SEGMENT_SIZES = """
    DELETE FROM custom_segment_sizes WHERE project_id = $1 AND segment_id = $2"""
# Every segment of every project, for the evaluation worker (at most 100 per project).
SELECT_ALL_SEGMENTS = """
    SELECT project_id, segment_id, filter, create_time, evaluate_time FROM custom_segments
    ORDER BY project_id, create_seq"""
SELECT_PROJECT_SEGMENTS = """
    SELECT project_id, segment_id, filter, create_time, evaluate_time FROM custom_segments
    WHERE project_id = $1 ORDER BY create_seq"""
# One evaluator per segment at a time: replicas skip a segment another one is evaluating, and
# a deleted segment is skipped. NO KEY UPDATE, so that event transactions, which hold the
# project's segments FOR KEY SHARE while they evaluate one profile, neither wait for the sweep
# nor make it skip the segment.
LOCK_SEGMENT = """
    SELECT filter FROM custom_segments WHERE project_id = $1 AND segment_id = $2
    FOR NO KEY UPDATE SKIP LOCKED"""
# The project's segments, for evaluating one profile in an event transaction. FOR KEY SHARE: a
# DeleteSegment waits until the transaction commits (so no member row outlives its segment),
# while the sweep's NO KEY UPDATE lock and its evaluate_time update go on beside it.
SELECT_SEGMENTS_FOR_PROFILE = """
    SELECT segment_id, filter FROM custom_segments WHERE project_id = $1
    ORDER BY create_seq
    FOR KEY SHARE"""
# A profile's memberships (custom_segment_members_by_profile).
SELECT_PROFILE_MEMBERSHIPS = """
    SELECT segment_id FROM custom_segment_members WHERE project_id = $1 AND profile_id = $2"""
# The sweep locks the profiles it is about to move in or out, as every event transaction does
# (segment_profiles rows, profile_id order), so that it re-checks them after any event being
# handled has committed and never announces from a stale read. A live profile segments has not
# heard of yet is registered, as lock_profiles does.
REGISTER_LIVE_PROFILES = """
    INSERT INTO segment_profiles (project_id, profile_id)
    SELECT $1, p.profile_id FROM profiles p
    WHERE p.project_id = $1 AND p.profile_id = ANY($2::uuid[])
    ON CONFLICT (project_id, profile_id) DO NOTHING"""
LOCK_SEGMENT_PROFILES = """
    SELECT profile_id FROM segment_profiles
    WHERE project_id = $1 AND profile_id = ANY($2::uuid[])
    ORDER BY profile_id
    FOR UPDATE"""
# Written by the last batch of an evaluation only (it found fewer than a batch to move, so
# after it every profile matches as of its moment): the time as of which the size is exact.
TOUCH_SEGMENT = """
    UPDATE custom_segments SET evaluate_time = $3 WHERE project_id = $1 AND segment_id = $2"""
# Both return the rows they really changed: only those are announced, so two evaluators that
# raced on one profile (which the profile locks prevent) still could not announce it twice.
INSERT_MEMBERS = """
    INSERT INTO custom_segment_members (project_id, segment_id, profile_id, enter_time)
    SELECT $1, $2, unnest($3::uuid[]), $4 ON CONFLICT DO NOTHING
    RETURNING profile_id"""
DELETE_MEMBERS = """
    DELETE FROM custom_segment_members
    WHERE project_id = $1 AND segment_id = $2 AND profile_id = ANY($3::uuid[])
    RETURNING profile_id"""

# Templates completed with a compiled filter (filter_sql.compile_filter: fixed SQL text with
# $n parameters only): {where} is the filter over `p`, {n} the number of the first parameter
# after the filter's. The universe is the project's live profiles (merged-away ones point at
# their survivor; erased ones are deleted by identity).
# ($2, the moment of evaluation, is typed here because a filter without time conditions does
# not mention it, and PostgreSQL must know every parameter's type.)
LIVE_PROFILES = (
    "FROM profiles p WHERE p.project_id = $1 AND p.merged_into IS NULL"
    " AND $2::timestamptz IS NOT NULL"
)
# The live count: one pass over the project's live profiles, each condition a correlated
# lookup through the per-profile indexes of its table; linear in the project's profiles, so
# sizes are read from the counted members instead (SELECT_SEGMENT_COLUMNS).
COUNT_MATCHING = "SELECT count(*) " + LIVE_PROFILES + " AND {where}"
FILL_MEMBERS = (
    "INSERT INTO custom_segment_members (project_id, segment_id, profile_id, enter_time)"
    " SELECT $1, ${n}::uuid, p.profile_id, $2 " + LIVE_PROFILES + " AND {where}"
)
# Live matching profiles not yet members, a bounded batch in no particular order: an order would
# walk the primary key and fetch the heap at random (2.5-3.0 s at a million profiles against
# 2.1 s for this sequential scan); each batch asks again for those not yet members, and the
# candidates are locked in profile_id order anyway.
SELECT_ENTERED = (
    "SELECT p.profile_id " + LIVE_PROFILES + " AND {where} AND NOT EXISTS (SELECT 1"
    " FROM custom_segment_members m WHERE m.project_id = $1 AND m.segment_id = ${n}::uuid"
    " AND m.profile_id = p.profile_id) LIMIT ${m}::int"
)
# Members that no longer match, with why: erased (no profile row), merged away, or the filter.
# The profile is looked up per member (LATERAL ... LIMIT 1 keeps the planner from hashing the
# whole profiles table: 0.4 s at a million profiles for a segment of 6,000 members).
SELECT_LEFT = (
    "SELECT m.profile_id FROM custom_segment_members m LEFT JOIN LATERAL (SELECT * FROM"
    " profiles q WHERE q.project_id = m.project_id AND q.profile_id = m.profile_id LIMIT 1) p"
    " ON true"
    " WHERE m.project_id = $1 AND m.segment_id = ${n}::uuid AND $2::timestamptz IS NOT NULL"
    " AND NOT (CASE WHEN p.profile_id IS NULL OR p.merged_into IS NOT NULL THEN false"
    " ELSE {where} END) ORDER BY m.profile_id LIMIT ${m}::int"
)
# The sweep's re-check of its candidates, once locked: for each, whether it is erased (no
# profile row), merged away, a member, and matching now.
CHECK_PROFILES = (
    "SELECT $2::timestamptz AS as_of, c.profile_id, p.profile_id IS NULL AS erased,"
    " p.merged_into IS NOT NULL AS merged,"
    " EXISTS (SELECT 1 FROM custom_segment_members m WHERE m.project_id = $1"
    " AND m.segment_id = ${n}::uuid AND m.profile_id = c.profile_id) AS member,"
    " CASE WHEN p.profile_id IS NULL OR p.merged_into IS NOT NULL THEN false"
    " ELSE coalesce({where}, false) END AS matches"
    " FROM unnest(${m}::uuid[]) AS c(profile_id) LEFT JOIN profiles p"
    " ON p.project_id = $1 AND p.profile_id = c.profile_id ORDER BY c.profile_id"
)
# One profile ($3) against several segments' filters at once (one column each, {columns}):
# the per-profile evaluation of an event transaction, one round trip per chunk of segments,
# each condition a lookup through the per-profile indexes. No row: the profile is erased.
MATCH_PROFILE = (
    "SELECT $2::timestamptz AS as_of, p.merged_into IS NOT NULL AS merged,"
    " ARRAY[{columns}]::boolean[] AS matches"
    " FROM profiles p WHERE p.project_id = $1 AND p.profile_id = $3"
)
# (as_of comes first: PostgreSQL types a parameter at its first use, and the filters use $2 in
# arithmetic that would otherwise make it an interval.)
# Segments per MATCH_PROFILE statement: keeps its parameters (a few per condition, at most 31
# conditions per segment) far below PostgreSQL's 32,767.
MATCH_CHUNK = 25

SELECT_FUNNEL_COLUMNS = """
    SELECT funnel_id, display_name, description, steps, conversion_window_ms, create_time,
           create_seq, definition_hash
    FROM funnels"""
SELECT_FUNNEL_BY_ID = SELECT_FUNNEL_COLUMNS + " WHERE project_id = $1 AND funnel_id = $2"
SELECT_FUNNEL_BY_REQUEST_ID = SELECT_FUNNEL_COLUMNS + " WHERE project_id = $1 AND request_id = $2"
LIST_FUNNELS = (
    SELECT_FUNNEL_COLUMNS
    + " WHERE project_id = $1 AND create_seq > $2 ORDER BY create_seq LIMIT $3"
)
FUNNEL_NAME_TAKEN = """
    SELECT EXISTS (SELECT 1 FROM funnels
                   WHERE project_id = $1 AND lower(display_name) = lower($2))"""
COUNT_FUNNELS = "SELECT count(*) FROM funnels WHERE project_id = $1"
INSERT_FUNNEL = """
    INSERT INTO funnels (project_id, funnel_id, display_name, description, steps,
                         conversion_window_ms, request_id, definition_hash, create_time)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"""
DELETE_FUNNEL = "DELETE FROM funnels WHERE project_id = $1 AND funnel_id = $2 RETURNING 1"

# RecomputeAll: the project's live profiles known to segments, a keyset batch at a time.
COUNT_LIVE_SEGMENT_PROFILES = """
    SELECT count(*) FROM segment_profiles
    WHERE project_id = $1 AND merged_into IS NULL AND erase_time IS NULL"""
SELECT_LIVE_SEGMENT_PROFILES = """
    SELECT profile_id FROM segment_profiles
    WHERE project_id = $1 AND merged_into IS NULL AND erase_time IS NULL AND profile_id > $2
    ORDER BY profile_id LIMIT $3"""
COUNT_LIVE_PROFILES = (
    "SELECT count(*) FROM profiles p WHERE p.project_id = $1 AND p.merged_into IS NULL"
)


@dataclass(frozen=True, slots=True)
class StoredSegment:
    segment: CustomSegment
    seq: int
    fingerprint: str


@dataclass(frozen=True, slots=True)
class StoredFunnel:
    funnel: Funnel
    seq: int
    fingerprint: str


@dataclass(frozen=True, slots=True)
class SegmentRef:
    project_id: UUID
    segment_id: UUID
    filter: FilterNode
    create_time: datetime
    evaluate_time: datetime | None


@dataclass(frozen=True, slots=True)
class ProfileCheck:
    """Where one profile stands against one segment's filter, as of one evaluation."""

    profile_id: UUID
    erased: bool
    merged: bool
    member: bool
    matches: bool


@dataclass(frozen=True, slots=True)
class ProfileMatch:
    """One profile against its project's segments: `matches[i]` for the i-th segment given."""

    merged: bool
    matches: tuple[bool, ...]


def _compiled(node: FilterNode, template: str, extra: int = 0) -> tuple[str, list[Any], int]:
    """The template completed with the filter; returns (sql, filter params, first extra $n)."""
    builder = SqlBuilder(first=3)
    where = compile_filter(node, builder)
    n = builder.next_number()
    return template.format(where=where, n=n, m=n + 1), builder.params, n


def _segment(row: asyncpg.Record) -> StoredSegment:
    """The stored segment; its size_time is its last complete evaluation (the service tells
    when the size is exact from it, see model.size_exact_as_of)."""
    return StoredSegment(
        CustomSegment(
            row["segment_id"],
            row["display_name"],
            row["description"],
            filter_from_json(row["filter"]),
            row["create_time"],
            int(row["size"]),
            row["evaluate_time"] or row["create_time"],
        ),
        row["create_seq"],
        row["definition_hash"],
    )


def _funnel(row: asyncpg.Record) -> StoredFunnel:
    return StoredFunnel(
        Funnel(
            row["funnel_id"],
            row["display_name"],
            row["description"],
            steps_from_json(row["steps"]),
            timedelta(milliseconds=row["conversion_window_ms"]),
            row["create_time"],
        ),
        row["create_seq"],
        row["definition_hash"],
    )


class DefinitionsRepository:
    """Custom segments and funnels: definitions, live sizes and counts, membership diffs."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[DefinitionsTransaction]:
        """One short transaction; a lost race surfaces as ConcurrentChange after the rollback."""
        async with _race_safe_transaction(self._pool) as conn:
            yield DefinitionsTransaction(conn)

    async def count_matching(self, project_id: UUID, node: FilterNode, now: datetime) -> int:
        """The live count of the profiles matching the filter as of `now` (one pass over the
        project's live profiles: the reference the stored sizes are checked against)."""
        sql, params, _ = _compiled(node, COUNT_MATCHING)
        return int(await self._pool.fetchval(sql, project_id, now, *params))

    async def segment(self, project_id: UUID, segment_id: UUID) -> StoredSegment | None:
        row = await self._pool.fetchrow(SELECT_SEGMENT_BY_ID, project_id, segment_id)
        return None if row is None else _segment(row)

    async def segments(self, project_id: UUID, after_seq: int, limit: int) -> list[StoredSegment]:
        rows = await self._pool.fetch(LIST_SEGMENTS, project_id, after_seq, limit)
        return [_segment(r) for r in rows]

    async def all_segments(self, project_id: UUID | None = None) -> list[SegmentRef]:
        if project_id is None:
            rows = await self._pool.fetch(SELECT_ALL_SEGMENTS)
        else:
            rows = await self._pool.fetch(SELECT_PROJECT_SEGMENTS, project_id)
        return [
            SegmentRef(
                r["project_id"],
                r["segment_id"],
                filter_from_json(r["filter"]),
                r["create_time"],
                r["evaluate_time"],
            )
            for r in rows
        ]

    async def funnel(self, project_id: UUID, funnel_id: UUID) -> StoredFunnel | None:
        row = await self._pool.fetchrow(SELECT_FUNNEL_BY_ID, project_id, funnel_id)
        return None if row is None else _funnel(row)

    async def funnels(self, project_id: UUID, after_seq: int, limit: int) -> list[StoredFunnel]:
        rows = await self._pool.fetch(LIST_FUNNELS, project_id, after_seq, limit)
        return [_funnel(r) for r in rows]

    async def funnel_counts(self, project_id: UUID, funnel: Funnel, now: datetime) -> list[int]:
        builder = SqlBuilder(first=3)
        window_ms = funnel.conversion_window // timedelta(milliseconds=1)
        sql = funnel_counts_sql(funnel.steps, window_ms, builder)
        row = await self._pool.fetchrow(sql, project_id, now, *builder.params)
        assert row is not None
        return [int(v) for v in row.values()]

    async def funnel_occurrences(
        self, project_id: UUID, profile_id: UUID, funnel: Funnel, now: datetime
    ) -> list[list[datetime]]:
        """Per step, the times of the profile's events that count for it."""
        builder = SqlBuilder(first=4)
        sql = funnel_occurrences_sql(funnel.steps, builder)
        rows = await self._pool.fetch(sql, project_id, now, profile_id, *builder.params)
        occurrences: list[list[datetime]] = [[] for _ in funnel.steps]
        for row in rows:
            occurrences[row["step"]].append(row["event_time"])
        return occurrences

    async def profile_exists(self, project_id: UUID, profile_id: UUID) -> UUID | None:
        """The live profile of an ID (itself, or its survivor), from identity's table."""
        row = await self._pool.fetchrow(SELECT_LIVE_PROFILE, project_id, profile_id)
        return None if row is None else row["live_id"]

    async def count_live_segment_profiles(self, project_id: UUID) -> int:
        return int(await self._pool.fetchval(COUNT_LIVE_SEGMENT_PROFILES, project_id))

    async def live_segment_profiles(self, project_id: UUID, after: UUID, limit: int) -> list[UUID]:
        rows = await self._pool.fetch(SELECT_LIVE_SEGMENT_PROFILES, project_id, after, limit)
        return [r["profile_id"] for r in rows]

    async def count_live_profiles(self, project_id: UUID) -> int:
        return int(await self._pool.fetchval(COUNT_LIVE_PROFILES, project_id))


# Identity's profiles table: a merged-away ID points at its survivor in one hop; an erased one
# has no row.
SELECT_LIVE_PROFILE = """
    SELECT coalesce(p.merged_into, p.profile_id) AS live_id
    FROM profiles p WHERE p.project_id = $1 AND p.profile_id = $2"""


class DefinitionsTransaction:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def lock_definitions(self, project_id: UUID, kind: str) -> None:
        await self._conn.execute(LOCK_DEFINITIONS, project_id, kind)

    async def segment_by_request_id(
        self, project_id: UUID, request_id: UUID
    ) -> StoredSegment | None:
        row = await self._conn.fetchrow(SELECT_SEGMENT_BY_REQUEST_ID, project_id, request_id)
        return None if row is None else _segment(row)

    async def segment_name_taken(self, project_id: UUID, name: str) -> bool:
        return bool(await self._conn.fetchval(SEGMENT_NAME_TAKEN, project_id, name))

    async def count_segments(self, project_id: UUID) -> int:
        return int(await self._conn.fetchval(COUNT_SEGMENTS, project_id))

    async def insert_segment(
        self,
        project_id: UUID,
        segment_id: UUID,
        definition: SegmentDefinition,
        now: datetime,
    ) -> int:
        """Stores the segment and its current members (silently); returns its size."""
        await self._conn.execute(
            INSERT_SEGMENT,
            project_id,
            segment_id,
            definition.display_name,
            definition.description,
            filter_to_json(definition.filter),
            definition.request_id,
            definition.fingerprint,
            now,
        )
        sql, params, _ = _compiled(definition.filter, FILL_MEMBERS)
        status = await self._conn.execute(sql, project_id, now, *params, segment_id)
        return int(status.split()[-1])

    async def delete_segment(self, project_id: UUID, segment_id: UUID) -> bool:
        deleted = await self._conn.fetchval(DELETE_SEGMENT, project_id, segment_id)
        await self._conn.execute(DELETE_SEGMENT_MEMBERS, project_id, segment_id)
        await self._conn.execute(DELETE_SEGMENT_SIZES, project_id, segment_id)
        return deleted is not None

    async def lock_segment(self, project_id: UUID, segment_id: UUID) -> FilterNode | None:
        """The segment's filter, locked for evaluation; None if deleted or locked elsewhere."""
        row = await self._conn.fetchrow(LOCK_SEGMENT, project_id, segment_id)
        return None if row is None else filter_from_json(row["filter"])

    async def entered(
        self, project_id: UUID, segment_id: UUID, node: FilterNode, now: datetime, limit: int
    ) -> list[UUID]:
        sql, params, _ = _compiled(node, SELECT_ENTERED)
        rows = await self._conn.fetch(sql, project_id, now, *params, segment_id, limit)
        return [r["profile_id"] for r in rows]

    async def left(
        self, project_id: UUID, segment_id: UUID, node: FilterNode, now: datetime, limit: int
    ) -> list[UUID]:
        sql, params, _ = _compiled(node, SELECT_LEFT)
        rows = await self._conn.fetch(sql, project_id, now, *params, segment_id, limit)
        return [r["profile_id"] for r in rows]

    async def lock_segment_profiles(self, project_id: UUID, profile_ids: Sequence[UUID]) -> None:
        """Locks the profiles as an event transaction would (registering live unknown ones)."""
        ids = sorted(set(profile_ids))
        await self._conn.execute(REGISTER_LIVE_PROFILES, project_id, ids)
        await self._conn.fetch(LOCK_SEGMENT_PROFILES, project_id, ids)

    async def check_profiles(
        self,
        project_id: UUID,
        segment_id: UUID,
        node: FilterNode,
        profile_ids: Sequence[UUID],
        now: datetime,
    ) -> list[ProfileCheck]:
        sql, params, _ = _compiled(node, CHECK_PROFILES)
        rows = await self._conn.fetch(
            sql, project_id, now, *params, segment_id, sorted(set(profile_ids))
        )
        return [
            ProfileCheck(r["profile_id"], r["erased"], r["merged"], r["member"], r["matches"])
            for r in rows
        ]

    async def segments_for_profile(self, project_id: UUID) -> list[tuple[UUID, FilterNode]]:
        """The project's segments, oldest first, share-locked against deletion."""
        rows = await self._conn.fetch(SELECT_SEGMENTS_FOR_PROFILE, project_id)
        return [(r["segment_id"], filter_from_json(r["filter"])) for r in rows]

    async def memberships(self, project_id: UUID, profile_id: UUID) -> set[UUID]:
        rows = await self._conn.fetch(SELECT_PROFILE_MEMBERSHIPS, project_id, profile_id)
        return {r["segment_id"] for r in rows}

    async def match_profile(
        self, project_id: UUID, profile_id: UUID, nodes: Sequence[FilterNode], now: datetime
    ) -> ProfileMatch | None:
        """Whether the profile passes each filter as of `now`; None when it is erased."""
        merged = False
        matches: list[bool] = []
        for start in range(0, len(nodes), MATCH_CHUNK):
            builder = SqlBuilder(first=4)
            columns = ", ".join(
                f"coalesce({compile_filter(node, builder)}, false)"
                for node in nodes[start : start + MATCH_CHUNK]
            )
            row = await self._conn.fetchrow(
                MATCH_PROFILE.format(columns=columns), project_id, now, profile_id, *builder.params
            )
            if row is None:
                return None
            merged = row["merged"]
            matches.extend(bool(m) and not merged for m in row["matches"])
        if not nodes:
            row = await self._conn.fetchrow(
                MATCH_PROFILE.format(columns="true"), project_id, now, profile_id
            )
            if row is None:
                return None
            merged = row["merged"]
        return ProfileMatch(merged, tuple(matches))

    async def apply_members(
        self,
        project_id: UUID,
        segment_id: UUID,
        entered: Sequence[UUID],
        left: Sequence[UUID],
        now: datetime,
        *,
        touch: bool = True,
    ) -> tuple[list[UUID], list[UUID]]:
        """Writes the difference; returns the profiles that really entered and left."""
        really_entered: list[UUID] = []
        really_left: list[UUID] = []
        if entered:
            rows = await self._conn.fetch(
                INSERT_MEMBERS, project_id, segment_id, list(entered), now
            )
            really_entered = [r["profile_id"] for r in rows]
        if left:
            rows = await self._conn.fetch(DELETE_MEMBERS, project_id, segment_id, list(left))
            really_left = [r["profile_id"] for r in rows]
        if touch:
            await self._conn.execute(TOUCH_SEGMENT, project_id, segment_id, now)
        return really_entered, really_left

    async def enqueue_changes(
        self, project_id: UUID, changes: Sequence[tuple[UUID, MembershipChange]]
    ) -> None:
        await _enqueue_changes(self._conn, project_id, changes)

    async def funnel_by_request_id(self, project_id: UUID, request_id: UUID) -> StoredFunnel | None:
        row = await self._conn.fetchrow(SELECT_FUNNEL_BY_REQUEST_ID, project_id, request_id)
        return None if row is None else _funnel(row)

    async def funnel_name_taken(self, project_id: UUID, name: str) -> bool:
        return bool(await self._conn.fetchval(FUNNEL_NAME_TAKEN, project_id, name))

    async def count_funnels(self, project_id: UUID) -> int:
        return int(await self._conn.fetchval(COUNT_FUNNELS, project_id))

    async def insert_funnel(
        self, project_id: UUID, funnel_id: UUID, definition: FunnelDefinition, now: datetime
    ) -> None:
        await self._conn.execute(
            INSERT_FUNNEL,
            project_id,
            funnel_id,
            definition.display_name,
            definition.description,
            steps_to_json(definition.steps),
            definition.conversion_window // timedelta(milliseconds=1),
            definition.request_id,
            definition.fingerprint,
            now,
        )

    async def delete_funnel(self, project_id: UUID, funnel_id: UUID) -> bool:
        return await self._conn.fetchval(DELETE_FUNNEL, project_id, funnel_id) is not None


async def _enqueue_changes(
    conn: asyncpg.Connection, project_id: UUID, changes: Sequence[tuple[UUID, MembershipChange]]
) -> None:
    """Adds the changes (profile, change) to the outbox, in the connection's transaction and in
    order: the one way both transaction kinds announce membership changes."""
    await enqueue_many(
        conn,
        [
            OutboxItem(project_id, SEGMENT_CHANGES, change_to_bus(project_id, p, c), p)
            for p, c in changes
        ],
    )
