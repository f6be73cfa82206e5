"""Every SQL statement of custom segments and funnels (their definitions, members, sizes and
funnel counts), and only SQL; methods return model dataclasses.

Tables (services/segments/schema/0005_segments.sql, 0007_segments_sizes.sql): custom_segments,
custom_segment_members (kept in the transactions of events, merges and erasures, and by the
sweep), custom_segment_sizes (counter shards kept by triggers on custom_segment_members) and
funnels. Filters and funnel steps are compiled to SQL by filter_sql.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg

from services.segments.filter_sql import (
    SqlBuilder,
    compile_filter,
    funnel_counts_sql,
    funnel_occurrences_sql,
    funnel_profiles_sql,
)
from services.segments.filters import (
    CustomSegment,
    FilterNode,
    SegmentDefinition,
    filter_from_json,
    filter_to_json,
)
from services.segments.funnels import (
    Funnel,
    FunnelDefinition,
    FunnelProfileSelection,
    FunnelProfilesQuery,
    FunnelStepProfile,
    steps_from_json,
    steps_to_json,
)
from services.segments.model import MembershipChange
from services.segments.transactions import (
    enqueue_changes,
    enqueue_shared_change,
    race_safe_transaction,
)

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
# Names are unique by Unicode case (segments_fold_case, 0050): "École" takes "ÉCOLE". The
# unique index on lower(display_name) (0005) folds ASCII only; it stays as the backstop of a
# check that writes, serialized by LOCK_DEFINITIONS, always make first.
SEGMENT_NAME_TAKEN = """
    SELECT EXISTS (SELECT 1 FROM custom_segments
                   WHERE project_id = $1
                     AND segments_fold_case(display_name) = segments_fold_case($2))"""
# UpdateSegment's check: the same rule, the segment itself aside (another case of its own name
# is a rename, not a collision).
SEGMENT_NAME_TAKEN_BY_OTHER = """
    SELECT EXISTS (SELECT 1 FROM custom_segments
                   WHERE project_id = $1 AND segment_id <> $3
                     AND segments_fold_case(display_name) = segments_fold_case($2))"""
COUNT_SEGMENTS = "SELECT count(*) FROM custom_segments WHERE project_id = $1"
INSERT_SEGMENT = """
    INSERT INTO custom_segments (project_id, segment_id, display_name, description, filter,
                                 request_id, definition_hash, create_time, evaluate_time)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)"""
# UpdateSegment's lock on the segment it changes. FOR UPDATE conflicts with the FOR KEY SHARE
# of SELECT_SEGMENTS_FOR_PROFILE: it waits until every event transaction that read the old
# filter has committed, and the event transactions queued behind it read the new one (READ
# COMMITTED follows the updated row), so once the change commits no profile is evaluated
# against the old filter again. It also waits for an evaluation batch (NO KEY UPDATE), whose
# next batch reads the new filter. The transaction takes no profile lock, so it never waits on
# a transaction that waits on it. OF g: the sizes read beside are not locked.
LOCK_SEGMENT_FOR_UPDATE = (
    SELECT_SEGMENT_COLUMNS + " WHERE project_id = $1 AND segment_id = $2 FOR UPDATE OF g"
)
# A filter change clears evaluate_time: the sweep takes the segment as due at its next run, so a
# recomputation its UpdateSegment call did not finish (the caller went away) is finished within
# an evaluation interval, and its changes keep the cause DEFINITION (evaluate_all). The creation's
# request_id and definition_hash stay: a retried CreateSegment still finds its segment.
UPDATE_SEGMENT = """
    UPDATE custom_segments
    SET display_name = $3, description = $4, filter = $5,
        evaluate_time = CASE WHEN $6::boolean THEN NULL ELSE evaluate_time END
    WHERE project_id = $1 AND segment_id = $2"""
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
# The same lock for the recomputation UpdateSegment runs after changing the filter: it waits
# for an evaluation batch of another evaluator instead of skipping the segment, so that the call
# returns once the members are those of the new filter.
LOCK_SEGMENT_WAITING = """
    SELECT filter FROM custom_segments WHERE project_id = $1 AND segment_id = $2
    FOR NO KEY UPDATE"""
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
    SELECT $1, p.profile_id FROM identity_read_profiles() p
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

# The member rows the planner's statistics of custom_segment_members were taken over (-1: never
# analyzed), and their refresh (member_statistics_stale says when).
MEMBER_ROWS_KNOWN = "SELECT reltuples FROM pg_class WHERE oid = 'custom_segment_members'::regclass"
ANALYZE_MEMBERS = "ANALYZE custom_segment_members"

# Templates completed with a compiled filter (filter_sql.compile_filter: fixed SQL text with
# $n parameters only): {where} is the filter over `p`, {n} the number of the first parameter
# after the filter's. The universe is the project's live profiles (merged-away ones point at
# their survivor; erased ones are deleted by identity).
# ($2, the moment of evaluation, is typed here because a filter without time conditions does
# not mention it, and PostgreSQL must know every parameter's type.)
LIVE_PROFILES = (
    "FROM identity_read_profiles() p WHERE p.project_id = $1 AND p.merged_into IS NULL"
    " AND $2::timestamptz IS NOT NULL"
)
# The live count: one pass over the project's live profiles, each condition a correlated
# lookup through the per-profile indexes of its table; linear in the project's profiles, so
# sizes are read from the counted members instead (SELECT_SEGMENT_COLUMNS). It selects exactly
# the rows FILL_MEMBERS stores, which makes it CreateSegment's validate_only size.
COUNT_MATCHING = "SELECT count(*) " + LIVE_PROFILES + " AND {where}"
# A new segment's members, returned: each is announced as entering it (cause DEFINITION) in the
# same transaction. One statement, one pass over the live profiles, where the sweep's batches
# (SELECT_ENTERED) would each scan again past the members already stored.
FILL_MEMBERS = (
    "INSERT INTO custom_segment_members (project_id, segment_id, profile_id, enter_time)"
    " SELECT $1, ${n}::uuid, p.profile_id, $2 " + LIVE_PROFILES + " AND {where}"
    " RETURNING profile_id"
)
# Live matching profiles not yet members, a bounded batch in no particular order: an order would
# walk the primary key and fetch the heap at random (2.5-3.0 s at a million profiles against
# 2.1 s for this sequential scan); each batch asks again for those not yet members, and the
# candidates are locked in profile_id order anyway.
# The member test is a lookup per profile (OFFSET 0 keeps PostgreSQL from turning NOT EXISTS into
# an anti-join), so the scan is linear whatever the planner believes of the segment's size. As a
# join, its plan hung on that belief, and a segment created since custom_segment_members was last
# analyzed is absent from its statistics, taken for one member: the planner then kept the whole
# member list as the inner side of a nested loop and every matching profile walked it to its own
# row. A new segment of 66,667 members at 200,000 profiles compared 2.2 billion rows (over 60 s,
# the segment locked by the evaluation meanwhile, DeleteSegment and UpdateSegment waiting);
# tests/integration/test_segments_evaluation_work.py counts the rows.
SELECT_ENTERED = (
    "SELECT p.profile_id " + LIVE_PROFILES + " AND {where} AND NOT EXISTS (SELECT 1"
    " FROM custom_segment_members m WHERE m.project_id = $1 AND m.segment_id = ${n}::uuid"
    " AND m.profile_id = p.profile_id OFFSET 0) LIMIT ${m}::int"
)
# Members that no longer match, with why: erased (no profile row), merged away, or the filter.
# The profile is looked up per member (LATERAL ... LIMIT 1 keeps the planner from hashing the
# whole profiles table: 0.4 s at a million profiles for a segment of 6,000 members).
SELECT_LEFT = (
    "SELECT m.profile_id FROM custom_segment_members m LEFT JOIN LATERAL (SELECT * FROM"
    " identity_read_profiles() q"
    " WHERE q.project_id = m.project_id AND q.profile_id = m.profile_id LIMIT 1) p"
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
    " FROM unnest(${m}::uuid[]) AS c(profile_id) LEFT JOIN identity_read_profiles() p"
    " ON p.project_id = $1 AND p.profile_id = c.profile_id ORDER BY c.profile_id"
)
# UpdateSegment's preview of a filter change, in one snapshot: the live profiles matching the
# new filter, those of them not members (SELECT_ENTERED's rows, unbounded) and the members that
# would leave (SELECT_LEFT's rows). Counted only: the recomputation finds the same rows.
COUNT_MEMBERSHIP_DIFF = (
    "SELECT $2::timestamptz AS as_of, c.matching, c.entering, (SELECT count(*)"
    " FROM custom_segment_members m LEFT JOIN LATERAL (SELECT * FROM identity_read_profiles() q"
    " WHERE q.project_id = m.project_id AND q.profile_id = m.profile_id LIMIT 1) p ON true"
    " WHERE m.project_id = $1 AND m.segment_id = ${n}::uuid AND $2::timestamptz IS NOT NULL"
    " AND NOT (CASE WHEN p.profile_id IS NULL OR p.merged_into IS NOT NULL THEN false"
    " ELSE {where} END)) AS leaving"
    " FROM (SELECT count(*) AS matching, count(*) FILTER (WHERE NOT EXISTS (SELECT 1"
    " FROM custom_segment_members x WHERE x.project_id = $1 AND x.segment_id = ${n}::uuid"
    " AND x.profile_id = p.profile_id)) AS entering " + LIVE_PROFILES + " AND {where}) c"
)
# One profile ($3) against several segments' filters at once (one column each, {columns}):
# the per-profile evaluation of an event transaction, one round trip per chunk of segments,
# each condition a lookup through the per-profile indexes. No row: the profile is erased.
MATCH_PROFILE = (
    "SELECT $2::timestamptz AS as_of, p.merged_into IS NOT NULL AS merged,"
    " ARRAY[{columns}]::boolean[] AS matches"
    " FROM identity_read_profiles() p WHERE p.project_id = $1 AND p.profile_id = $3"
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
# As SEGMENT_NAME_TAKEN: unique by Unicode case.
FUNNEL_NAME_TAKEN = """
    SELECT EXISTS (SELECT 1 FROM funnels
                   WHERE project_id = $1
                     AND segments_fold_case(display_name) = segments_fold_case($2))"""
FUNNEL_NAME_TAKEN_BY_OTHER = """
    SELECT EXISTS (SELECT 1 FROM funnels
                   WHERE project_id = $1 AND funnel_id <> $3
                     AND segments_fold_case(display_name) = segments_fold_case($2))"""
COUNT_FUNNELS = "SELECT count(*) FROM funnels WHERE project_id = $1"
# UpdateFunnel's lock: two updates of one funnel apply one after the other, each checking the
# etag and the name against the one before. Nothing else locks funnels (counts and progress
# read them without locks, at read time).
LOCK_FUNNEL_FOR_UPDATE = (
    SELECT_FUNNEL_COLUMNS + " WHERE project_id = $1 AND funnel_id = $2 FOR UPDATE"
)
# request_id and definition_hash stay the creation's, as for segments.
UPDATE_FUNNEL = """
    UPDATE funnels
    SET display_name = $3, description = $4, steps = $5, conversion_window_ms = $6
    WHERE project_id = $1 AND funnel_id = $2"""
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
    "SELECT count(*) FROM identity_read_profiles() p"
    " WHERE p.project_id = $1 AND p.merged_into IS NULL"
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
    when the size is exact from it, see filters.size_exact_as_of)."""
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
        async with race_safe_transaction(self._pool) as conn:
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

    async def member_rows_known(self) -> float:
        return float(await self._pool.fetchval(MEMBER_ROWS_KNOWN))

    async def analyze_members(self) -> None:
        await self._pool.execute(ANALYZE_MEMBERS)

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

    async def funnel_counts(
        self, project_id: UUID, funnel: Funnel | FunnelDefinition, now: datetime
    ) -> list[int]:
        """Per step, the profiles whose best attempt completed it as of `now` (a stored funnel
        or a definition not stored: only the steps and the window count)."""
        builder = SqlBuilder(first=3)
        window_ms = funnel.conversion_window // timedelta(milliseconds=1)
        sql = funnel_counts_sql(funnel.steps, window_ms, builder)
        row = await self._pool.fetchrow(sql, project_id, now, *builder.params)
        assert row is not None
        return [int(v) for v in row.values()]

    async def funnel_profiles(
        self,
        project_id: UUID,
        funnel: Funnel,
        query: FunnelProfilesQuery,
        as_of: datetime,
        after: UUID | None,
        limit: int,
    ) -> list[FunnelStepProfile]:
        """The profiles at the query's step as of `as_of` (those funnel_counts counts there,
        or those that dropped off after it), after `after` in profile_id order, at most
        `limit`."""
        builder = SqlBuilder(first=3)
        sql = funnel_profiles_sql(
            funnel.steps,
            funnel.conversion_window // timedelta(milliseconds=1),
            query.step_number,
            query.selection == FunnelProfileSelection.DROPPED,
            after,
            limit,
            builder,
        )
        rows = await self._pool.fetch(sql, project_id, as_of, *builder.params)
        return [
            FunnelStepProfile(r["profile_id"], r["complete_time"], r["attempt_start_time"])
            for r in rows
        ]

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
        """The live profile of an ID (itself, or its survivor), from identity_read_profiles."""
        row = await self._pool.fetchrow(SELECT_LIVE_PROFILE, project_id, profile_id)
        return None if row is None else row["live_id"]

    async def count_live_segment_profiles(self, project_id: UUID) -> int:
        return int(await self._pool.fetchval(COUNT_LIVE_SEGMENT_PROFILES, project_id))

    async def live_segment_profiles(self, project_id: UUID, after: UUID, limit: int) -> list[UUID]:
        rows = await self._pool.fetch(SELECT_LIVE_SEGMENT_PROFILES, project_id, after, limit)
        return [r["profile_id"] for r in rows]

    async def count_live_profiles(self, project_id: UUID) -> int:
        return int(await self._pool.fetchval(COUNT_LIVE_PROFILES, project_id))


