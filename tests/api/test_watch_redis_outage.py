"""Live streams across a Redis outage, on a Redis of the test's own (stopped and restarted, empty):
WatchProfile stays open and tells the client what it may have missed (a `dropped` item without a
count), also when Redis drops the watch's connection itself; resuming WatchSegmentChanges from a
cursor the wiped stream no longer holds is CURSOR_EXPIRED (resume from a time), whatever was
appended since."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import structlog
from redis.exceptions import RedisError

from profiles.query.v1 import query_service_pb2 as pb
from profiles.segments.v1 import segments_service_pb2 as seg_pb
from profiles.segments.v1 import segments_service_pb2_grpc as seg_grpc
from services.segments.messages import change_to_bus
from services.segments.model import ChangeCause, MembershipChange, SmartSegment
from shared.bus import Bus
from shared.embedded import EmbeddedRedis
from shared.settings import Settings
from shared.topics import SEGMENT_CHANGES, profile_channel
from tests.conftest import eventually
from tests.support.identity import new_id
from tests.support.query import NOW, Suite, custom_event, round_trip, start_suite
from tests.support.segments import publish
from tests.support.segments_custom import error_details

if TYPE_CHECKING:
    from tests.conftest import StartServices, TestProject

# Far above any answer on a slow machine: a call still waiting then is a hang, not slowness.
DEADLINE_S = 60.0
# What the watch logs once it takes its subscription for lost (services/query/live.py).
WATCH_LOST = "watch_redis_unavailable"


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    """A Redis only this test uses, so it may stop it (the suite's shared one must stay up)."""
    server = EmbeddedRedis(tmp_path / "redis", persist=False)
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


@pytest.fixture
def private_settings(settings_for_test: Settings, private_redis: EmbeddedRedis) -> Settings:
    return settings_for_test.with_changes(
        redis_url=private_redis.url, redis_prefix=f"test-{uuid.uuid4().hex[:12]}"
    )


@pytest.fixture
async def private_bus(private_settings: Settings) -> AsyncIterator[Bus]:
    bus = Bus.from_url(private_settings.redis_url, private_settings.redis_prefix)
    yield bus
    await bus.aclose()


async def next_item(call: Any) -> pb.WatchProfileResponse:
    async with asyncio.timeout(20):
        item = await call.read()
    assert item is not grpc.aio.EOF
    round_trip(item)
    return item  # type: ignore[no-any-return]


async def subscribed(bus: Bus, suite: Suite, profile_id: str) -> bool:
    key = bus.channel_key(profile_channel(suite.project.project_id, profile_id))
    try:
        ((_, count),) = await bus.redis.pubsub_numsub(key)
    except RedisError:  # Redis is still coming back
        return False
    return int(count) == 1


async def logged(logs: list[dict[str, Any]], event: str) -> bool:
    return any(entry["event"] == event for entry in logs)


async def pubsub_clients(bus: Bus) -> set[str]:
    return {str(c["id"]) for c in await bus.redis.client_list(_type="pubsub")}


async def until_event(call: Any, name: str) -> list[pb.WatchProfileResponse]:
    """The items up to and including the custom event `name`."""
    items = []
    while True:
        item = await next_item(call)
        items.append(item)
        if item.WhichOneof("item") == "event" and item.event.custom.name == name:
            return items


async def test_a_profile_watch_goes_on_through_a_redis_outage_and_says_it_may_have_missed_items(
    start_services: StartServices,
    private_settings: Settings,
    project: TestProject,
    database_url: str,
    private_redis: EmbeddedRedis,
    private_bus: Bus,
) -> None:
    suite = await start_suite(start_services, private_settings, project, database_url)
    watched = new_id()
    await suite.track(custom_event(watched, time=NOW - timedelta(hours=1)))
    profile_id = await suite.identity.profile_of(watched)
    call = suite.query.WatchProfile(
        pb.WatchProfileRequest(profile_id=profile_id), metadata=project.metadata("read")
    )
    try:
        started = await next_item(call)
        assert started.WhichOneof("item") == "started"
        await suite.track(custom_event(watched, name="before", time=NOW - timedelta(minutes=3)))
        before = await until_event(call, "before")
        assert [i.WhichOneof("item") for i in before] == ["event"]

        with structlog.testing.capture_logs() as logs:
            await asyncio.to_thread(private_redis.stop)
            # Committed while Redis is away: its live notice cannot be published.
            await suite.track(custom_event(watched, name="during", time=NOW - timedelta(minutes=2)))
            # Redis stays away until the watch met the outage (its one warning of it).
            await eventually(lambda: logged(logs, WATCH_LOST), within=DEADLINE_S)
            assert not call.done(), "the watch ended during the outage"
        await asyncio.to_thread(private_redis.start)

        # The same stream subscribes again on its own...
        await eventually(lambda: subscribed(private_bus, suite, profile_id), within=30)
        await suite.track(custom_event(watched, name="after", time=NOW - timedelta(minutes=1)))
        items = await until_event(call, "after")
        # ...tells the client that it may have missed items (the profile changed meanwhile),
        # before anything published after the outage, and goes on.
        kinds = [i.WhichOneof("item") for i in items]
        assert "dropped" in kinds, kinds
        gap = items[kinds.index("dropped")]
        assert gap.profile_id == profile_id
        assert gap.dropped.dropped_count == 0  # unknown: the notices never reached the watch
        assert gap.dropped.HasField("first_drop_time")
        # Only "during" may come besides (had ingest published it late), never twice.
        others = [i for i in items if i.WhichOneof("item") != "dropped"]
        assert [i.event.custom.name for i in others] in (["after"], ["during", "after"])
        assert all(i.profile_id == profile_id for i in items)
    finally:
        call.cancel()


async def test_a_profile_watch_says_it_may_have_missed_items_when_redis_drops_its_connection(
    start_services: StartServices,
    private_settings: Settings,
    project: TestProject,
    database_url: str,
    private_bus: Bus,
) -> None:
    """Redis closes a subscriber whose pending output passes its limit, losing that output;
    redis-py then connects and subscribes again on its own, unseen by a plain reader."""
    suite = await start_suite(start_services, private_settings, project, database_url)
    watched = new_id()
    await suite.track(custom_event(watched, time=NOW - timedelta(hours=1)))
    profile_id = await suite.identity.profile_of(watched)
    call = suite.query.WatchProfile(
        pb.WatchProfileRequest(profile_id=profile_id), metadata=project.metadata("read")
    )
    try:
        assert (await next_item(call)).WhichOneof("item") == "started"
        await private_bus.redis.config_set("client-output-buffer-limit", "pubsub 32kb 0 0")
        before = await pubsub_clients(private_bus)
        # One notice of about 120 KB (40 events of 10 attributes of 290 characters).
        big = [
            custom_event(
                watched,
                name="big",
                time=NOW - timedelta(minutes=5, seconds=i),
                **{f"a{n}": "x" * 290 for n in range(10)},
            )
            for i in range(40)
        ]
        assert (await suite.track(*big)).accepted_count == 40

        # The connection was closed, then renewed by redis-py (a new client).
        async def renewed() -> bool:
            return bool(await pubsub_clients(private_bus) - before) and await subscribed(
                private_bus, suite, profile_id
            )

        await eventually(renewed, within=30)
        await suite.track(custom_event(watched, name="after", time=NOW - timedelta(minutes=1)))
        items = await until_event(call, "after")
        assert [i.WhichOneof("item") for i in items] == ["dropped", "event"]
        assert items[0].dropped.dropped_count == 0
        assert items[0].profile_id == profile_id
    finally:
        call.cancel()


async def append_change(bus: Bus, project_id: object) -> str:
    """Appends a change of the project to the change stream, as the outbox relay does; returns
    its cursor (entry ID)."""
    change = MembershipChange(True, datetime.now(UTC), ChangeCause.EVENT, segment=SmartSegment.NEW)
    return await publish(
        bus, SEGMENT_CHANGES, project_id, change_to_bus(project_id, uuid.uuid4(), change)
    )


async def watch_error(stub: seg_grpc.SegmentsServiceStub, request: Any, metadata: Any) -> Any:
    call = stub.WatchSegmentChanges(request, metadata=metadata, timeout=DEADLINE_S)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    return caught.value


async def test_resuming_segment_changes_after_redis_lost_its_data_is_cursor_expired(
    start_services: StartServices,
    private_settings: Settings,
    project: TestProject,
    private_redis: EmbeddedRedis,
    private_bus: Bus,
) -> None:
    handle = (await start_services("segments", settings=private_settings))["segments"]
    stub = seg_grpc.SegmentsServiceStub(handle.channel)
    read = project.metadata("read")
    await append_change(private_bus, project.project_id)
    cursor = await append_change(private_bus, project.project_id)
    key = private_bus.stream_key(SEGMENT_CHANGES.name)
    ((_, fields),) = await private_bus.redis.xrange(key, cursor, cursor)
    # The watcher received the change before Redis went away.
    since = seg_pb.WatchSegmentChangesRequest()
    since.start_time.FromDatetime(datetime.now(UTC) - timedelta(minutes=1))
    call = stub.WatchSegmentChanges(since, metadata=read, timeout=DEADLINE_S)
    try:
        received: list[str] = []
        async with asyncio.timeout(20):
            async for response in call:
                received.extend(c.cursor for c in response.changes)
                if cursor in received:
                    break
    finally:
        call.cancel()

    await asyncio.to_thread(private_redis.stop)
    await asyncio.to_thread(private_redis.start)  # empty: it keeps nothing

    def expired(error: Any) -> bool:
        return error.code() == grpc.StatusCode.FAILED_PRECONDITION and error_details(error) == (
            "CURSOR_EXPIRED",
            [],
        )

    resume = seg_pb.WatchSegmentChangesRequest(start_after=cursor)
    # At once, while the stream is empty...
    error = await watch_error(stub, resume, read)
    assert expired(error), (error.code(), error.details(), error_details(error))
    # ...as once a newer change exists (the same answer whatever the timing).
    newer = await append_change(private_bus, project.project_id)
    error = await watch_error(stub, resume, read)
    assert expired(error), (error.code(), error.details(), error_details(error))

    # A stream that came back holding changes around the cursor but not the cursor itself (a
    # replica behind the lost primary took over): the changes between were lost with it.
    millis = int(cursor.split("-")[0])
    older = f"{millis - 1}-0"
    await private_bus.redis.delete(key)
    await private_bus.redis.xadd(key, fields, id=older)
    newer = await append_change(private_bus, project.project_id)
    error = await watch_error(stub, resume, read)
    assert expired(error), (error.code(), error.details(), error_details(error))

    # A cursor the stream holds still resumes after it.
    resumed = stub.WatchSegmentChanges(
        seg_pb.WatchSegmentChangesRequest(start_after=older), metadata=read, timeout=DEADLINE_S
    )
    try:
        response = await resumed.read()
        assert isinstance(response, seg_pb.WatchSegmentChangesResponse)
        assert [c.cursor for c in response.changes] == [newer]
    finally:
        resumed.cancel()
