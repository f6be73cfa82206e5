"""Segments' read contract profile_funnel_progress() (0005_segments.sql) gives what
model.best_attempt gives, on the unit cases and on random ones; its step conditions
(funnel_step_value_matches) agree with the compiled SQL of filter_sql.event_condition_sql."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.segments.filter_sql import SqlBuilder, event_condition_sql
from services.segments.filters import (
    OPERATOR_TYPES,
    AttributeTest,
    Operand,
    Operator,
    filter_to_json,
)
from services.segments.funnels import FunnelStep, best_attempt, steps_to_json
from shared.db import create_pool

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
AS_OF = T0 + timedelta(days=30)
HOUR = timedelta(hours=1)

PROGRESS = """
    SELECT funnel_id, step_number, event_name, complete_time
    FROM profile_funnel_progress($1, $2, $3)"""
INSERT_FUNNEL = """
    INSERT INTO funnels (project_id, funnel_id, display_name, steps, conversion_window_ms,
                         definition_hash, create_time)
    VALUES ($1, $2, $3, $4, $5, '', $6)"""
INSERT_EVENTS = """
    INSERT INTO events (project_id, installation_id, event_id, profile_id, kind, name,
                        event_time, receive_time, platform, payload)
    SELECT $1, 'inst', e.id, $2, 1, e.name, e.t, $3, 1, e.payload
    FROM unnest($4::text[], $5::text[], $6::timestamptz[], $7::jsonb[]) AS e(id, name, t, payload)