# Identity's read contract identity_read_profiles: a merged-away ID points at its survivor in
# one hop; an erased one has no row.
SELECT_LIVE_PROFILE = """
    SELECT coalesce(p.merged_into, p.profile_id) AS live_id
    FROM identity_read_profiles() p WHERE p.project_id = $1 AND p.profile_id = $2"""


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

    async def segment_name_taken_by_other(
        self, project_id: UUID, name: str, segment_id: UUID
    ) -> bool:
        return bool(
            await self._conn.fetchval(SEGMENT_NAME_TAKEN_BY_OTHER, project_id, name, segment_id)
        )

    async def segment(self, project_id: UUID, segment_id: UUID) -> StoredSegment | None:
        row = await self._conn.fetchrow(SELECT_SEGMENT_BY_ID, project_id, segment_id)
        return None if row is None else _segment(row)

    async def lock_segment_for_update(
        self, project_id: UUID, segment_id: UUID
    ) -> StoredSegment | None:
        """The segment, locked against event transactions and evaluations until the commit
        (see LOCK_SEGMENT_FOR_UPDATE); None if there is none."""
        row = await self._conn.fetchrow(LOCK_SEGMENT_FOR_UPDATE, project_id, segment_id)
        return None if row is None else _segment(row)

    async def update_segment(
        self, project_id: UUID, segment: CustomSegment, *, refilter: bool
    ) -> None:
        """Stores the segment's new definition; `refilter` (its filter changed) makes it due
        for evaluation at once."""
        await self._conn.execute(
            UPDATE_SEGMENT,
            project_id,
            segment.segment_id,
            segment.display_name,
            segment.description,
            filter_to_json(segment.filter),
            refilter,
        )

    async def membership_diff(
        self, project_id: UUID, segment_id: UUID, node: FilterNode, now: datetime
    ) -> tuple[int, int, int]:
        """(profiles matching `node`, those of them not members, members not matching) as of
        `now`, in one snapshot: what recomputing the members for `node` would leave and move."""
        sql, params, _ = _compiled(node, COUNT_MEMBERSHIP_DIFF)
        row = await self._conn.fetchrow(sql, project_id, now, *params, segment_id)
        assert row is not None
        return int(row["matching"]), int(row["entering"]), int(row["leaving"])

    async def count_segments(self, project_id: UUID) -> int:
        return int(await self._conn.fetchval(COUNT_SEGMENTS, project_id))

    async def count_matching(self, project_id: UUID, node: FilterNode, now: datetime) -> int:
        """The live profiles matching the filter as of `now`: the rows insert_segment's
        FILL_MEMBERS would store at that moment, counted instead of stored."""
        sql, params, _ = _compiled(node, COUNT_MATCHING)
        return int(await self._conn.fetchval(sql, project_id, now, *params))

    async def insert_segment(
        self,
        project_id: UUID,
        segment_id: UUID,
        definition: SegmentDefinition,
        now: datetime,
    ) -> list[UUID]:
        """Stores the segment and its current members; returns the members (the profiles that
        entered it, which the caller announces in this transaction)."""
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
        rows = await self._conn.fetch(sql, project_id, now, *params, segment_id)
        return [r["profile_id"] for r in rows]

    async def delete_segment(self, project_id: UUID, segment_id: UUID) -> bool:
        deleted = await self._conn.fetchval(DELETE_SEGMENT, project_id, segment_id)
        await self._conn.execute(DELETE_SEGMENT_MEMBERS, project_id, segment_id)
        await self._conn.execute(DELETE_SEGMENT_SIZES, project_id, segment_id)
        return deleted is not None

    async def lock_segment(
        self, project_id: UUID, segment_id: UUID, *, wait: bool = False
    ) -> FilterNode | None:
        """The segment's filter, locked for evaluation; None if deleted or (unless `wait`)
        locked by another evaluator."""
        statement = LOCK_SEGMENT_WAITING if wait else LOCK_SEGMENT
        row = await self._conn.fetchrow(statement, project_id, segment_id)
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
        await enqueue_changes(self._conn, project_id, changes)

    async def enqueue_shared_change(
        self, project_id: UUID, profile_ids: Sequence[UUID], change: MembershipChange
    ) -> None:
        await enqueue_shared_change(self._conn, project_id, profile_ids, change)

    async def funnel_by_request_id(self, project_id: UUID, request_id: UUID) -> StoredFunnel | None:
        row = await self._conn.fetchrow(SELECT_FUNNEL_BY_REQUEST_ID, project_id, request_id)
        return None if row is None else _funnel(row)

    async def funnel_name_taken(self, project_id: UUID, name: str) -> bool:
        return bool(await self._conn.fetchval(FUNNEL_NAME_TAKEN, project_id, name))

    async def count_funnels(self, project_id: UUID) -> int:
        return int(await self._conn.fetchval(COUNT_FUNNELS, project_id))

    async def funnel_name_taken_by_other(
        self, project_id: UUID, name: str, funnel_id: UUID
    ) -> bool:
        return bool(
            await self._conn.fetchval(FUNNEL_NAME_TAKEN_BY_OTHER, project_id, name, funnel_id)
        )

    async def funnel(self, project_id: UUID, funnel_id: UUID) -> StoredFunnel | None:
        row = await self._conn.fetchrow(SELECT_FUNNEL_BY_ID, project_id, funnel_id)
        return None if row is None else _funnel(row)

    async def lock_funnel_for_update(
        self, project_id: UUID, funnel_id: UUID
    ) -> StoredFunnel | None:
        row = await self._conn.fetchrow(LOCK_FUNNEL_FOR_UPDATE, project_id, funnel_id)
        return None if row is None else _funnel(row)

    async def update_funnel(self, project_id: UUID, funnel: Funnel) -> None:
        await self._conn.execute(
            UPDATE_FUNNEL,
            project_id,
            funnel.funnel_id,
            funnel.display_name,
            funnel.description,
            steps_to_json(funnel.steps),
            funnel.conversion_window // timedelta(milliseconds=1),
        )

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
