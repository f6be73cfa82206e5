"""What ingest publishes: live ProfileChanged notices after commit, and the events stream,
which catches up after a Redis outage while TrackEvents keeps succeeding."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from redis.asyncio import Redis

from profiles.common.v1 import bus_pb2, types_pb2
from profiles.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from shared.bus import Bus
from shared.clock import FrozenClock
from shared.embedded import EmbeddedRedis
from shared.topics import profile_channel
from tests.conftest import eventually
from tests.support.ingest import NOW, Ingest, attribute_event, custom_event, op
from tests.support.ingest_running import running_ingest, stream_events

if TYPE_CHECKING:
    from shared.settings import Settings
    from tests.conftest import TestProject


@asynccontextmanager
async def start_suite(
    start_services: Any, settings: Settings, project: TestProject, database_url: str
) -> AsyncIterator[Ingest]:
    handles = await start_services("identity", settings=settings)
    with_identity = settings.with_changes(
        addresses={**settings.addresses, "identity": handles["identity"].address}
    )
    async with running_ingest(with_identity, FrozenClock(NOW)) as channel:
        yield Ingest(
            pb_grpc.IngestServiceStub(channel),
            project.metadata("sdk"),
            project.metadata("admin"),
            database_url,
        )


@pytest.fixture
async def ingest(
    start_services: Any, settings_for_test: Settings, project: TestProject, database_url: str
) -> AsyncIterator[Ingest]:
    async with start_suite(start_services, settings_for_test, project, database_url) as ingest:
        yield ingest


async def test_each_touched_profile_gets_a_live_notice_after_commit(
    ingest: Ingest, project: TestProject, redis_url: str, redis_prefix: str
) -> None:
    first = await ingest.track(custom_event("i1"), custom_event("i2"))
    profile_1, profile_2 = (r.profile_id for r in first.results)
    client = Redis.from_url(redis_url)
    pubsub = client.pubsub()
    bus = Bus(client, redis_prefix)
    try:
        await pubsub.subscribe(
            *(
                bus.channel_key(profile_channel(project.project_id, p))
                for p in (profile_1, profile_2)
            )
        )
        await ingest.track(
            custom_event("i1", event_id="c1"),
            attribute_event("i1", [op("set", "plan", "pro")], event_id="a1"),
            custom_event("i2", event_id="c2"),
        )
        received: list[bus_pb2.ProfileChanged] = []

        async def two_notices() -> bool:
            raw = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if raw is not None and raw["type"] == "message":
                notice = bus_pb2.ProfileChanged.FromString(raw["data"])
                # Notices of the first batch may still arrive: they are published after commit.
                if {e.event_id for e in notice.events} & {"c1", "a1", "c2"}:
                    received.append(notice)
            return len(received) == 2

        await eventually(two_notices)
    finally:
        await pubsub.aclose()
        await client.aclose()
    by_profile = {n.profile_id: n for n in received}
    one, two = by_profile[profile_1], by_profile[profile_2]
    assert list(one.kinds) == [
        bus_pb2.PROFILE_CHANGE_KIND_EVENTS,
        bus_pb2.PROFILE_CHANGE_KIND_ATTRIBUTES,
    ]
    assert [e.event_id for e in one.events] == ["c1", "a1"]
    assert list(two.kinds) == [bus_pb2.PROFILE_CHANGE_KIND_EVENTS]
    assert [e.event_id for e in two.events] == ["c2"]
    versions = await ingest.fetch("SELECT profile_id::text, version FROM profiles")
    assert one.profile_version == {r["profile_id"]: r["version"] for r in versions}[profile_1]
    assert one.project_id == str(project.project_id)


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    """A Redis only this test uses, so it may stop and start it (same socket, no data kept)."""
    server = EmbeddedRedis(tmp_path / "redis", persist=False)
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def test_track_events_succeeds_while_redis_is_down_and_everything_is_published_later(
    start_services: Any,
    settings_for_test: Settings,
    project: TestProject,
    database_url: str,
    private_redis: EmbeddedRedis,
) -> None:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    settings = settings_for_test.with_changes(redis_url=private_redis.url, redis_prefix=prefix)
    async with start_suite(start_services, settings, project, database_url) as ingest:
        before = await ingest.track(custom_event("i1", event_id="before"))
        assert before.accepted_count == 1
        await asyncio.to_thread(private_redis.stop)
        sent = []  # "before" went to the Redis that lost everything
        for batch in range(5):
            ids = [f"down-{batch}-{i}" for i in range(20)]
            reply = await ingest.track(
                *[custom_event(f"i{i % 4}", event_id=event_id) for i, event_id in enumerate(ids)],
                attribute_event("i1", [op("increment", "visits", 1)], event_id=f"attr-{batch}"),
            )
            assert reply.accepted_count == 21
            sent += [*ids, f"attr-{batch}"]
        stored = await ingest.fetch("SELECT count(*) AS n FROM events")
        assert stored[0]["n"] == len(sent) + 1
        await asyncio.to_thread(private_redis.start)

        async def all_published() -> bool:
            events = await stream_events(private_redis.url, prefix)
            return {e.event_id for e in events} >= set(sent)

        await eventually(all_published, within=30.0)
        published = await stream_events(private_redis.url, prefix)
        assert {e.event_id: e.kind for e in published}["attr-0"] == (
            types_pb2.EVENT_KIND_ATTRIBUTE_CHANGE
        )
