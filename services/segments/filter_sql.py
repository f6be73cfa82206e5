"""Compiles validated filters (filters.FilterNode) and funnel step conditions to SQL.

Part of the repository layer: the only place besides the repositories (repository.py,
definitions_repository.py) that writes SQL. The query
text is assembled from fixed fragments of this module only; every name and value a caller sent
(attribute names, event names, strings, numbers, times, lists) becomes a `$n` parameter, so any
string is safe to send and is matched literally. Column and table names, operators and casts
come from the whitelists below, chosen by enum values, never by caller text.

A compiled filter is a boolean expression over `p` (a row of identity_read_profiles), with `$1`
the project and `$2` the moment of evaluation. Each condition is wrapped in coalesce(..., false),
so a missing value never makes NOT match or fail to match unexpectedly. Other services' data is
read only through their read contracts (identity_read_*, ingest_read_*; docs/read-contracts.md).

Type-tested values are cast inside CASE (PostgreSQL does not promise the order of AND
operands, and a cast of a value of another type would fail).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from profiles.common.v1 import types_pb2
from services.segments.filters import (
    AttributeTest,
    CountryTest,
    EngagementTest,
    EventCountTest,
    FilterNode,
    Group,
    Operand,
    Operator,
    PlatformTest,
    SeenTest,
    SmartSegmentTest,
    SubscriptionTest,
)
from services.segments.funnels import FunnelStep
from services.segments.model import ALL_PLATFORMS

# Numbers of profiles.common.v1.Platform and EventKind, as ingest_read_events stores them.
PLATFORM_API = types_pb2.PLATFORM_API
CUSTOM_EVENT_KIND = types_pb2.EVENT_KIND_CUSTOM

COMPARISON_SQL: dict[Operator, str] = {
    Operator.EQUALS: "=",
    Operator.NOT_EQUALS: "<>",
    Operator.LESS_THAN: "<",
    Operator.LESS_THAN_OR_EQUAL: "<=",
    Operator.GREATER_THAN: ">",
    Operator.GREATER_THAN_OR_EQUAL: ">=",
}
GROUP_SQL = {"and": " AND ", "or": " OR "}
# The SQL type of each operand type's parameter.
CAST_SQL = {"number": "float8", "bool": "boolean", "timestamp": "timestamptz"}
TEXT_TYPES = ("string", "url")
# ignore_case's fold: lower-case by Unicode's rules whatever the database's locale (0050; the
# embedded server's "C" locale makes lower() fold ASCII only). The funnel steps' SQL function
# (funnel_step_value_matches) folds with it too.
FOLD_CASE = "segments_fold_case"


@dataclass(frozen=True, slots=True)
class ValueAccess:
    """Where a typed value lives: the SQL expressions of its type name, its text (for
    strings, URLs, numbers, booleans, timestamps) and its JSON list (for string lists).

    Profile attributes store {"type": "number", "value": 1.5}; events store the proto JSON of
    AttributeValue, {"number_value": 1.5}; both are read through one of the two below.
    """

    type_sql: str
    text_sql: str
    list_sql: str


def _profile_attribute() -> ValueAccess:
    return ValueAccess("a.value_type", "(a.value->>'value')", "(a.value->'value')")


EVENT_TYPE_SQL = (
    "(CASE WHEN v.value ? 'string_value' THEN 'string' WHEN v.value ? 'url_value' THEN 'url'"
    " WHEN v.value ? 'number_value' THEN 'number' WHEN v.value ? 'bool_value' THEN 'bool'"
    " WHEN v.value ? 'timestamp_value' THEN 'timestamp'"
    " WHEN v.value ? 'string_list_value' THEN 'string_list' END)"
)
EVENT_TEXT_SQL = (
    "coalesce(v.value->>'string_value', v.value->>'url_value', v.value->>'number_value',"
    " v.value->>'bool_value', v.value->>'timestamp_value')"
)
EVENT_ACCESS = ValueAccess(
    EVENT_TYPE_SQL, EVENT_TEXT_SQL, "coalesce(v.value->'string_list_value'->'values', '[]')"
)


@dataclass(slots=True)
class SqlBuilder:
    """Collects parameters; `first` is the number of the first parameter it adds."""

    first: int = 3
    params: list[Any] = field(default_factory=list)

    def param(self, value: Any, cast: str) -> str:
        if isinstance(value, datetime):
            # asyncpg sends datetime.min and datetime.max as -infinity and infinity, which no
            # stored time equals: the ISO text keeps the first and last microsecond exact.
            self.params.append(value.isoformat())
            return f"${self.first + len(self.params) - 1}::text::{cast}"
        self.params.append(value)
        return f"${self.first + len(self.params) - 1}::{cast}"

    def next_number(self) -> int:
        return self.first + len(self.params)


def compile_filter(node: FilterNode, builder: SqlBuilder) -> str:
    """A boolean SQL expression over `p` (profiles), `$1` project, `$2` now."""
    if isinstance(node, Group):
        if node.operator == "not":
            return f"(NOT {compile_filter(node.children[0], builder)})"
        parts = [compile_filter(child, builder) for child in node.children]
        return "(" + GROUP_SQL[node.operator].join(parts) + ")"
    return f"coalesce({_condition(node, builder)}, false)"


def _condition(node: FilterNode, b: SqlBuilder) -> str:
    if isinstance(node, AttributeTest):
        test = attribute_sql(node, _profile_attribute(), b)
        return (
            "EXISTS (SELECT 1 FROM ingest_read_profile_attributes() a WHERE a.project_id = $1"
            f" AND a.profile_id = p.profile_id AND a.native = {b.param(node.native, 'boolean')}"
            f" AND a.name = {b.param(node.name, 'text')} AND a.value IS NOT NULL AND {test})"
        )
    if isinstance(node, PlatformTest):
        return _platform(node, b)
    if isinstance(node, CountryTest):
        # The last session with a known country, through sessions_by_profile_time.
        return (
            "(SELECT s.country FROM ingest_read_sessions() s WHERE s.project_id = $1"
            " AND s.profile_id = p.profile_id AND coalesce(s.country, '') <> ''"
            f" ORDER BY s.start_time DESC LIMIT 1) = ANY({b.param(list(node.countries), 'text[]')})"
        )
    if isinstance(node, SubscriptionTest):
        exists = (
            "EXISTS (SELECT 1 FROM ingest_read_profile_subscriptions() ps WHERE ps.project_id = $1"
            f" AND ps.profile_id = p.profile_id AND ps.channel = {b.param(node.channel, 'text')}"
            f" AND ps.kind = {b.param(node.kind, 'text')} AND ps.subscribed)"
        )
        return exists if node.subscribed else f"(NOT {exists})"
    if isinstance(node, SmartSegmentTest):
        return _smart_segment(node, b)
    if isinstance(node, EngagementTest):
        return f"{ENGAGEMENT_SQL} {COMPARISON_SQL[node.operator]} {b.param(node.score, 'float8')}"
    if isinstance(node, SeenTest):
        return _seen(node, b)
    assert isinstance(node, EventCountTest)
    return (
        "(SELECT count(*) FROM ingest_read_events() e"
        " WHERE e.project_id = $1 AND e.profile_id = p.profile_id"
        f" AND e.kind = {CUSTOM_EVENT_KIND} AND e.name = {b.param(node.event_name, 'text')}"
        f" AND e.event_time > $2 - interval '24 hours' * {b.param(node.within_last_days, 'int')}"
        f") {COMPARISON_SQL[node.operator]}"
        f" {b.param(node.count, 'bigint')}"
    )


def _platform(node: PlatformTest, b: SqlBuilder) -> str:
    platforms = b.param(list(node.platforms), "smallint[]")
    installed = (
        "EXISTS (SELECT 1 FROM identity_read_installations() i"
        " JOIN ingest_read_installation_details() d"
        " ON d.project_id = i.project_id AND d.installation_id = i.installation_id"
        " WHERE i.project_id = $1 AND i.profile_id = p.profile_id"
        f" AND d.platform = ANY({platforms}))"
    )
    if PLATFORM_API not in node.platforms:
        return installed
    server_side = (
        "EXISTS (SELECT 1 FROM ingest_read_events() e"
        " WHERE e.project_id = $1 AND e.profile_id = p.profile_id"
        f" AND e.platform = {PLATFORM_API})"
    )
    return f"({installed} OR {server_side})"


# The all-platform stored state, moved along its schedule to $2 (segment_state_at,
# services/segments/schema/0005_segments.sql); a profile without a session has no row:
# segment 0, flag 0.
SMART_STATE_SQL = (
    "coalesce((SELECT segment_state_at(s.segment, s.flag, s.next_transition_time,"
    " s.upcoming_times, s.upcoming_segments, s.upcoming_flags, $2) FROM segment_states s"
    " WHERE s.project_id = $1 AND s.profile_id = p.profile_id"
    f" AND s.platform = {ALL_PLATFORMS}),"
    " ARRAY[0, 0]::smallint[])"
)


def _smart_segment(node: SmartSegmentTest, b: SqlBuilder) -> str:
    parts = []
    if node.segments:
        parts.append(f"({SMART_STATE_SQL})[1] = ANY({b.param(list(node.segments), 'smallint[]')})")
    if node.flags:
        parts.append(f"({SMART_STATE_SQL})[2] = ANY({b.param(list(node.flags), 'smallint[]')})")
    return "(" + " AND ".join(parts) + ")"


# Countly's score as of $2: segments' one rule, segments_read_engagement
# (services/segments/schema), which model.engagement equals in Python; 0 with no session.
ENGAGEMENT_SQL = "(SELECT g.score FROM segments_read_engagement($1, p.profile_id, $2) g)"


def _seen(node: SeenTest, b: SqlBuilder) -> str:
    # First and last seen are the first and last event times ingest keeps beside the profile's
    # totals (ingest_read_profile_event_counts, one primary-key read), not min/max over the
    # events still stored: they stay exact after retention removed old events (issue 20). They
    # span every stored kind; merges and splits are identity's changes, never events.
    column = "last_event_time" if node.last else "first_event_time"
    moment = (
        f"(SELECT c.{column} FROM ingest_read_profile_event_counts() c"
        " WHERE c.project_id = $1 AND c.profile_id = p.profile_id)"
    )
    if node.within_last_days is not None:
        days = b.param(node.within_last_days, "int")
        return f"({moment} > $2 - interval '24 hours' * {days})"
    parts = []
    if node.start_time is not None:
        parts.append(f"{moment} >= {b.param(node.start_time, 'timestamptz')}")
    if node.end_time is not None:
        parts.append(f"{moment} < {b.param(node.end_time, 'timestamptz')}")
    return "(" + " AND ".join(parts) + ")"


def _compared_types(test: AttributeTest) -> tuple[str, ...]:
    """The stored value types a test compares: the operand's, except that the avatar URL is a
    URL whatever the operand, and a string CONTAINS also looks into string lists."""
    if test.native and test.name == "avatar_url":
        return ("url",)
    operand = test.value if test.value is not None else test.values[0]
    if test.operator == Operator.CONTAINS and operand.type == "string" and not test.native:
        return ("string", "string_list")
    return (operand.type,)


def _bind(operand: Operand, b: SqlBuilder) -> str:
    if operand.type == "string_list":
        return b.param(list(operand.value), "text[]")
    return b.param(operand.value, CAST_SQL.get(operand.type, "text"))


def attribute_sql(test: AttributeTest, access: ValueAccess, b: SqlBuilder) -> str:
    """The comparison of one stored value (reached through `access`) with the test."""
    if test.operator == Operator.EXISTS:
        return f"{access.type_sql} IS NOT NULL"
    fold = test.ignore_case or (test.native and test.name == "email")
    parts = []
    for value_type in _compared_types(test):
        parts.append(f"({_typed_test(test, value_type, access, fold, b)})")
    return "(" + " OR ".join(parts) + ")"


def _typed_test(
    test: AttributeTest, value_type: str, access: ValueAccess, fold: bool, b: SqlBuilder
) -> str:
    is_type = f"{access.type_sql} = {b.param(value_type, 'text')}"
    op = test.operator
    if value_type == "string_list":
        items = f"CASE WHEN {is_type} THEN {access.list_sql} END"
        if op == Operator.CONTAINS:
            assert test.value is not None
            item = _case("i.item", fold)
            needle = _case(b.param(test.value.value, "text"), fold)
            return (
                f"EXISTS (SELECT 1 FROM jsonb_array_elements_text({items}) AS i(item)"
                f" WHERE {item} = {needle})"
            )
        assert test.value is not None
        listed = f"to_jsonb({_bind(test.value, b)})"
        if fold:
            return (
                f"{FOLD_CASE}(({items})::text) {COMPARISON_SQL[op]} {FOLD_CASE}(({listed})::text)"
            )
        return f"{items} {COMPARISON_SQL[op]} {listed}"
    cast = CAST_SQL.get(value_type)
    stored = f"CASE WHEN {is_type} THEN {access.text_sql} END"
    if cast is not None:
        stored = f"({stored})::{cast}"
    text = value_type in TEXT_TYPES
    stored = _case(stored, fold and text)
    if op == Operator.IN:
        values = [v.value for v in test.values]
        array = b.param(values, "float8[]" if value_type == "number" else "text[]")
        if fold and text:
            return f"{stored} IN (SELECT {FOLD_CASE}(x) FROM unnest({array}) AS x)"
        return f"{stored} = ANY({array})"
    assert test.value is not None
    operand = _case(_bind(Operand(value_type, test.value.value), b), fold and text)
    if op == Operator.CONTAINS:
        return f"strpos({stored}, {operand}) > 0"
    if op == Operator.STARTS_WITH:
        return f"starts_with({stored}, {operand})"
    return f"{stored} {COMPARISON_SQL[op]} {operand}"


def _case(expression: str, fold: bool) -> str:
    return f"{FOLD_CASE}({expression})" if fold else expression


def event_condition_sql(test: AttributeTest, b: SqlBuilder) -> str:
    """A funnel step's condition on the attribute of an event `e` (payload is the proto JSON
    of CustomEventDetail: {"attributes": {"price": {"number_value": 9.5}}})."""
    name = b.param(test.name, "text")
    return (
        f"coalesce((SELECT {attribute_sql(test, EVENT_ACCESS, b)}"
        f" FROM (SELECT e.payload->'attributes'->{name} AS value) v"
        " WHERE v.value IS NOT NULL), false)"
    )


def _step_events(step: FunnelStep, b: SqlBuilder) -> str:
    """The custom events of `e` that count for a step (lower-case name, optional condition)."""
    sql = f"e.kind = {CUSTOM_EVENT_KIND} AND e.name = {b.param(step.event_name, 'text')}"
    if step.condition is not None:
        sql += f" AND {event_condition_sql(step.condition, b)}"
    return sql


def _funnel_attempts(
    steps: Sequence[FunnelStep], window_ms: int, b: SqlBuilder, s1_also: str = ""
) -> str:
    """The CTEs `s1` and `attempts` of the counts and of the listing (one rule, one text): an
    attempt per occurrence of step 1 by a live profile up to `$2` (s1, narrowed by `s1_also`),
    its step times t1..tn (NULL from the first step it missed) and how many steps it reached.

    Each later step is the earliest matching event strictly after the previous step and
    strictly before start + window (a LATERAL per step, through events_by_profile_time), which
    is funnels.best_attempt's greedy rule.
    """
    window = b.param(window_ms, "bigint")
    first = _step_events(steps[0], b)
    joins = []
    for k, step in enumerate(steps[1:], start=2):
        previous = "s1.t1" if k == 2 else f"x{k - 1}.t"
        joins.append(
            f" LEFT JOIN LATERAL (SELECT min(e.event_time) AS t FROM ingest_read_events() e"
            f" WHERE e.project_id = $1 AND e.profile_id = s1.profile_id AND {_step_events(step, b)}"
            f" AND e.event_time > {previous}"
            f" AND e.event_time < s1.t1 + interval '1 millisecond' * {window}"
            f" AND e.event_time <= $2) x{k} ON true"
        )
    reached = " + ".join(["1", *(f"(x{k}.t IS NOT NULL)::int" for k in range(2, len(steps) + 1))])
    times = "".join(f", x{k}.t AS t{k}" for k in range(2, len(steps) + 1))
    return (
        f"WITH s1 AS (SELECT e.profile_id, e.event_time AS t1 FROM ingest_read_events() e"
        f" JOIN identity_read_profiles() p"
        f" ON p.project_id = e.project_id AND p.profile_id = e.profile_id"
        f" AND p.merged_into IS NULL"
        f" WHERE e.project_id = $1 AND {first} AND e.event_time <= $2{s1_also}),"
        f" attempts AS (SELECT s1.profile_id, s1.t1{times}, {reached} AS reached"
        f" FROM s1{''.join(joins)})"
    )


def funnel_counts_sql(steps: Sequence[FunnelStep], window_ms: int, b: SqlBuilder) -> str:
    """Per step, the number of live profiles whose best attempt completed it, as of `$2`.

    The attempts of _funnel_attempts; a profile's best attempt is its maximum step count.
    Cost: one scan of the project's events for step 1 (no index on name), then an index range
    per attempt and step.
    """
    counts = ", ".join(f"count(*) FILTER (WHERE best >= {k})" for k in range(1, len(steps) + 1))
    return (
        f"{_funnel_attempts(steps, window_ms, b)},"
        f" best AS (SELECT profile_id, max(reached) AS best FROM attempts GROUP BY profile_id)"
        f" SELECT {counts} FROM best"
    )


def funnel_profiles_sql(
    steps: Sequence[FunnelStep],
    window_ms: int,
    step_number: int,
    dropped: bool,
    after: UUID | None,
    limit: int,
    b: SqlBuilder,
) -> str:
    """The live profiles whose best attempt, as of `$2`, completed step `step_number` (from
    1; with `dropped`, completed it and not the next), after `after` in profile_id order, at
    most `limit`: (profile_id, complete_time, attempt_start_time).

    The attempts are funnel_counts_sql's (one rule: a profile is listed at a step exactly when
    it is counted there). The best attempt is a profile's attempt with the most steps, the
    earliest start on a tie (DISTINCT ON ... ORDER BY reached DESC, t1), whose step time is the
    one GetFunnelProgress shows. Keyset paging on profile_id: only the step-1 events of profiles
    after the page's position are read, so a page costs the counting of those profiles.
    """
    start = b.param(after, "uuid")
    # A NULL position starts at the first profile: no UUID is below all of them (the nil UUID
    # would hide a profile of that ID).
    attempts = _funnel_attempts(
        steps, window_ms, b, f" AND ({start} IS NULL OR e.profile_id > {start})"
    )
    times = ", ".join(["t1", *(f"t{k}" for k in range(2, len(steps) + 1))])
    step = b.param(step_number, "int")
    reached = f"reached = {step}" if dropped else f"reached >= {step}"
    return (
        f"{attempts},"
        f" best AS (SELECT DISTINCT ON (profile_id) profile_id, reached, t1,"
        f" ARRAY[{times}] AS times FROM attempts ORDER BY profile_id, reached DESC, t1)"
        f" SELECT profile_id, times[{step}] AS complete_time, t1 AS attempt_start_time"
        f" FROM best WHERE {reached} ORDER BY profile_id LIMIT {b.param(limit, 'int')}"
    )


def funnel_occurrences_sql(steps: Sequence[FunnelStep], b: SqlBuilder) -> str:
    """(step index from 0, event_time) of every event of profile `$3` that counts for a step,
    up to `$2`; funnels.best_attempt matches them."""
    parts = [
        f"SELECT {index}::int AS step, e.event_time FROM ingest_read_events() e"
        f" WHERE e.project_id = $1"
        f" AND e.profile_id = $3 AND e.event_time <= $2 AND {_step_events(step, b)}"
        for index, step in enumerate(steps)
    ]
    return " UNION ALL ".join(parts)
