"""The profile's last crash kept by ingest (profile_last_crashes, read through
ingest_read_profile_last_crashes): the latest crash by event time whatever the arrival order,
unchanged by retention's deletes, put back from the events left by any other delete, and
carried by a merge and removed by an erasure through the declared profile hooks."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from services.identity.hooks import load_profile_hooks, run_merge_hooks

T = datetime(2031, 3, 10, 12, 0, tzinfo=UTC)

INSERT_CRASHES = """
    INSERT INTO events (project_id, installation_id, event_id, profile_id, kind, event_time,
                        receive_time, platform, payload)
    SELECT $1, 'inst', c.event_id, $2, 8, c.event_time, c.event_time, 1,
           jsonb_build_object('name', c.name, 'reason', 'boom', 'fatal', true)
    FROM unnest($3::text[], $4::timestamptz[], $5::text[]) AS c(event_id, event_time, name)"""

INSERT_VIEW = """
    INSERT INTO events (project_id, installation_id, event_id, profile_id, kind, name,
                        event_time, receive_time, platform, payload)
    VALUES ($1, 'inst', $3, $2, 1, 'view', $4, $4, 1, '{"name": "view"}')"""

STORED = """
    SELECT event_id, name, crash_time FROM ingest_read_profile_last_crashes()
    WHERE project_id = $1 AND profile_id = $2"""

# What the events still stored say: the latest crash, as the profile view read it before.
FROM_EVENTS = """
    SELECT event_id, payload ->> 'name' AS name, event_time AS crash_time FROM events
    WHERE project_id = $1 AND profile_id = $2 AND kind = 8
    ORDER BY event_time DESC, event_seq DESC LIMIT 1"""

DELETE_EVENT = "DELETE FROM events WHERE project_id = $1 AND event_id = $2"
MARK_RETENTION = "SELECT set_config('profiles.retention', 'on', true)"


async def crashes(
    db: asyncpg.Pool | asyncpg.Connection,
    project_id: uuid.UUID,
    profile_id: uuid.UUID,
    *crashes: tuple[str, datetime, str],
) -> None:
    ids, times, names = zip(*crashes, strict=True)
    await db.execute(INSERT_CRASHES, project_id, profile_id, list(ids), list(times), list(names))


async def stored(db: asyncpg.Pool, project_id: uuid.UUID, profile_id: uuid.UUID) -> tuple | None:  # type: ignore[type-arg]
    row = await db.fetchrow(STORED, project_id, profile_id)
    return None if row is None else tuple(row)


async def from_events(
    db: asyncpg.Pool, project_id: uuid.UUID, profile_id: uuid.UUID
) -> tuple | None:  # type: ignore[type-arg]
    row = await db.fetchrow(FROM_EVENTS, project_id, profile_id)
    return None if row is None else tuple(row)


async def age_out(db: asyncpg.Pool, project_id: uuid.UUID, profile_id: uuid.UUID) -> None:
    """Deletes every event of the profile as retention's sweep does (marked)."""
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(MARK_RETENTION)
        await conn.execute(
            "DELETE FROM events WHERE project_id = $1 AND profile_id = $2", project_id, profile_id
        )


async def test_the_last_crash_is_the_latest_by_event_time_whatever_the_arrival_order(
    db: asyncpg.Pool,
) -> None:
    project_id, profile_id = uuid.uuid4(), uuid.uuid4()
    assert await stored(db, project_id, profile_id) is None
    await crashes(db, project_id, profile_id, ("c2", T, "Second"))
    await crashes(db, project_id, profile_id, ("c1", T - timedelta(days=1), "First"))
    assert await stored(db, project_id, profile_id) == ("c2", "Second", T)
    # A batch of several crashes for one profile, the latest not first.
    await crashes(
        db,
        project_id,
        profile_id,
        ("c3", T + timedelta(hours=1), "Third"),
        ("c4", T + timedelta(hours=2), "Fourth"),
        ("c0", T - timedelta(days=9), "Zeroth"),
    )
    await db.execute(INSERT_VIEW, project_id, profile_id, "v1", T + timedelta(days=1))
    assert await stored(db, project_id, profile_id) == ("c4", "Fourth", T + timedelta(hours=2))
    assert await stored(db, project_id, profile_id) == await from_events(db, project_id, profile_id)


async def test_retention_keeps_the_last_crash_and_any_other_delete_puts_back_the_one_before(
    db: asyncpg.Pool,
) -> None:
    project_id, profile_id = uuid.uuid4(), uuid.uuid4()
    await crashes(
        db,
        project_id,
        profile_id,
        ("c1", T, "One"),
        ("c2", T + timedelta(hours=1), "Two"),
        ("c3", T + timedelta(hours=2), "Three"),
    )
    # Not retention (erasure's shadowed events, say): the stored crash was deleted, so the
    # latest one left replaces it; deleting an older one changes nothing.
    await db.execute(DELETE_EVENT, project_id, "c3")
    assert await stored(db, project_id, profile_id) == ("c2", "Two", T + timedelta(hours=1))
    await db.execute(DELETE_EVENT, project_id, "c1")
    assert await stored(db, project_id, profile_id) == ("c2", "Two", T + timedelta(hours=1))

    await age_out(db, project_id, profile_id)

    assert await from_events(db, project_id, profile_id) is None
    assert await stored(db, project_id, profile_id) == ("c2", "Two", T + timedelta(hours=1))
    # Later crashes still replace it, earlier ones (late imports) do not.
    await crashes(db, project_id, profile_id, ("c0", T - timedelta(days=3), "Imported"))
    assert await stored(db, project_id, profile_id) == ("c2", "Two", T + timedelta(hours=1))
    await crashes(db, project_id, profile_id, ("c4", T + timedelta(days=3), "Four"))
    assert await stored(db, project_id, profile_id) == ("c4", "Four", T + timedelta(days=3))


