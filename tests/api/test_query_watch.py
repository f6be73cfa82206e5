"""WatchProfile: live items from pub/sub, following a merge, a slow reader's dropped notice, a
client going away, and errors."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import pytest
from redis.asyncio import RedisCluster

from profiles.common.v1 import bus_pb2, types_pb2
from profiles.query.v1 import query_service_pb2 as pb
from shared.bus import Bus
from shared.redis_client import pubsub
from shared.topics import profile_channel
from tests.conftest import eventually
from tests.support.identity import error_info, new_id, violations
from tests.support.query import (
    NOW,
    Suite,
    attribute_event,
    custom_event,
    op,
    round_trip,
    stamp,
    start_suite,
)


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


@pytest.fixture
async def bus(redis_url: str, redis_prefix: str) -> AsyncIterator[Bus]:
    bus = Bus.from_url(redis_url, redis_prefix)
    yield bus
    await bus.aclose()


async def next_item(call: grpc.aio.UnaryStreamCall) -> pb.WatchProfileResponse:  # type: ignore[type-arg]
    async with asyncio.timeout(10):
        item = await call.read()
    assert item is not grpc.aio.EOF
    round_trip(item)
    return item  # type: ignore[no-any-return]


async def subscribers(bus: Bus, project_id: object, profile_id: str) -> int:
    key = bus.channel_key(profile_channel(project_id, profile_id))
    if isinstance(bus.redis, RedisCluster):
        # Each node counts its own subscribers: ask all of them (redis-py adds the counts up).
        ((_, count),) = await bus.redis.pubsub_numsub(key, target_nodes=RedisCluster.ALL_NODES)
    else:
        ((_, count),) = await bus.redis.pubsub_numsub(key)
    return int(count)


async def test_the_feed_shows_new_events_and_attribute_changes_and_follows_a_merge(
    suite: Suite, bus: Bus
) -> None:
    watched, other = new_id(), new_id()
    await suite.track(custom_event(watched, time=NOW - timedelta(hours=1)))
    await suite.identity.identify(other, "zed")
    profile_id = await suite.identity.profile_of(watched)
    survivor = await suite.identity.profile_of(other)
    call = suite.query.WatchProfile(
        pb.WatchProfileRequest(profile_id=profile_id), metadata=suite.project.metadata("read")
    )
    started = await next_item(call)
    assert started.WhichOneof("item") == "started"
    view = (await suite.get(profile_id=profile_id)).profile
    assert started.started.version == view.version

    await suite.track(
        custom_event(watched, name="open", time=NOW - timedelta(minutes=2)),
        attribute_event(watched, [op("set", "plan", "pro")], time=NOW - timedelta(minutes=1)),
    )
    items = [await next_item(call) for _ in range(3)]
    assert [i.WhichOneof("item") for i in items] == ["event", "event", "attribute_change"]
    assert items[0].event.custom.name == "open"
    assert items[2].attribute_change.name == "plan"
    assert items[2].attribute_change.value.string_value == "pro"
    assert all(i.profile_id == profile_id and i.version > started.version for i in items)

    merged = await suite.identity.identify(watched, "zed")
    assert merged.profile_id == survivor
    # Identity does not publish live notices yet: announce the merge as its contract says.
    notice = bus_pb2.ProfileChanged(
        project_id=str(suite.project.project_id),
        profile_id=profile_id,
        kinds=[bus_pb2.PROFILE_CHANGE_KIND_MERGED_AWAY],
        merge=bus_pb2.ProfileMerged(
            project_id=str(suite.project.project_id),
            change_id=str(uuid.uuid4()),
            cause=types_pb2.IDENTITY_CHANGE_CAUSE_IDENTIFY,
            source_profile_id=profile_id,
            target_profile_id=survivor,
            installation_ids=[watched],
        ),
    )
    await bus.notify(profile_channel(suite.project.project_id, profile_id), notice)
    change = await next_item(call)
    assert change.WhichOneof("item") == "identity_change"
    assert change.profile_id == survivor
    assert change.identity_change.target_profile_id == survivor

    await eventually(lambda: _subscribed(bus, suite, survivor))
    await suite.track(custom_event(other, name="after", time=NOW))
    after = await next_item(call)
    assert after.profile_id == survivor
    assert after.event.custom.name == "after"

    call.cancel()
    await eventually(lambda: _unsubscribed(bus, suite, survivor))


async def _subscribed(bus: Bus, suite: Suite, profile_id: str) -> bool:
    return await subscribers(bus, suite.project.project_id, profile_id) == 1


async def _unsubscribed(bus: Bus, suite: Suite, profile_id: str) -> bool:
    return await subscribers(bus, suite.project.project_id, profile_id) == 0


async def test_a_slow_reader_is_told_how_many_items_it_lost(suite: Suite, bus: Bus) -> None:
    inst = new_id()
    # The tracked event's own live notice is published by ingest after its commit, and could
    # reach the watch opened below, one item more than the bulk (seen under load): heard here
    # first, so it is out of the way.
    listener = await pubsub(bus.redis)
    await listener.psubscribe(bus.channel_key(profile_channel(suite.project.project_id, "*")))
    await suite.track(custom_event(inst, time=NOW - timedelta(hours=1)))
    async with asyncio.timeout(30):
        while await listener.get_message(ignore_subscribe_messages=True, timeout=1.0) is None:
            pass
    await listener.aclose()
    profile_id = await suite.identity.profile_of(inst)
    call = suite.query.WatchProfile(
        pb.WatchProfileRequest(profile_id=profile_id), metadata=suite.project.metadata("read")
    )
    await next_item(call)
    channel = profile_channel(suite.project.project_id, profile_id)
    published = 3000
    for n in range(published):
        event = bus_pb2.IngestedEvent(
            event_id=f"e{n}",
            installation_id=inst,
            profile_id=profile_id,
            platform=types_pb2.PLATFORM_IOS,
            kind=types_pb2.EVENT_KIND_CUSTOM,
            event_time=stamp(NOW),
            receive_time=stamp(NOW),
        )
        event.custom.name = "bulk"
        event.custom.label = "x" * 200
        for a in range(10):
            event.custom.attributes[f"a{a}"].string_value = "y" * 200
        await bus.notify(
            channel,
            bus_pb2.ProfileChanged(
                project_id=str(suite.project.project_id),
                profile_id=profile_id,
                kinds=[bus_pb2.PROFILE_CHANGE_KIND_EVENTS],
                profile_version=n + 10,
                events=[event],
            ),
        )
    delivered = dropped = notices = 0
    seen: list[str] = []
    while delivered + dropped < published:
        item = await next_item(call)
        if item.WhichOneof("item") == "dropped":
            notices += 1
            dropped += item.dropped.dropped_count
            assert item.profile_id == profile_id
        else:
            delivered += 1
            seen.append(item.event.event_id)
    assert delivered + dropped == published
    assert notices >= 1
    assert dropped > 0
    # What is delivered is in order, and never repeated.
    numbers = [int(e[1:]) for e in seen]
    assert numbers == sorted(set(numbers))
    call.cancel()


async def test_watching_an_unknown_or_malformed_profile_fails(suite: Suite) -> None:
    call = suite.query.WatchProfile(
        pb.WatchProfileRequest(profile_id=str(uuid.uuid4())),
        metadata=suite.project.metadata("read"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "PROFILE_NOT_FOUND"
    call = suite.query.WatchProfile(
        pb.WatchProfileRequest(profile_id="nope"), metadata=suite.project.metadata("read")
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert violations(caught.value) == ["profile_id"]


async def test_watches_up_to_the_stream_cap_all_open(
    start_services, settings_for_test, project, database_url
) -> None:  # type: ignore[no-untyped-def]
    """Each watch holds a Redis connection: 110 of them (under a cap of 120) all start, where
    redis-py's default pool of 100 connections failed the last ones with INTERNAL."""
    settings = settings_for_test.with_changes(max_streams=120)
    suite = await start_suite(start_services, settings, project, database_url)
    watched = new_id()
    await suite.track(custom_event(watched, time=NOW - timedelta(hours=1)))
    profile_id = await suite.identity.profile_of(watched)
    calls = [
        suite.query.WatchProfile(
            pb.WatchProfileRequest(profile_id=profile_id), metadata=suite.project.metadata("read")
        )
        for _ in range(110)
    ]
    try:
        firsts = await asyncio.gather(*(next_item(call) for call in calls))
        assert {item.WhichOneof("item") for item in firsts} == {"started"}
    finally:
        for call in calls:
            call.cancel()
