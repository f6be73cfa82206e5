"""ingest_read_last_event_seq, the bound a timeline's first page fixes for its later pages: 0
before any event, then the newest event_seq handed out, whatever project or partition the
event went to, so that every event stored after it was read has a larger number
(tests/api/test_query_lists.py pages through a timeline while events arrive)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg

BOUND = "SELECT last_event_seq FROM ingest_read_last_event_seq()"

INSERT_EVENT = """
    INSERT INTO events (project_id, installation_id, event_id, profile_id, kind, name,
                        event_time, receive_time, platform, payload)
    VALUES ($1, 'inst', $2, $3, 1, 'view', $4, $4, 1, '{"name": "view"}')
    RETURNING event_seq"""

# A month with a partition of its own, and one long gone (the DEFAULT partition's).
THIS_MONTH = datetime.now(UTC)
LONG_AGO = datetime(2001, 5, 1, tzinfo=UTC)


async def test_the_bound_is_zero_before_any_event_then_the_newest_number_handed_out(
    db: asyncpg.Pool,
) -> None:
    assert await db.fetchval(BOUND) == 0
    first_project, second_project, profile_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    seqs = [
        await db.fetchval(INSERT_EVENT, first_project, "e1", profile_id, THIS_MONTH),
        await db.fetchval(INSERT_EVENT, second_project, "e2", profile_id, LONG_AGO),
    ]
    assert (
        await db.fetchval(BOUND)
        == max(seqs)
        == await db.fetchval("SELECT max(event_seq) FROM ingest_read_events()")
    )
    # A batch numbered but not committed yet already counts (the bound is an upper one), and
    # its numbers stay counted when it rolls back.
    async with db.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        in_flight = await conn.fetchval(INSERT_EVENT, first_project, "e3", profile_id, LONG_AGO)
        assert await db.fetchval(BOUND) == in_flight > max(seqs)
        await transaction.rollback()
    bound = await db.fetchval(BOUND)
    assert bound == in_flight
    after = await db.fetchval(INSERT_EVENT, first_project, "e4", profile_id, THIS_MONTH)
    assert after > bound
    assert await db.fetchval(BOUND) == after
