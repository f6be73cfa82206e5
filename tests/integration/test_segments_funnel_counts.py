"""The funnel rule exists in Python (services/segments/funnels.py best_attempt), in PL/pgSQL
(segments_read_funnel_progress: tests/integration/test_segments_funnel_progress.py compares
them) and in the compiled per-step counts (filter_sql.funnel_counts_sql, behind GetFunnel):
on random projects, the counts equal the number of live profiles whose best attempt reached
each step."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from services.segments.definitions_repository import DefinitionsRepository
from services.segments.funnels import Funnel, FunnelStep, best_attempt
from shared.db import create_pool

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

INSERT_PROJECT = "INSERT INTO projects (project_id, name) VALUES ($1, $2)"
INSERT_PROFILES = """
    INSERT INTO profiles (project_id, profile_id, merged_into)
    SELECT $1, p.id, p.merged_into FROM unnest($2::uuid[], $3::uuid[]) AS p(id, merged_into)"""
INSERT_EVENTS = """
    INSERT INTO events (project_id, installation_id, event_id, profile_id, kind, name,
                        event_time, receive_time, platform, payload)
    SELECT $1, 'inst', e.id, e.profile_id, 1, e.name, e.t, $2, 1, jsonb_build_object('name', e.name)
    FROM unnest($3::text[], $4::uuid[], $5::text[], $6::timestamptz[]) AS e(id, profile_id, name, t)
"""


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


async def test_funnel_counts_in_sql_equal_best_attempts_on_random_projects(
    pool: asyncpg.Pool,
) -> None:
    rng = random.Random(20241203)
    repository = DefinitionsRepository(pool)
    for trial in range(25):
        project_id = uuid.uuid4()
        await pool.execute(INSERT_PROJECT, project_id, f"p{trial}-{project_id}")
        live = [uuid.uuid4() for _ in range(rng.randint(1, 12))]
        # A merged-away profile's events (not moved yet) count for nobody.
        merged = uuid.uuid4()
        await pool.execute(
            INSERT_PROFILES, project_id, [*live, merged], [*([None] * len(live)), live[0]]
        )
        events = [
            (
                rng.choice([*live, merged]),
                rng.choice("abc"),
                T0 + timedelta(hours=rng.uniform(0, 48)),
            )
            for _ in range(rng.randint(0, 60))
        ]
        await pool.execute(
            INSERT_EVENTS,
            project_id,
            T0,
            [f"e{i}" for i in range(len(events))],
            [profile for profile, _, _ in events],
            [name for _, name, _ in events],
            [t for _, _, t in events],
        )
        names = [rng.choice("abc") for _ in range(rng.randint(2, 4))]
        window = timedelta(hours=rng.choice([1, 3, 12, 40]))
        as_of = T0 + timedelta(hours=rng.uniform(10, 50))
        funnel = Funnel(uuid.uuid4(), "f", "", tuple(FunnelStep(n) for n in names), window, T0)
        counts = await repository.funnel_counts(project_id, funnel, as_of)
        reached = [
            len(
                best_attempt(
                    [
                        [t for p, n, t in events if p == profile and n == name and t <= as_of]
                        for name in names
                    ],
                    window,
                ).step_times
            )
            for profile in live
        ]
        assert counts == [sum(1 for r in reached if r >= k) for k in range(1, len(names) + 1)]
