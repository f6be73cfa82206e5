"""Segments' engagement rule exists twice, in Python (services/segments/model.py engagement(),
behind GetEngagement) and in SQL (segments_read_engagement, behind query's profile view and the
custom segment filter's engagement condition): on random histories they agree to the last bit,
average included (rounded to the microsecond half to even, as Python's timedelta division)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import asyncpg

from services.segments.model import (
    DEFAULT_TIME_ZONE,
    History,
    Session,
    engagement,
    local_day,
    zone_of,
)

AS_OF = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
ZONES = [None, "UTC", "Europe/Paris", "America/Los_Angeles", "Asia/Kathmandu", "Pacific/Apia"]

ENGAGEMENT = """
    SELECT session_count, average_session_us, active_days, score1, score2, score3, score
    FROM segments_read_engagement($1, $2, $3)"""
INSERT_PROFILE = """
    INSERT INTO segment_profiles (project_id, profile_id, time_zone) VALUES ($1, $2, $3)"""
INSERT_SESSIONS = """
    INSERT INTO segment_sessions (project_id, profile_id, session_key, platform, start_time,
                                  start_known, duration_ms, ended)
    SELECT $1, $2, 's' || n, 1, s.t, true, s.ms, s.ended
    FROM unnest($3::timestamptz[], $4::bigint[], $5::boolean[]) WITH ORDINALITY
        AS s(t, ms, ended, n)"""


async def compare(
    db: asyncpg.Pool,
    zone: str | None,
    sessions: Sequence[tuple[datetime, int, bool]],
    as_of: datetime = AS_OF,
) -> None:
    """Stores one profile with `sessions` (start, duration in ms, ended) in `zone` and checks
    that segments_read_engagement as of `as_of` equals model.engagement."""
    project_id, profile_id = uuid.uuid4(), uuid.uuid4()
    await db.execute(INSERT_PROFILE, project_id, profile_id, zone)
    await db.execute(
        INSERT_SESSIONS,
        project_id,
        profile_id,
        [s[0] for s in sessions],
        [s[1] for s in sessions],
        [s[2] for s in sessions],
    )
    row = await db.fetchrow(ENGAGEMENT, project_id, profile_id, as_of)
    assert row is not None
    recent = tuple(Session(t, timedelta(milliseconds=ms), 1, ended) for t, ms, ended in sessions)
    starts = [t for t, _, _ in sessions]
    history = History(
        session_count=len(sessions),
        first_session_time=min(starts, default=None),
        last_session_time=max(starts, default=None),
        total_active_days=len({local_day(t, zone_of(zone)) for t in starts}),
        recent_sessions=recent,
        time_zone=zone or DEFAULT_TIME_ZONE,
    )
    expected = engagement(history, as_of)
    assert row["session_count"] == expected.session_count
    assert timedelta(microseconds=row["average_session_us"]) == expected.average_session_duration
    assert (row["score1"], row["score2"], row["score3"]) == (
        expected.score1,
        expected.score2,
        expected.score3,
    )
    assert row["score"] == expected.score


async def test_engagement_in_sql_equals_the_model_on_random_histories(db: asyncpg.Pool) -> None:
    rng = random.Random(20240501)
    for _ in range(150):
        sessions = [
            (
                # Around the 168 h window, both edges included.
                AS_OF - timedelta(hours=rng.uniform(-12, 190)),
                rng.choice([0, 1, 999, rng.randint(1, 30_000), rng.randint(1, 400_000)]),
                rng.random() < 0.7,
            )
            for _ in range(rng.choice([0, 1, 2, 3, 7, 16, 25]))
        ]
        await compare(db, rng.choice(ZONES), sessions)


async def test_engagement_in_sql_counts_the_window_edges_as_the_model(db: asyncpg.Pool) -> None:
    edges = [
        (AS_OF - timedelta(hours=168), 60_000, True),
        (AS_OF, 30_000, True),
        (AS_OF - timedelta(hours=168, microseconds=1), 90_000, True),
        (AS_OF + timedelta(microseconds=1), 90_000, True),
    ]
    await compare(db, "Europe/Paris", edges)


async def test_engagement_in_sql_rounds_the_average_half_to_even(db: asyncpg.Pool) -> None:
    # 16 ended sessions averaging an exact half microsecond: 16,001 ms / 16 = 1,000,062.5 us
    # (rounds down to even), 16,003 ms / 16 = 1,000,187.5 us (rounds up to even).
    for last in (1_001, 1_003):
        sessions = [(AS_OF - timedelta(hours=n), 1_000, True) for n in range(1, 16)]
        await compare(db, None, [*sessions, (AS_OF - timedelta(hours=16), last, True)])
