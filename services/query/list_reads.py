"""The lists' reads: the users table (ListProfiles: query's projection, one sort index per
order), the rejected events (ListRejectedEvents) and the custom event names (ListEventNames)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import cast
from uuid import UUID

import asyncpg

from profiles.common.v1 import types_pb2
from profiles.query.v1 import query_service_pb2 as pb
from services.query import rollup
from services.query.paging import (
    MAX_BIGINT,
    MAX_TEXT,
    MAX_UUID,
    NEG_INFINITY,
    NIL_UUID,
    POS_INFINITY,
)
from services.query.views import (
    EventNameView,
    ProfileRowView,
    ReasonCounts,
    RejectedView,
    UsersTableFilters,
)

# -- event names ------------------------------------------------------------------------------

# A page of the project's custom event names after $2 within [$3, $4) (the prefix's range, or
# every name), in code point order (the column's collation, "C"), each with its count and
# latest event time: one range of query_event_names' primary key (0067), stopping at the
# LIMIT, so a page reads one row per name it lists, whatever their events. The counts are kept
# by query's rollup consumer (rollup_writes.py, FOLD_EVENT_NAMES), as of the last message it
# handled. A name whose counted events were all erased has no row (a count of 0 is not listed,
# should one be met).
SELECT_EVENT_NAMES = """
    SELECT name, event_count, last_seen_time
    FROM query_event_names
    WHERE project_id = $1 AND name > $2 AND name >= $3 AND name < $4 AND event_count > 0
    ORDER BY name
    LIMIT $5"""

# -- rejected events --------------------------------------------------------------------------

SELECT_REJECTED_SNAPSHOT = """
    SELECT coalesce(max(rejected_seq), 0) FROM ingest_read_rejected_events()
    WHERE project_id = $1"""

# Keyset on rejected_events_by_time (or _by_reason with a reason filter), as for events.
SELECT_REJECTED_PAGE = """
    SELECT rejected_seq, receive_time, reason, field_path, message, event_id,
           coalesce(installation_id, '') AS installation_id, payload, profile_id
    FROM ingest_read_rejected_events()
    WHERE project_id = $1 AND rejected_seq <= $2
      AND (receive_time, rejected_seq) < ($3::timestamptz, $4::bigint)
      AND receive_time >= $5 AND receive_time < $6
      AND (cardinality($7::text[]) = 0 OR reason = ANY($7::text[]))
    ORDER BY receive_time DESC, rejected_seq DESC
    LIMIT $8"""
# One profile's page ($9): its own statement rather than an "$9 IS NULL OR" condition, so
# that a plan kept for the connection still reads rejected_events_by_profile (0047): a profile
# has few rejected events among the project's many, read by that index and sorted, where the
# by-time index would walk the project's newest rows to find them.
SELECT_PROFILE_REJECTED_PAGE = """
    SELECT rejected_seq, receive_time, reason, field_path, message, event_id,
           coalesce(installation_id, '') AS installation_id, payload, profile_id
    FROM ingest_read_rejected_events()
    WHERE project_id = $1 AND profile_id = $9 AND rejected_seq <= $2
      AND (receive_time, rejected_seq) < ($3::timestamptz, $4::bigint)
      AND receive_time >= $5 AND receive_time < $6
      AND (cardinality($7::text[]) = 0 OR reason = ANY($7::text[]))
    ORDER BY receive_time DESC, rejected_seq DESC
    LIMIT $8"""
# The time range's rejected events by reason in the snapshot, reading up to $5 rows (the
# by-time index's range; the reason is read from each row).
SELECT_REJECTED_REASON_COUNTS = """
    SELECT reason, count(*) AS count
    FROM (SELECT reason FROM ingest_read_rejected_events()
          WHERE project_id = $1 AND rejected_seq <= $2
            AND receive_time >= $3 AND receive_time < $4
          LIMIT $5) r
    GROUP BY reason
    ORDER BY count(*) DESC, reason"""
# The same counts of one profile's rejected events ($6), by rejected_events_by_profile.
SELECT_PROFILE_REJECTED_REASON_COUNTS = """
    SELECT reason, count(*) AS count
    FROM (SELECT reason FROM ingest_read_rejected_events()
          WHERE project_id = $1 AND profile_id = $6 AND rejected_seq <= $2
            AND receive_time >= $3 AND receive_time < $4
          LIMIT $5) r
    GROUP BY reason
    ORDER BY count(*) DESC, reason"""
# Rows a rejected events cursor fetches per round trip: payloads may be ~1 MB each.
REJECTED_PREFETCH = 16

# ProfileIdentityFilter numbers (the users table's $3).
IDENTIFIED = pb.PROFILE_IDENTITY_FILTER_IDENTIFIED
ANONYMOUS = pb.PROFILE_IDENTITY_FILTER_ANONYMOUS
HAS_USER_DETAILS = pb.PROFILE_IDENTITY_FILTER_HAS_USER_DETAILS
CHANNEL_EMAIL = types_pb2.CHANNEL_EMAIL
CHANNEL_SMS = types_pb2.CHANNEL_SMS
CHANNEL_PUSH = types_pb2.CHANNEL_PUSH

# -- the users table --------------------------------------------------------------------------

# The users table reads query's projection (query_profiles, 0006): one row per live profile
# with the table's columns, kept by the rollup consumer (so it lags writes by the bus lag), and
# indexed per sort key. A page walks one index from the keyset position, (value, profile_id)
# ascending or both descending, so its cost is the page, not the project. A profile never seen
# (last_seen NULL) sorts last in both directions, by profile_id: the second branch of the UNION
# ALL, read only when the first ends short ($8: the position is already among them, $11 the
# profile_id after which they continue). The smart segment is segments' as of $2
# (segments_read_smart_segment, inlined by the planner: one primary-key read per row). Filters
# not asked for are constants (0, ''), so one statement per sort order serves every
# combination. The name filter ($13 in a page) has statements of its own, which find its
# profiles by two ranges as well as by the walk (NAME_RULE below). The language ($14) and the
# channel reached ($15: the overview's reach rule, rollup.py, in SQL;
# tests/api/test_query_lists.py holds the two equal) ride on the walk. The custom segment
# filter ($16 in a page) has statements of its own (PROFILE_ROWS_IN_SEGMENT), so that the
# planner sees a plain semi-join on segments' segments_read_custom_segment_members and may drive
# a small segment from its members instead of walking the sort index past non-members. The
# profile ID prefix filter (ID_RANGE, right after the channel) has statements of its own too,
# and so have the custom ID and email prefixes (CUSTOM_ID_RANGE, EMAIL_RANGE, after it).
PROFILE_ROWS_FROM = f"""
    SELECT q.profile_id, coalesce(q.custom_id, '') AS custom_id,
           coalesce(q.first_name, '') AS first_name, coalesce(q.last_name, '') AS last_name,
           coalesce(q.email, '') AS email, coalesce(q.device_model, '') AS device_model,
           q.device_platform::int AS platform,
           q.last_seen, q.session_count, q.time_spent_ms, coalesce(q.country, '') AS country,
           coalesce(sg.segment, 0)::int AS smart_segment,
           coalesce(sg.flag, 0)::int AS smart_segment_flag, q.has_details,
           coalesce(q.language, '') AS language, q.{{column}} AS sort_value
    FROM query_profiles q
    {{smart_join}}
    WHERE q.project_id = $1
      AND ($3::int = 0
           OR ($3 = {IDENTIFIED} AND q.identified)
           OR ($3 = {ANONYMOUS} AND NOT q.identified)
           OR ($3 = {HAS_USER_DETAILS} AND q.has_details))
      AND ($4::int = 0 OR $4::smallint = ANY(q.platforms))
      AND ($5::text = '' OR q.country = $5)
      AND ($6::int = 0 OR coalesce(sg.segment, 0) = $6)
      AND ($7::int = 0 OR coalesce(sg.flag, 0) = $7)
      {{name_filter}}
      AND (${{language}}::text = '' OR q.language = ${{language}})
      AND (${{reach}}::int = 0
           OR (${{reach}} = {CHANNEL_EMAIL} AND q.has_email
               AND 'email:marketing' = ANY(q.subscribed))
           OR (${{reach}} = {CHANNEL_SMS} AND q.has_phone AND 'sms:marketing' = ANY(q.subscribed))
           OR (${{reach}} = {CHANNEL_PUSH} AND q.push_reachable))
      {{id_range}}
      {{custom_id_range}}
      {{email_range}}
      {{members}}"""

# Each row's smart segment as of $2, read for every row a page walks (its columns show it).
SMART_SEGMENT_JOIN = """
    LEFT JOIN LATERAL segments_read_smart_segment(q.project_id, q.profile_id, $2) sg ON true"""
# The same for a count, read only when a smart segment or flag filter asks for it: a count reads
# up to TOTAL_SIZE_LIMIT rows, and each row's smart segment costs about 20 us (0.2 s for 10,000
# rows, which made the quick console bench's users page fall behind its 40 pages a second), for
# nothing when no filter needs it.
SMART_SEGMENT_JOIN_IF_FILTERED = """
    LEFT JOIN LATERAL (
        SELECT * FROM segments_read_smart_segment(q.project_id, q.profile_id, $2)
        WHERE $6::int <> 0 OR $7::int <> 0
    ) sg ON true"""

# The members of custom segment ${segment} as segments stored them (rows naming a merged-away
# or erased profile drop out here: query_profiles holds live profiles only).
PROFILE_ROWS_IN_SEGMENT = """
      AND q.profile_id IN (SELECT m.profile_id FROM segments_read_custom_segment_members() m
                           WHERE m.project_id = $1 AND m.segment_id = ${segment}::uuid)"""

# The name filter (${name} in NAME_RULE...): 0044's rule, a word of search_name starting with the
# folded text (folded once, not per row; `<> 0` rather than `> 0` so that the planner takes it
# for "most rows" and leaves the name's selectivity to the ranges below), over two sets of
# profiles found by a range each (0051): those whose first word matches, a range of sort_name
# (the folded name, so the first word leads: query_profiles_by_name), and the others, whose
# match is a later word, a range of query_name_tails (their names from the second word on; a
# superset, which the rule narrows). The two never overlap (the second leaves out the first's
# range) and together are every match. Each is its own statement, so the planner weighs each
# road with its own range's statistics (the text is a constant in each call's plan): a set
# with few profiles is read from its range and sorted; a large one by walking the sort order's
# index as without a name, testing the rule row by row (and, for later words, the tails'
# primary key for the rows that pass). Split so, the estimates follow the data: sorting by name
# walks the first-word matches of a common first name as one run of the name index instead of
# every name before them. A page merges the two halves' pages. A page without a name has
# statements of its own (NO_NAME), which never plan the ranges.
NAME_RULE = """
      AND strpos(q.search_name, (SELECT ' ' || query_name_fold(${name}::text))) <> 0"""
FIRST_WORD_RANGE = """q.sort_name >= query_name_fold(${name}::text)
           AND (query_name_prefix_end(query_name_fold(${name}::text)) IS NULL
                OR q.sort_name < query_name_prefix_end(query_name_fold(${name}::text)))"""
FIRST_WORD = f"""{NAME_RULE}
      AND {FIRST_WORD_RANGE}"""
# (For a profile without sort_name, NOT (...) is NULL and leaves it out: it has no name, which
# the rule leaves out anyway.)
LATER_WORD = f"""{NAME_RULE}
      AND NOT ({FIRST_WORD_RANGE})
      AND q.profile_id IN (
          SELECT t.profile_id FROM query_name_tails t
          WHERE t.project_id = $1 AND t.tail >= query_name_tail_key(${{name}}::text)
            AND t.tail < query_name_tail_key(${{name}}::text) || chr(1114111))"""
NO_NAME = """
      AND ${name}::text = ''"""

# Sorting by name, the first word's matches are one run of the name index, [folded text,
# its prefix end); a page of them starts from the later of that run's start and the keyset
# position, written as one row comparison in place of the keyset's: beside a row comparison,
# the index scan starts from it whatever other bound sort_name has (from the table's first
# name on a first page, reading every name up to the run: 0.16 s at a million profiles).
FIRST_WORD_START_ASC = f"""
      AND (q.sort_name, q.profile_id) > (
          greatest($9::text COLLATE "C", query_name_fold($13::text)),
          CASE WHEN $9::text COLLATE "C" >= query_name_fold($13::text) THEN $10::uuid
               ELSE '{NIL_UUID}'::uuid END)"""
FIRST_WORD_START_DESC = f"""
      AND (q.sort_name, q.profile_id) < (
          least($9::text COLLATE "C", query_name_prefix_end(query_name_fold($13::text))),
          CASE WHEN query_name_prefix_end(query_name_fold($13::text)) IS NULL
                    OR $9::text COLLATE "C" <= query_name_prefix_end(query_name_fold($13::text))
               THEN $10::uuid
               ELSE '{NIL_UUID}'::uuid END)"""

# The profile ID prefix filter: the IDs from the prefix padded with 0s to the prefix padded
# with fs (${low}, ${high}), both included, which is every UUID whose hex starts with the prefix
# (uuid orders as its 16 bytes do, so as its hex text); inclusive, so that a prefix of fs needs
# no bound past the last UUID. One range of the primary key (project_id, profile_id) holds
# them: with a prefix of a few digits, a few rows read by it and sorted, rather than a walk of
# the sort order's index testing every row. Statements of its own, so that the plans without
# it (every other page of the table) never weigh a range of IDs.
ID_RANGE = """
      AND q.profile_id BETWEEN ${low}::uuid AND ${high}::uuid"""

# The custom ID and email prefix filters: the values from the prefix (${low}) up to the least
# text above every text starting with it (${high}, text_range), compared in code point order
# (collation "C", whatever the database's), which is exactly the values starting with the
# prefix. 0058 indexes both columns so (project_id, column COLLATE "C", for the profiles that
# have one), so the range is one run of its index: a rare prefix reads its few rows and sorts
# them, a common one ("user-", every identified profile) walks the sort order's index as
# without it, each statement's plan weighing its own range. Statements of their own, as
# ID_RANGE, so that the pages without them never plan a range.
CUSTOM_ID_RANGE = """
      AND q.custom_id COLLATE "C" >= ${low}::text AND q.custom_id COLLATE "C" < ${high}::text"""
EMAIL_RANGE = """
      AND q.email COLLATE "C" >= ${low}::text AND q.email COLLATE "C" < ${high}::text"""
# The last code point; text_range's upper bound moves past it.
LAST_CHARACTER = 0x10FFFF
# A prefix of nothing but U+10FFFF has no next text of its length: its range then ends at the
# prefix followed by this many U+10FFFF, above every value it starts that is shorter than that
# (custom IDs hold at most 512 characters, emails 254).
TOP_RUN = 1024

# ProfileOrderBy -> the projection's column and its type.
PROFILE_SORT_COLUMNS = {
    1: ("last_seen", "timestamptz"),
    2: ("session_count", "bigint"),
    3: ("time_spent_ms", "bigint"),
    4: ("sort_name", "text"),  # folded (0044), collation "C" (0012): MAX_TEXT is above all
}


@dataclass(frozen=True, slots=True)
class Ranges:
    """Which of the range filters a statement holds: the profile ID prefix, the custom ID
    prefix, the email prefix (each adds two parameters, in this order)."""

    custom_id: bool = False
    email: bool = False
    profile_id: bool = False


NO_RANGES = Ranges()


def _rows(
    column: str, name_filter: str, in_segment: bool, ranges: Ranges, *, count: bool = False
) -> str:
    """PROFILE_ROWS_FROM for a page ($13 on) or a count ($9 on): the name, the language and
    the channel, then each range's two bounds (the ID's, the custom ID's, the email's) when
    asked for, then the segment."""
    first = 9 if count else 13
    bounds = iter(range(first + 3, first + 10))
    id_range = custom_id_range = email_range = ""
    if ranges.profile_id:
        id_range = ID_RANGE.format(low=next(bounds), high=next(bounds))
    if ranges.custom_id:
        custom_id_range = CUSTOM_ID_RANGE.format(low=next(bounds), high=next(bounds))
    if ranges.email:
        email_range = EMAIL_RANGE.format(low=next(bounds), high=next(bounds))
    return PROFILE_ROWS_FROM.format(
        column=column,
        name_filter=name_filter.format(name=first),
        language=first + 1,
        reach=first + 2,
        smart_join=SMART_SEGMENT_JOIN_IF_FILTERED if count else SMART_SEGMENT_JOIN,
        id_range=id_range,
        custom_id_range=custom_id_range,
        email_range=email_range,
        members=PROFILE_ROWS_IN_SEGMENT.format(segment=next(bounds)) if in_segment else "",
    )


def _part(
    column: str,
    in_segment: bool,
    named: bool,
    ranges: Ranges,
    condition: str,
    order: str,
    first_word_condition: str | None = None,
) -> str:
    """Up to $12 rows of one part of a page (the profiles seen, or never seen), in `order`:
    with a name, the first-word and the later-word matches' pages merged (the first-word
    half's position in `first_word_condition` when it has its own)."""
    if not named:
        return (
            f"{_rows(column, NO_NAME, in_segment, ranges)}\n{condition}\n"
            f"    ORDER BY {order} LIMIT $12"
        )
    halves = (
        f"(SELECT * FROM ({_rows(column, half, in_segment, ranges)}\n{position}\n"
        f"    ORDER BY {order} LIMIT $12) {alias})"
        for half, position, alias in (
            (FIRST_WORD, first_word_condition or condition, "first_word"),
            (LATER_WORD, condition, "later_word"),
        )
    )
    by_output = order.replace("q.profile_id", "profile_id").replace(f"q.{column}", "sort_value")
    return f"SELECT * FROM ({' UNION ALL '.join(halves)}) halves ORDER BY {by_output} LIMIT $12"