async def test_a_merge_after_retention_leaves_the_later_crash_of_the_two_on_the_survivor(
    db: asyncpg.Pool,
) -> None:
    project_id = uuid.uuid4()
    source, target = uuid.uuid4(), uuid.uuid4()
    other_source, other_target = uuid.uuid4(), uuid.uuid4()
    # The source's crash is the later one but retention removed it; the target's is kept.
    await crashes(db, project_id, source, ("s1", T + timedelta(days=2), "SourceLate"))
    await age_out(db, project_id, source)
    await crashes(db, project_id, source, ("s0", T - timedelta(days=5), "SourceEarly"))
    await crashes(db, project_id, target, ("t1", T, "Target"))
    # The other pair: the target's crash is the later one, the source's events all stored.
    await crashes(db, project_id, other_source, ("o1", T, "OtherSource"))
    await crashes(db, project_id, other_target, ("p1", T + timedelta(days=1), "OtherTarget"))

    async with db.acquire() as conn, conn.transaction():
        hooks = await load_profile_hooks(conn)
        await run_merge_hooks(conn, hooks, project_id, source, target)
        await run_merge_hooks(conn, hooks, project_id, other_source, other_target)

    assert await stored(db, project_id, source) is None
    assert await stored(db, project_id, target) == ("s1", "SourceLate", T + timedelta(days=2))
    assert await stored(db, project_id, other_source) is None
    assert await stored(db, project_id, other_target) == (
        "p1",
        "OtherTarget",
        T + timedelta(days=1),
    )
    assert await stored(db, project_id, other_target) == await from_events(
        db, project_id, other_target
    )


async def test_an_erasure_removes_the_stored_crash_with_the_profile(db: asyncpg.Pool) -> None:
    project_id, erased, kept = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await crashes(db, project_id, erased, ("e1", T, "Erased"))
    await crashes(db, project_id, kept, ("k1", T, "Kept"))
    await age_out(db, project_id, erased)  # the event went already; its name is still kept

    async with db.acquire() as conn, conn.transaction():
        hooks = await load_profile_hooks(conn)
        for statement in hooks.erase:
            await conn.execute(statement, project_id, [erased], ["inst"], [])

    assert await stored(db, project_id, erased) is None
    assert await stored(db, project_id, kept) == ("k1", "Kept", T)


INSERT_CRASH_PAYLOAD = """
    INSERT INTO events (project_id, installation_id, event_id, profile_id, kind, event_time,
                        receive_time, platform, payload)
    VALUES ($1, 'inst', $3, $2, 8, $4, $4, 1, $5::text::jsonb)"""
STORED_FIELDS = """
    SELECT name, reason, fatal FROM ingest_read_profile_last_crashes()
    WHERE project_id = $1 AND profile_id = $2"""


async def test_the_insert_and_delete_paths_read_a_crash_payload_as_ingest_stores_it(
    db: asyncpg.Pool,
) -> None:
    """Validation stores a crash's reason and fatal only when set; the trigger's insert branch
    and its delete branch (the crash before put back) read every shape the same way."""
    project_id = uuid.uuid4()
    shapes = [
        ({"name": "OnlyName"}, ("OnlyName", "", False)),
        ({"name": "WithReason", "reason": "disk full"}, ("WithReason", "disk full", False)),
        ({"name": "Fatal", "fatal": True}, ("Fatal", "", True)),
        (
            {"name": "All", "reason": "oom", "fatal": True, "stack_trace": "at main()"},
            ("All", "oom", True),
        ),
    ]
    for n, (payload, expected) in enumerate(shapes):
        profile_id = uuid.uuid4()
        await db.execute(
            INSERT_CRASH_PAYLOAD, project_id, profile_id, f"c{n}", T, json.dumps(payload)
        )
        assert tuple(await db.fetchrow(STORED_FIELDS, project_id, profile_id)) == expected
        later = {"name": "Later", "reason": "other", "fatal": not expected[2]}
        await db.execute(
            INSERT_CRASH_PAYLOAD,
            project_id,
            profile_id,
            f"later{n}",
            T + timedelta(hours=1),
            json.dumps(later),
        )
        assert tuple(await db.fetchrow(STORED_FIELDS, project_id, profile_id)) == (
            "Later",
            "other",
            not expected[2],
        )
        await db.execute(DELETE_EVENT, project_id, f"later{n}")
        assert tuple(await db.fetchrow(STORED_FIELDS, project_id, profile_id)) == expected