"""


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


async def insert_events(
    pool: asyncpg.Pool,
    project_id: uuid.UUID,
    profile_id: uuid.UUID,
    events: Sequence[tuple[str, datetime]],
    prices: Sequence[int] | None = None,
) -> None:
    """Custom events (name, time) of one profile; `prices`, one per event, are their "price"
    attribute."""
    await pool.execute(
        INSERT_EVENTS,
        project_id,
        profile_id,
        T0,
        [f"e{i}" for i in range(len(events))],
        [name for name, _ in events],
        [t for _, t in events],
        [
            {"name": name}
            if prices is None
            else {"name": name, "attributes": {"price": {"number_value": price}}}
            for (name, _), price in zip(events, prices or [0] * len(events), strict=True)
        ],
    )


async def progress_in_sql(
    pool: asyncpg.Pool,
    steps: Sequence[str | FunnelStep],
    events: Sequence[tuple[str, datetime]],
    window: timedelta,
    as_of: datetime = AS_OF,
    prices: Sequence[int] | None = None,
) -> tuple[datetime, ...]:
    """The completed step times profile_funnel_progress() gives one profile with `events`
    (name, time) for a funnel of `steps` (event names, or steps with a condition), in a project
    of their own, with `prices` as in insert_events."""
    funnel_steps = [s if isinstance(s, FunnelStep) else FunnelStep(s) for s in steps]
    project_id, profile_id, funnel_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await pool.execute(
        INSERT_FUNNEL,
        project_id,
        funnel_id,
        "f",
        steps_to_json(funnel_steps),
        window // timedelta(milliseconds=1),
        T0,
    )
    await insert_events(pool, project_id, profile_id, events, prices)
    rows = await pool.fetch(PROGRESS, project_id, profile_id, as_of)
    assert [(r["funnel_id"], r["step_number"], r["event_name"]) for r in rows] == [
        (funnel_id, n, step.event_name) for n, step in enumerate(funnel_steps, start=1)
    ]
    times = [r["complete_time"] for r in rows]
    completed = tuple(t for t in times if t is not None)
    # Completed steps are a prefix: once a step is missing, none after it is completed.
    assert times[: len(completed)] == list(completed)
    return completed


def in_python(
    steps: Sequence[str], events: Sequence[tuple[str, datetime]], window: timedelta
) -> tuple[datetime, ...]:
    occurrences = [[t for name, t in events if name == step] for step in steps]
    return best_attempt(occurrences, window).step_times


# The cases of tests/unit/test_segments_funnels.py, as events.
UNIT_CASES: list[tuple[list[str], list[tuple[str, datetime]], timedelta]] = [
    (["a", "b", "c"], [("a", at(0)), ("b", at(1)), ("c", at(2))], timedelta(days=1)),
    (["a", "b", "c"], [("a", at(0)), ("b", at(1))], timedelta(days=1)),
    (["a", "b", "c"], [("a", at(5)), ("b", at(1)), ("c", at(6))], timedelta(days=1)),
    (["a", "b"], [("a", at(5)), ("b", at(5))], timedelta(days=1)),
    (["a", "b"], [("a", at(0)), ("b", at(2))], 2 * HOUR),
    (["a", "b"], [("a", at(0)), ("b", at(1.99))], 2 * HOUR),
    (["a", "b", "c"], [("a", at(0)), ("b", at(1)), ("c", at(2.5))], 2 * HOUR),
    (
        ["a", "b", "c"],
        [("a", at(0)), ("a", at(10)), ("b", at(1)), ("b", at(11)), ("c", at(12))],
        3 * HOUR,
    ),
    (["a", "b", "c"], [("a", at(10)), ("a", at(0)), ("b", at(1)), ("b", at(11))], 3 * HOUR),
    (["a", "b"], [("b", at(1))], 3 * HOUR),
    (["view", "view", "view"], [("view", at(0)), ("view", at(1))], 5 * HOUR),
    (["a", "b"], [], HOUR),
]


@pytest.mark.parametrize(("steps", "events", "window"), UNIT_CASES)
async def test_progress_in_sql_equals_best_attempt_on_the_unit_cases(
    pool: asyncpg.Pool,
    steps: list[str],
    events: list[tuple[str, datetime]],
    window: timedelta,
) -> None:
    assert await progress_in_sql(pool, steps, events, window) == in_python(steps, events, window)


async def test_progress_in_sql_equals_best_attempt_on_random_histories(
    pool: asyncpg.Pool,
) -> None:
    rng = random.Random(20240501)
    for _ in range(150):
        steps = [rng.choice("abc") for _ in range(rng.randint(2, 5))]
        # Whole hours on a short grid, so ties, repeats and window edges are frequent.
        events = [(rng.choice("abcd"), at(rng.randint(0, 12))) for _ in range(rng.randint(0, 12))]
        window = rng.randint(1, 6) * HOUR
        expected = in_python(steps, events, window)
        assert await progress_in_sql(pool, steps, events, window) == expected, (steps, events)


async def test_progress_in_sql_equals_best_attempt_with_step_conditions(
    pool: asyncpg.Pool,
) -> None:
    """Steps with a condition read their occurrences apart from steps without (0009): the
    same names with and without a condition, mixed in one funnel, agree with the model."""
    big = AttributeTest(False, "price", Operator.GREATER_THAN_OR_EQUAL, Operand("number", 10.0))
    rng = random.Random(20241124)
    for _ in range(100):
        steps = [
            FunnelStep(rng.choice("abc"), big if rng.random() < 0.5 else None)
            for _ in range(rng.randint(2, 5))
        ]
        events = [(rng.choice("abcd"), at(rng.randint(0, 12))) for _ in range(rng.randint(0, 14))]
        prices = [rng.choice((0, 5, 10, 20)) for _ in events]
        window = rng.randint(1, 6) * HOUR
        occurrences = [
            [
                t
                for (name, t), price in zip(events, prices, strict=True)
                if name == step.event_name and (step.condition is None or price >= 10)
            ]
            for step in steps
        ]
        expected = best_attempt(occurrences, window).step_times
        got = await progress_in_sql(pool, steps, events, window, prices=prices)
        assert got == expected, (steps, events, prices)


async def test_events_after_as_of_do_not_count(pool: asyncpg.Pool) -> None:
    events = [("a", at(0)), ("b", at(1)), ("b", at(3))]
    assert await progress_in_sql(pool, ["a", "b"], events, 5 * HOUR, as_of=at(2)) == (
        at(0),
        at(1),
    )
    assert await progress_in_sql(pool, ["a", "b"], events, 5 * HOUR, as_of=at(0.5)) == (at(0),)


# Event attribute values as stored in events.payload (proto JSON of AttributeValue).
VALUES: list[dict[str, Any] | None] = [
    None,
    {"string_value": "Pro"},
    {"string_value": "pro plan"},
    {"string_value": "ÉCOLE Ωmega"},
    {"url_value": "https://example.com/Pro"},
    {"number_value": 5},
    {"number_value": 12.5},
    {"bool_value": True},
    {"bool_value": False},
    {"timestamp_value": "2024-05-01T12:00:00Z"},
    {"string_list_value": {"values": ["red", "Blue"]}},
    {"string_list_value": {"values": ["Ünal"]}},
    {"string_list_value": {}},
]
OPERANDS: dict[str, list[Operand]] = {
    "string": [
        Operand("string", "Pro"),
        Operand("string", "pro"),
        Operand("string", "blue"),
        Operand("string", "école ω"),
        Operand("string", "ünal"),
    ],
    "url": [Operand("url", "https://example.com/pro")],
    "number": [Operand("number", 5.0), Operand("number", 10.0)],
    "bool": [Operand("bool", True)],
    "timestamp": [Operand("timestamp", T0), Operand("timestamp", T0 + HOUR)],
    "string_list": [
        Operand("string_list", ("red", "Blue")),
        Operand("string_list", ("red",)),
        Operand("string_list", ("ünal",)),
    ],
}


def condition_tests() -> list[AttributeTest]:
    tests = [AttributeTest(False, "price", Operator.EXISTS)]
    for operator, types in OPERATOR_TYPES.items():
        for value_type in sorted(types):
            for operand in OPERANDS[value_type]:
                for ignore_case in (False, True):
                    if operator == Operator.IN:
                        others = OPERANDS[value_type]
                        tests.append(
                            AttributeTest(
                                False,
                                "price",
                                operator,
                                values=tuple(others),
                                ignore_case=ignore_case,
                            )
                        )
                    else:
                        tests.append(
                            AttributeTest(
                                False, "price", operator, operand, ignore_case=ignore_case
                            )
                        )
    return tests


async def test_step_conditions_in_sql_agree_with_the_compiled_filters(
    pool: asyncpg.Pool,
) -> None:
    checked = 0
    async with pool.acquire() as conn:
        for test in condition_tests():
            builder = SqlBuilder(first=2)
            compiled = event_condition_sql(test, builder)
            statement = f"SELECT {compiled} FROM (SELECT $1::jsonb AS payload) e"
            stored = filter_to_json(test)["attribute"]
            for value in VALUES:
                payload = {"attributes": {} if value is None else {"price": value}}
                expected = await conn.fetchval(statement, payload, *builder.params)
                got = await conn.fetchval(
                    "SELECT funnel_step_value_matches($1::jsonb, $2::jsonb)",
                    stored,
                    value,
                )
                assert got is expected, (json.dumps(stored), value, expected, got)
                checked += 1
    assert checked > 500


# Rows the current transaction read from events and each of its indexes so far: scanned table
# rows, heap rows fetched through an index, and index entries returned (events is partitioned,
# 0024: its partitions and their indexes hold the rows and the counts).
EVENTS_ROWS_READ = """
    WITH tables AS (
        SELECT 'events'::regclass::oid AS oid
        UNION ALL
        SELECT inhrelid FROM pg_inherits WHERE inhparent = 'events'::regclass
    )
    SELECT sum(pg_stat_get_xact_tuples_returned(c.oid) + pg_stat_get_xact_tuples_fetched(c.oid))
    FROM pg_class c
    WHERE c.oid IN (SELECT oid FROM tables)
       OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid IN (SELECT oid FROM tables))"""


async def test_progress_reads_the_steps_events_and_no_other(pool: asyncpg.Pool) -> None:
    """A profile of 4,000 events of other names costs no more to read than one without them:
    each step reads its own name's occurrences (events_custom_by_name, 0009), where 0005 read
    every event of the profile."""
    project_id, profile_id = uuid.uuid4(), uuid.uuid4()
    big = AttributeTest(False, "price", Operator.GREATER_THAN_OR_EQUAL, Operand("number", 10.0))
    steps = [FunnelStep("open"), FunnelStep("cart", big), FunnelStep("pay")]
    await pool.execute(
        INSERT_FUNNEL, project_id, uuid.uuid4(), "f", steps_to_json(steps), 3_600_000, T0
    )
    funnel_events = [("open", at(1)), ("cart", at(1.2)), ("cart", at(1.3))]
    other_events = [("view", at(i / 100)) for i in range(4_000)]
    prices = [0, 5, 20] + [0] * len(other_events)
    await insert_events(pool, project_id, profile_id, funnel_events + other_events, prices)
    await pool.execute("ANALYZE events")
    async with pool.acquire() as conn, conn.transaction():
        before = await conn.fetchval(EVENTS_ROWS_READ)
        rows = await conn.fetch(PROGRESS, project_id, profile_id, AS_OF)
        read = await conn.fetchval(EVENTS_ROWS_READ) - before
    assert [r["complete_time"] for r in rows] == [at(1), at(1.3), None]
    # Each step's occurrences once (at most twice: an index entry and its heap row).
    assert read <= 2 * len(funnel_events), read