def _page(
    column: str, type_name: str, ascending: bool, in_segment: bool, named: bool, ranges: Ranges
) -> str:
    direction = "ASC" if ascending else "DESC"
    valued = f"      AND NOT $8::boolean AND q.{column} IS NOT NULL"
    seen = _part(
        column,
        in_segment,
        named,
        ranges,
        f"""{valued}
      AND (q.{column}, q.profile_id) {">" if ascending else "<"} ($9::{type_name}, $10::uuid)""",
        f"q.{column} {direction}, q.profile_id {direction}",
        valued + (FIRST_WORD_START_ASC if ascending else FIRST_WORD_START_DESC)
        if column == "sort_name"
        else None,
    )
    unseen = _part(
        column,
        in_segment,
        named,
        ranges,
        f"      AND q.{column} IS NULL AND q.profile_id > $11::uuid",
        "q.profile_id",
    )
    return f"""
    (SELECT * FROM ({seen}) seen)
    UNION ALL
    (SELECT * FROM ({unseen}) unseen)
    LIMIT $12"""


# Every combination of the range filters (each a statement: see ID_RANGE).
EVERY_RANGES = [
    Ranges(custom_id, email, profile_id)
    for custom_id in (True, False)
    for email in (True, False)
    for profile_id in (True, False)
]

