"""Ingest's SQL names event kinds (ingest_read_event_kind) as the proto enum does."""

from __future__ import annotations

import asyncpg

from profiles.common.v1 import types_pb2

PREFIX = "EVENT_KIND_"


async def test_every_event_kind_has_its_proto_number_by_name(db: asyncpg.Pool) -> None:
    for value in types_pb2.EventKind.DESCRIPTOR.values:
        name = value.name.removeprefix(PREFIX).lower()
        number = await db.fetchval("SELECT ingest_read_event_kind($1)", name)
        assert number == value.number, value.name


async def test_an_unknown_kind_name_is_null(db: asyncpg.Pool) -> None:
    assert await db.fetchval("SELECT ingest_read_event_kind('crashes')") is None


async def test_a_named_kind_is_folded_to_its_number_when_planned(db: asyncpg.Pool) -> None:
    rows = await db.fetch(
        "EXPLAIN (VERBOSE) SELECT count(*) FROM events WHERE kind = ingest_read_event_kind('crash')"
    )
    plan = "\n".join(r[0] for r in rows)
    # Folded to the constant: the planner proves the partial index's `WHERE kind = 8`. events is
    # partitioned (0024): the scans are of each partition's copy of events_crashes_by_profile.
    assert "ingest_read_event_kind" not in plan
    copies = await db.fetch(
        "SELECT inhrelid::regclass::text FROM pg_inherits"
        " WHERE inhparent = 'events_crashes_by_profile'::regclass"
    )
    assert copies
    assert all(f" {r[0]} on " in plan for r in copies)
