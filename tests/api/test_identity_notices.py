"""Identity's live notices: after Identify, Logout, MergeProfiles and DeleteProfile commit, each
profile involved gets a ProfileChanged on its pub/sub channel (real Redis, real gRPC); with Redis
down the RPCs still succeed and the lost notices are counted."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from profiles.common.v1 import bus_pb2, types_pb2
from profiles.identity.v1 import identity_service_pb2 as pb
from shared.bus import Bus
from shared.embedded import EmbeddedRedis
from shared.topics import profile_channel
from tests.conftest import eventually
from tests.support.identity import Identity, new_id, profile_row

if TYPE_CHECKING:
    from shared.settings import Settings
    from tests.conftest import TestProject

MERGED_IN = bus_pb2.PROFILE_CHANGE_KIND_MERGED_IN
MERGED_AWAY = bus_pb2.PROFILE_CHANGE_KIND_MERGED_AWAY
SPLIT = bus_pb2.PROFILE_CHANGE_KIND_SPLIT


class Notices:
    """Every ProfileChanged of one project, in the order Redis delivered them."""

    def __init__(self, pubsub: Any) -> None:
        self._pubsub = pubsub

    async def take(self, count: int, *, within: float = 10.0) -> list[bus_pb2.ProfileChanged]:
        """The next `count` notices; fails after `within` seconds."""
        received: list[bus_pb2.ProfileChanged] = []
        async with asyncio.timeout(within):
            while len(received) < count:
                raw = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if raw is not None and raw["type"] == "pmessage":
                    received.append(bus_pb2.ProfileChanged.FromString(raw["data"]))
        return received


@asynccontextmanager
async def listening(redis_url: str, prefix: str, project: TestProject) -> AsyncIterator[Notices]:
    """Subscribed (and confirmed by Redis) to every profile channel of the project."""
    client = Redis.from_url(redis_url)
    pubsub = client.pubsub()
    pattern = Bus(client, prefix).channel_key(profile_channel(project.project_id, "*"))
    try:
        await pubsub.psubscribe(pattern)
        async with asyncio.timeout(10):
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == "psubscribe":
                    break
        yield Notices(pubsub)
    finally:
        await pubsub.aclose()
        await client.aclose()


@pytest.fixture
async def notices(
    redis_url: str, redis_prefix: str, project: TestProject
) -> AsyncIterator[Notices]:
    async with listening(redis_url, redis_prefix, project) as notices:
        yield notices


async def version_of(db: asyncpg.Pool, project: TestProject, profile_id: str) -> int:
    return int((await profile_row(db, project, profile_id))["version"])


def check_common(notice: bus_pb2.ProfileChanged, project: TestProject) -> None:
    assert notice.project_id == str(project.project_id)
    assert notice.HasField("change_time")


async def test_identify_of_an_anonymous_profile_announces_it_identified(
    identity: Identity, notices: Notices, project: TestProject, db: asyncpg.Pool
) -> None:
    installation = new_id()
    reply = await identity.identify(installation, "alice")
    assert reply.outcome == pb.IDENTIFY_OUTCOME_IDENTIFIED

    (notice,) = await notices.take(1)
    check_common(notice, project)
    assert notice.profile_id == reply.profile_id
    assert list(notice.kinds) == [bus_pb2.PROFILE_CHANGE_KIND_IDENTIFIED]
    assert notice.profile_version == await version_of(db, project, reply.profile_id)

    # Nothing changes, nothing is announced: the next notice is the Logout's.
    again = await identity.identify(installation, "alice")
    assert again.outcome == pb.IDENTIFY_OUTCOME_ALREADY_IDENTIFIED
    await identity.logout(installation)
    after = await notices.take(2)
    assert [list(n.kinds) for n in after] == [[SPLIT], [SPLIT]]


async def test_identify_onto_a_known_custom_id_announces_the_merge_to_both_profiles(
    identity: Identity, notices: Notices, project: TestProject, db: asyncpg.Pool
) -> None:
    holder_installation, installation = new_id(), new_id()
    await identity.identify(holder_installation, "bob")
    await notices.take(1)  # its IDENTIFIED
    source = await identity.profile_of(installation)
    reply = await identity.identify(installation, "bob")
    assert reply.outcome == pb.IDENTIFY_OUTCOME_MERGED
    target = reply.profile_id

    merged_in, merged_away = await notices.take(2)
    # The target first: a watcher of the source follows it only after MERGED_AWAY.
    assert (merged_in.profile_id, list(merged_in.kinds)) == (target, [MERGED_IN])
    assert (merged_away.profile_id, list(merged_away.kinds)) == (source, [MERGED_AWAY])
    for notice in (merged_in, merged_away):
        check_common(notice, project)
        assert notice.merge.source_profile_id == source
        assert notice.merge.target_profile_id == target
        assert notice.merge.cause == types_pb2.IDENTITY_CHANGE_CAUSE_IDENTIFY
        assert notice.merge.change_id == reply.change_id
        assert list(notice.merge.installation_ids) == [installation]
    assert merged_in.profile_version == await version_of(db, project, target)
    assert merged_away.profile_version == await version_of(db, project, source)


async def test_identify_with_another_custom_id_announces_the_move_to_both_profiles(
    identity: Identity, notices: Notices, project: TestProject, db: asyncpg.Pool
) -> None:
    installation = new_id()
    first = await identity.identify(installation, "carol")
    await notices.take(1)
    reply = await identity.identify(installation, "dave")
    assert reply.outcome == pb.IDENTIFY_OUTCOME_MOVED

    left, joined = await notices.take(2)
    assert [left.profile_id, joined.profile_id] == [first.profile_id, reply.profile_id]
    for notice in (left, joined):
        check_common(notice, project)
        assert list(notice.kinds) == [SPLIT]
        assert notice.split.cause == types_pb2.IDENTITY_CHANGE_CAUSE_IDENTIFY_SWITCH
        assert notice.split.old_profile_id == first.profile_id
        assert notice.split.new_profile_id == reply.profile_id
        assert notice.split.installation_id == installation
        assert notice.split.new_profile_created
        assert notice.profile_version == await version_of(db, project, notice.profile_id)


async def test_logout_announces_the_split_to_the_identified_and_the_new_profile(
    identity: Identity, notices: Notices, project: TestProject, db: asyncpg.Pool
) -> None:
    installation = new_id()
    identified = (await identity.identify(installation, "erin")).profile_id
    await notices.take(1)
    reply = await identity.logout(installation)
    assert reply.outcome == pb.LOGOUT_OUTCOME_NEW_ANONYMOUS_PROFILE

    left, joined = await notices.take(2)
    assert [left.profile_id, joined.profile_id] == [identified, reply.profile_id]
    for notice in (left, joined):
        check_common(notice, project)
        assert list(notice.kinds) == [SPLIT]
        assert notice.split.cause == types_pb2.IDENTITY_CHANGE_CAUSE_LOGOUT
        assert notice.split.old_profile_id == identified
        assert notice.split.new_profile_id == reply.profile_id
        assert notice.profile_version == await version_of(db, project, notice.profile_id)


async def test_an_operator_merge_announces_merged_in_and_merged_away(
    identity: Identity, notices: Notices, project: TestProject, db: asyncpg.Pool
) -> None:
    source = await identity.profile_of_custom_id("frank")
    target = await identity.profile_of(new_id())
    reply = await identity.merge(source, target, request_id=str(uuid.uuid4()))
    assert not reply.already_merged

    merged_in, merged_away = await notices.take(2)
    assert (merged_in.profile_id, list(merged_in.kinds)) == (target, [MERGED_IN])
    assert (merged_away.profile_id, list(merged_away.kinds)) == (source, [MERGED_AWAY])
    for notice in (merged_in, merged_away):
        check_common(notice, project)
        assert notice.merge.cause == types_pb2.IDENTITY_CHANGE_CAUSE_OPERATOR_MERGE
        assert notice.merge.source_profile_id == source
        assert notice.merge.target_profile_id == target
        assert notice.profile_version == await version_of(db, project, notice.profile_id)

    # A replayed request changes nothing and announces nothing: next comes the deletion's.
    replayed = str(uuid.uuid4())
    assert (await identity.merge(source, target, request_id=replayed)).already_merged
    assert (await identity.merge(source, target, request_id=replayed)).already_merged
    await identity.delete(target)
    (deleted,) = await notices.take(1)
    assert deleted.profile_id == target


async def test_deleting_a_profile_announces_it_erased(
    identity: Identity, notices: Notices, project: TestProject
) -> None:
    profile_id = await identity.profile_of_custom_id("grace")
    await identity.delete(profile_id)

    (notice,) = await notices.take(1)
    check_common(notice, project)
    assert notice.profile_id == profile_id
    assert list(notice.kinds) == [bus_pb2.PROFILE_CHANGE_KIND_DELETED]
    assert notice.profile_version == 0


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    """A Redis only this test uses, so it may stop and start it (same socket, no data kept)."""
    server = EmbeddedRedis(tmp_path / "redis", persist=False)
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


def dropped(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "profiles_live_notices_dropped_total", {"service": "identity", "reason": reason}
    )
    return value or 0.0


async def test_identify_succeeds_while_redis_is_down_and_notices_resume_after(
    start_services: Any,
    settings_for_test: Settings,
    project: TestProject,
    private_redis: EmbeddedRedis,
) -> None:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    settings = settings_for_test.with_changes(redis_url=private_redis.url, redis_prefix=prefix)
    channel: grpc.aio.Channel = (await start_services("identity", settings=settings))[
        "identity"
    ].channel
    identity = Identity(channel, project)
    await identity.identify(new_id(), "before")
    await asyncio.to_thread(private_redis.stop)
    lost_before = dropped("redis_unavailable")

    for n in range(5):
        installation = new_id()
        async with asyncio.timeout(10):  # well below the RPC's own deadline
            reply = await identity.identify(installation, f"down-{n}")
        assert reply.outcome == pb.IDENTIFY_OUTCOME_IDENTIFIED
        logout = await identity.logout(installation)
        assert logout.outcome == pb.LOGOUT_OUTCOME_NEW_ANONYMOUS_PROFILE

    async def counted() -> bool:
        return dropped("redis_unavailable") > lost_before

    await eventually(counted, within=30.0)

    await asyncio.to_thread(private_redis.start)
    async with listening(private_redis.url, prefix, project) as notices:
        # The worker may still be backing off, or publishing what was queued while Redis was
        # down: announce until a notice of a change made now gets through.
        announced: set[str] = set()

        async def one_arrives() -> bool:
            reply = await identity.identify(new_id(), f"after-{uuid.uuid4().hex[:8]}")
            announced.add(reply.profile_id)
            try:
                while True:  # what has arrived, until a pause
                    (notice,) = await notices.take(1, within=0.5)
                    if notice.profile_id in announced:
                        return True
            except TimeoutError:
                return False

        await eventually(one_arrives, within=30.0)