# Keyed by order, direction, in a segment, named, then the ranges (custom ID, email, profile
# ID prefix: the last).
SELECT_PROFILE_ROWS_PAGE = {
    (order_by, ascending, in_segment, named, r.custom_id, r.email, r.profile_id): _page(
        column, type_name, ascending, in_segment, named, r
    )
    for order_by, (column, type_name) in PROFILE_SORT_COLUMNS.items()
    for ascending in (True, False)
    for in_segment in (True, False)
    for named in (True, False)
    for r in EVERY_RANGES
}

# How many profiles match the filters ($1 to $7, then $9 on as a page's $13 on),
# counting up to $8 rows: the count reads each match (and its smart segment when a filter
# needs it), so it stops where a person stops reading figures exactly (TOTAL_SIZE_LIMIT). With
# a name, the two halves' matches, which never overlap.
SELECT_PROFILE_ROWS_COUNT = {
    (in_segment, named, r.custom_id, r.email, r.profile_id): "SELECT count(*) FROM ("
    + " UNION ALL ".join(
        f"(SELECT 1 FROM ({_rows('profile_id', half, in_segment, r, count=True)}) h)"
        for half in ((FIRST_WORD, LATER_WORD) if named else (NO_NAME,))
    )
    + " LIMIT $8) matches"
    for in_segment in (True, False)
    for named in (True, False)
    for r in EVERY_RANGES
}

