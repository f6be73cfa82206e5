"""An erasure is complete even when segments and query never read its ProfileDeleted: they were
stopped while the person was erased, and the bus retention trimmed the message before they came
back. Each sweeps identity's record of erasures on start (0061) and purges what it still kept of
the person, with its ProfileDeleted handler's own code; someone else's rows stay as they were."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any
from uuid import UUID

import asyncpg
import pytest
from prometheus_client import REGISTRY

from profiles.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.query.v1 import query_service_pb2_grpc as query_grpc
from profiles.segments.v1 import filters_pb2 as f
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from shared.bus import Bus
from shared.clock import FrozenClock
from shared.topics import EVENTS, IDENTITY, TOPICS
from tests.conftest import eventually
from tests.support.identity import Identity, new_id
from tests.support.query import (
    NOW,
    Suite,
    attribute_event,
    direct_overview,
    installation_update,
    op,
    overview_figures,
    session_start,
)
from tests.support.segments_custom import attribute, set_attributes

T = NOW - timedelta(hours=3)

# What segments and query keep per profile, and per installation (query).
PROFILE_ROWS = {
    "segment_profiles": "erase_time IS NULL",
    "segment_states": "true",
    "segment_sessions": "true",
    "custom_segment_members": "true",
    "query_profiles": "true",
}


async def rows_of(db: asyncpg.Pool, project_id: UUID, profile_ids: list[str]) -> dict[str, int]:
    """Rows of the profiles in segments' and query's tables (segment_profiles: not marked
    erased), by table."""
    return {
        table: await db.fetchval(
            f"SELECT count(*) FROM {table}"
            f" WHERE project_id = $1 AND profile_id = ANY($2::uuid[]) AND {where}",
            project_id,
            [UUID(p) for p in profile_ids],
        )
        for table, where in PROFILE_ROWS.items()
    }


async def installation_rows(db: asyncpg.Pool, project_id: UUID, keys: list[str]) -> int:
    return await db.fetchval(
        "SELECT count(*) FROM query_installations"
        " WHERE project_id = $1 AND installation_key = ANY($2::text[])",
        project_id,
        keys,
    )


def purged(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def stack(
    start_services: Any, settings_for_test: Any, project: Any, database_url: str
) -> dict[str, Any]:
    """Identity, ingest, segments and query, on one clock and one bus."""
    clock = FrozenClock(NOW)
    identity = await start_services("identity", settings=settings_for_test)
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": identity["identity"].address}
    )
    ingest = await start_services("ingest", settings=settings, clock=clock)
    readers = await start_services("segments", "query", settings=settings, clock=clock)
    suite = Suite(
        query=query_grpc.QueryServiceStub(readers["query"].channel),
        ingest=ingest_grpc.IngestServiceStub(ingest["ingest"].channel),
        identity=Identity(identity["identity"].channel, project),
        project=project,
        database_url=database_url,
        clock=clock,
        redis_url=settings.redis_url,
        redis_prefix=settings.redis_prefix,
    )
    return {"suite": suite, "settings": settings, "readers": readers}


async def test_segments_and_query_purge_an_erased_person_whose_profile_deleted_they_missed(
    stack: dict[str, Any], start_services: Any, db: asyncpg.Pool, project: Any
) -> None:
    suite: Suite = stack["suite"]
    readers = stack["readers"]
    segments = segments_grpc.SegmentsServiceStub(readers["segments"].channel)
    admin = project.metadata("admin")
    pro = await segments.CreateSegment(
        segments_pb.CreateSegmentRequest(
            display_name="Pro plan", filter=attribute("plan", f.OPERATOR_EQUALS, "pro")
        ),
        metadata=admin,
    )
    # Alice on a phone and a tablet (its anonymous profile merged into hers: a tombstone), Bob
    # on his phone; both on the pro plan, with sessions and emails.
    phone, tablet, bob_phone = new_id(), new_id(), new_id()
    for inst, name in ((phone, "alice"), (tablet, "alice"), (bob_phone, "bob")):
        await suite.track(
            installation_update(inst, T, app_version="1.0", language="fr"),
            session_start(inst, f"s-{inst}", T + timedelta(minutes=1), country="FR"),
            attribute_event(inst, [op("set", "EMAIL", f"{name}@example.com")], time=T),
            set_attributes(inst, T + timedelta(minutes=2), plan="pro"),
        )
    tablet_profile = await suite.identity.profile_of(tablet)
    alice_id = f"alice-{uuid.uuid4().hex[:8]}"
    await suite.identity.identify(phone, alice_id)
    await suite.identity.identify(tablet, alice_id)  # merges the tablet's profile into Alice's
    alice = await suite.identity.profile_of(phone)
    bob = await suite.identity.profile_of(bob_phone)
    assert alice != tablet_profile
    await suite.settle(groups=("query", "segments"))

    async def both_members() -> bool:
        rows = await db.fetchval(
            "SELECT count(*) FROM custom_segment_members WHERE segment_id = $1",
            UUID(pro.segment.segment_id),
        )
        return rows == 2

    await eventually(both_members)
    alice_ids = [alice, tablet_profile]
    kept_before = await rows_of(db, project.project_id, alice_ids)
    assert all(kept_before.values()), kept_before
    bob_before = await rows_of(db, project.project_id, [bob])
    assert all(bob_before.values()), bob_before
    assert await installation_rows(db, project.project_id, [phone, tablet]) == 2

    # Segments and query stop; Alice is erased meanwhile, and the bus retention trims the
    # streams (every entry, ProfileDeleted among them) before they come back.
    for name in ("segments", "query"):
        await readers[name].running.stop(grace=1.0)
    await suite.identity.delete(alice)
    await eventually(lambda: _outbox_empty(db))
    bus = Bus.from_url(suite.redis_url, suite.redis_prefix, retention_ms=1)
    try:
        await bus.trim_expired(TOPICS.values())
        for topic in (EVENTS, IDENTITY):  # segment changes stay a year, as promised
            assert await bus.redis.xlen(bus.stream_key(topic.name)) == 0
    finally:
        await bus.aclose()
    # What the erasure's hooks reach at once is gone; the rest waited for ProfileDeleted.
    left = await rows_of(db, project.project_id, alice_ids)
    assert left["segment_sessions"] == 0
    assert left["query_profiles"] == 1
    assert left["segment_states"]
    assert left["custom_segment_members"]
    segments_before = purged("profiles_segments_erased_profiles_purged_total")
    query_before = purged("profiles_query_erasure_sweep_purged_total", rows="profiles")
    installations_before = purged("profiles_query_erasure_sweep_purged_total", rows="installations")

    back = await start_services("segments", "query", settings=stack["settings"], clock=suite.clock)

    async def alice_gone() -> bool:
        return not any((await rows_of(db, project.project_id, alice_ids)).values()) and not (
            await installation_rows(db, project.project_id, [phone, tablet])
        )

    await eventually(alice_gone)
    # Segments keeps the erased IDs marked erased (so a late message for them is skipped), and
    # nothing else of them; Bob keeps everything.
    marked = await db.fetch(
        "SELECT profile_id, erase_time, merged_into, time_zone FROM segment_profiles"
        " WHERE project_id = $1 AND profile_id = ANY($2::uuid[])",
        project.project_id,
        [UUID(p) for p in alice_ids],
    )
    assert len(marked) == 2
    assert all(m["erase_time"] is not None and m["merged_into"] is None for m in marked)
    assert await rows_of(db, project.project_id, [bob]) == bob_before
    assert await installation_rows(db, project.project_id, [bob_phone]) == 1
    assert purged("profiles_segments_erased_profiles_purged_total") - segments_before == 2
    assert purged("profiles_query_erasure_sweep_purged_total", rows="profiles") - query_before == 1
    assert (
        purged("profiles_query_erasure_sweep_purged_total", rows="installations")
        - installations_before
        == 2
    )
    # The custom segment has Bob alone, and the overview's counters equal a direct count of
    # what is stored: Alice's figures left them.
    segment = await segments_grpc.SegmentsServiceStub(back["segments"].channel).GetSegment(
        segments_pb.GetSegmentRequest(segment_id=pro.segment.segment_id),
        metadata=project.metadata("read"),
    )
    assert segment.segment.size == 1
    suite.query = query_grpc.QueryServiceStub(back["query"].channel)
    reply = await suite.call("GetOverview", query_pb.GetOverviewRequest(top_values=100))
    assert overview_figures(reply.overview) == await direct_overview(suite)
    counts = reply.overview
    assert (counts.identified_profile_count, counts.anonymous_profile_count) == (0, 1)
    assert counts.install_count == 1


async def _outbox_empty(db: asyncpg.Pool) -> bool:
    return await db.fetchval("SELECT count(*) FROM outbox") == 0