# The users table's size without a filter but identity and platform, from the rollups'
# counters: they count the projection's rows (the same consumer writes both, in one
# transaction), on a platform the profiles with an installation of it, as the platform filter
# selects; exact however many profiles there are, in one short read.
SELECT_PROFILE_COUNTERS = f"""
    SELECT coalesce(sum(count) FILTER (WHERE metric = '{rollup.PROFILES}'), 0)::bigint,
           coalesce(sum(count) FILTER (WHERE metric = '{rollup.IDENTIFIED}'), 0)::bigint
    FROM query_counters
    WHERE project_id = $1 AND platform = $2 AND value = ''
      AND metric IN ('{rollup.PROFILES}', '{rollup.IDENTIFIED}')"""

# GetProfileRows: the rows of the profiles $11 (a uuid[]), each read by the projection's
# primary key; the filters are the "not asked for" constants ($3 to $10), so that the columns
# and the smart segment are the users table's own statement's.
SELECT_PROFILE_ROWS_BY_ID = PROFILE_ROWS_FROM.format(
    column="last_seen",
    name_filter=NO_NAME.format(name=8),
    language=9,
    reach=10,
    smart_join=SMART_SEGMENT_JOIN,
    id_range="",
    custom_id_range="",
    email_range="",
    members="      AND q.profile_id = ANY($11::uuid[])",
)

SELECT_SEGMENT_EXISTS = """
    SELECT 1 FROM segments_read_custom_segments() WHERE project_id = $1 AND segment_id = $2"""


def _filter_arguments(filters: UsersTableFilters) -> tuple[int, int, str, int, int]:
    """$3 to $7 of the users table's statements."""
    return (
        filters.identity_filter,
        filters.platform,
        filters.country,
        filters.smart_segment,
        filters.smart_segment_flag,
    )


def _later_filters(filters: UsersTableFilters) -> tuple[object, ...]:
    """The name, the language, the channel reached, then the ranges of the prefixes given (the
    profile ID's, the custom ID's, the email's), then the segment when there is one (the
    statements' last arguments)."""
    later: tuple[object, ...] = (filters.name_prefix, filters.language, filters.reachable_channel)
    if filters.profile_id_prefix:
        later = (*later, *id_range(filters.profile_id_prefix))
    if filters.custom_id_prefix:
        later = (*later, *text_range(filters.custom_id_prefix))
    if filters.email_prefix:
        later = (*later, *text_range(filters.email_prefix))
    return later if filters.segment_id is None else (*later, filters.segment_id)


def id_range(prefix: str) -> tuple[UUID, UUID]:
    """The first and the last UUID whose hex starts with `prefix` (1 to 32 lower-case hex
    digits): ID_RANGE's bounds."""
    return UUID(prefix.ljust(32, "0")), UUID(prefix.ljust(32, "f"))


def text_range(prefix: str) -> tuple[str, str]:
    """The bounds of the texts starting with `prefix` (not empty) in code point order: the
    prefix, and the least text above all of them, the prefix with its last character moved to
    the next one (trailing U+10FFFF dropped first, the surrogates skipped, as 0044's
    query_name_prefix_end); CUSTOM_ID_RANGE's and EMAIL_RANGE's bounds."""
    kept = prefix.rstrip(chr(LAST_CHARACTER))
    if not kept:
        return prefix, prefix + chr(LAST_CHARACTER) * TOP_RUN
    last = ord(kept[-1])
    return prefix, kept[:-1] + chr(0xE000 if last == 0xD7FF else last + 1)


def _statement_key(filters: UsersTableFilters) -> tuple[bool, bool, bool, bool, bool]:
    """Which of the users table's statements serve these filters: (in a segment, named, by
    custom ID prefix, by email prefix, by profile ID prefix)."""
    return (
        filters.segment_id is not None,
        bool(filters.name_prefix),
        bool(filters.custom_id_prefix),
        bool(filters.email_prefix),
        bool(filters.profile_id_prefix),
    )


class ListReads:
    """The lists' statements, on the connection of QueryReads."""

    _conn: asyncpg.Connection

    # -- event names

    async def event_names(
        self, project_id: UUID, *, after: str, prefix: str, limit: int
    ) -> list[EventNameView]:
        """Up to `limit` of the project's custom event names after `after` ("" for the first),
        starting with `prefix` ("" for every name), in code point order."""
        low, high = text_range(prefix) if prefix else ("", MAX_TEXT)
        rows = await self._conn.fetch(SELECT_EVENT_NAMES, project_id, after, low, high, limit)
        return [EventNameView(r["name"], r["event_count"], r["last_seen_time"]) for r in rows]

    # -- rejected events

    async def rejected_snapshot(self, project_id: UUID) -> int:
        return cast(int, await self._conn.fetchval(SELECT_REJECTED_SNAPSHOT, project_id))

    async def rejected_reason_counts(
        self,
        project_id: UUID,
        *,
        max_seq: int,
        start: datetime,
        end: datetime,
        limit: int,
        profile_id: UUID | None = None,
    ) -> ReasonCounts:
        """The rejected events received in [start, end) up to `max_seq` (only `profile_id`'s
        when given), counted by reason over at most `limit` rows."""
        arguments = (project_id, max_seq, start, end, limit)
        if profile_id is None:
            rows = await self._conn.fetch(SELECT_REJECTED_REASON_COUNTS, *arguments)
        else:
            rows = await self._conn.fetch(
                SELECT_PROFILE_REJECTED_REASON_COUNTS, *arguments, profile_id
            )
        counts = tuple((r["reason"], r["count"]) for r in rows)
        return ReasonCounts(counts, at_least=sum(c for _, c in counts) >= limit)

    async def rejected_rows(
        self,
        project_id: UUID,
        *,
        max_seq: int,
        after: tuple[datetime, int],
        start: datetime,
        end: datetime,
        reasons: Sequence[str],
        limit: int,
        profile_id: UUID | None = None,
    ) -> AsyncIterator[tuple[int, RejectedView]]:
        """Up to `limit` rejected events after `after` (only `profile_id`'s when given), newest
        first, each with its rejected_seq. A cursor (the connection is in a transaction:
        QueryRepository.snapshot) fetches a few rows at a time, so a caller that stops early
        (a page full of 1 MB payloads) never holds the rows it does not send."""
        arguments: tuple[object, ...] = (
            project_id,
            max_seq,
            after[0],
            after[1],
            start,
            end,
            list(reasons),
            limit,
        )
        statement = SELECT_REJECTED_PAGE
        if profile_id is not None:
            statement = SELECT_PROFILE_REJECTED_PAGE
            arguments = (*arguments, profile_id)
        async for r in self._conn.cursor(statement, *arguments, prefetch=REJECTED_PREFETCH):
            payload = r["payload"]
            yield (
                r["rejected_seq"],
                RejectedView(
                    receive_time=r["receive_time"],
                    reason=r["reason"],
                    field_path=r["field_path"],
                    message=r["message"],
                    event_id=r["event_id"],
                    installation_id=r["installation_id"],
                    platform=_payload_platform(payload),
                    payload=payload,
                    profile_id=r["profile_id"],
                ),
            )

    # -- the users table

    async def segment_exists(self, project_id: UUID, segment_id: UUID) -> bool:
        """Whether the project has this custom segment (segments_read_custom_segments)."""
        return await self._conn.fetchval(SELECT_SEGMENT_EXISTS, project_id, segment_id) is not None

    async def profile_counters(self, project_id: UUID, platform: int) -> tuple[int, int]:
        """(profiles, identified profiles) of the project, or of those with an installation of
        `platform` (0: all), as the rollups count them."""
        row = await self._conn.fetchrow(SELECT_PROFILE_COUNTERS, project_id, platform)
        assert row is not None  # an aggregate always answers one row
        return row[0], row[1]

    async def profile_rows_count(
        self, project_id: UUID, filters: UsersTableFilters, *, now: datetime, limit: int
    ) -> int:
        """How many profiles match the filters, counting up to `limit`."""
        count = await self._conn.fetchval(
            SELECT_PROFILE_ROWS_COUNT[_statement_key(filters)],
            project_id,
            now,
            *_filter_arguments(filters),
            limit,
            *_later_filters(filters),
        )
        return cast(int, count)

    async def profile_rows_page(
        self,
        project_id: UUID,
        filters: UsersTableFilters,
        *,
        now: datetime,
        order_by: int,
        ascending: bool,
        after: tuple[int | datetime | str | None, UUID] | None,
        limit: int,
    ) -> list[tuple[int | datetime | str | None, ProfileRowView]]:
        """A page of the users table after `after` (sort value, None for a profile never seen;
        profile ID), or from the start; each row with its sort value. With a name, only
        profiles with a word of their name starting with it; with a profile ID prefix, only
        the IDs starting with it; with a segment, only the members of that custom segment."""
        column_type = PROFILE_SORT_COLUMNS[order_by][1]
        in_unseen = after is not None and after[0] is None
        start: tuple[int | datetime | str | None, UUID]
        if after is None or in_unseen:
            value: int | datetime | str | None
            if column_type == "timestamptz":
                value = NEG_INFINITY if ascending else POS_INFINITY
            elif column_type == "text":
                value = "" if ascending else MAX_TEXT
            else:
                value = -MAX_BIGINT - 1 if ascending else MAX_BIGINT
            start = (value, NIL_UUID if ascending else MAX_UUID)
        else:
            start = after
        unseen_after = after[1] if after is not None and in_unseen else NIL_UUID
        rows = await self._conn.fetch(
            SELECT_PROFILE_ROWS_PAGE[(order_by, ascending, *_statement_key(filters))],
            project_id,
            now,
            *_filter_arguments(filters),
            in_unseen,
            start[0],
            start[1],
            unseen_after,
            limit,
            *_later_filters(filters),
        )
        return [(r["sort_value"], _profile_row(r)) for r in rows]

    async def profile_rows_by_id(
        self, project_id: UUID, profile_ids: Sequence[UUID], *, now: datetime
    ) -> dict[UUID, ProfileRowView]:
        """The users table's rows of those of `profile_ids` that are live profiles."""
        rows = await self._conn.fetch(
            SELECT_PROFILE_ROWS_BY_ID,
            project_id,
            now,
            *_filter_arguments(UsersTableFilters()),
            *_later_filters(UsersTableFilters()),
            list(profile_ids),
        )
        return {r["profile_id"]: _profile_row(r) for r in rows}


def _profile_row(r: asyncpg.Record) -> ProfileRowView:
    return ProfileRowView(
        profile_id=r["profile_id"],
        custom_id=r["custom_id"],
        first_name=r["first_name"],
        last_name=r["last_name"],
        email=r["email"],
        language=r["language"],
        device_model=r["device_model"],
        platform=r["platform"],
        session_count=r["session_count"],
        last_seen=r["last_seen"],
        time_spent_ms=r["time_spent_ms"],
        country=r["country"],
        smart_segment=r["smart_segment"],
        smart_segment_flag=r["smart_segment_flag"],
        has_user_details=r["has_details"],
    )


def _payload_platform(payload: object) -> int:
    """The platform a rejected event's stored payload names: proto JSON writes the enum's name
    ("PLATFORM_ANDROID"); a number is taken as is; anything else, or no payload, is 0."""
    platform = payload.get("platform") if isinstance(payload, dict) else None
    if isinstance(platform, str):
        try:
            return types_pb2.Platform.Value(platform)
        except ValueError:
            return 0
    if isinstance(platform, int) and not isinstance(platform, bool):
        return platform if platform in types_pb2.Platform.values() else 0
    return 0
