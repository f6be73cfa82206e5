"""The bus, the outbox relay and live notices on a real three-master Redis Cluster.

The bus and outbox tests of test_bus.py and test_outbox.py run here again, unchanged, with their
`bus` fixture pointed at the cluster (a `redis+cluster://` URL): delivery, consumer groups, claims
after a consumer crash, dead letters in one MULTI, several relays. What only a cluster can get
wrong is tested on its own below: a stream and its dead-letter stream in one slot, topics spread
over the nodes, notices heard by a subscriber on another node than the publisher's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import pytest
from redis.asyncio import RedisCluster
from redis.crc import key_slot

from profiles.common.v1 import bus_pb2
from shared.bus import Bus, Notice
from shared.notices import LiveNotices, NoticeWorker
from shared.redis_client import cluster_seeds, connect
from shared.topics import TOPICS, profile_channel
from tests.integration import test_bus, test_outbox
from tests.integration.test_bus import group as group
from tests.integration.test_outbox import pool as pool

# Collected again in this module, where `bus` below (the cluster) replaces their own fixture.
REUSED = {
    test_bus: (
        "test_published_messages_reach_the_handler_with_project_and_entry_id",
        "test_failed_handler_leaves_the_entry_pending_until_a_claim_retries_it",
        "test_entries_of_a_crashed_consumer_are_claimed_by_another",
        "test_restarted_consumer_handles_its_own_pending_entries_first",
        "test_two_consumers_in_one_group_share_the_stream_without_double_handling",
        "test_entry_is_dead_lettered_after_max_deliveries",
        "test_poison_entries_are_dead_lettered_without_blocking_the_group",
        "test_consumer_reports_lag_and_pending_entries",
        "test_notices_reach_listeners",
    ),
    test_outbox: (
        "test_committed_messages_are_published_in_order_and_deleted",
        "test_two_relays_publish_every_row_exactly_once",
        "test_rows_of_an_unknown_topic_or_kind_are_dead_lettered_not_left_blocking",
    ),
}
for module, names in REUSED.items():
    for name in names:
        globals()[name] = getattr(module, name)


@pytest.fixture
async def bus(redis_cluster_url: str, cluster_prefix: str) -> AsyncIterator[Bus]:
    bus = Bus.from_url(redis_cluster_url, cluster_prefix)
    yield bus
    await bus.aclose()


async def test_a_cluster_url_gives_a_cluster_client_seeded_with_every_node(
    redis_cluster_url: str,
) -> None:
    client = connect(redis_cluster_url)
    try:
        assert isinstance(client, RedisCluster)
        await client.ping()
        _, seeds = cluster_seeds(redis_cluster_url)
        known = {(node.host, node.port) for node in client.get_primaries()}
        assert known == set(seeds)
        assert len(known) == 3
    finally:
        await client.aclose()


def test_a_stream_and_its_dead_letter_stream_share_a_slot_and_topics_spread() -> None:
    bus = Bus(None, "profiles")  # type: ignore[arg-type]  # key names only, no client
    slots = {}
    for name in TOPICS:
        slots[name] = key_slot(bus.stream_key(name).encode())
        assert key_slot(bus.dead_key(name).encode()) == slots[name]
    # The prefix is outside the hash tag: every deployment spreads its topics the same way.
    assert key_slot(Bus(None, "other").stream_key("events").encode()) == slots["events"]  # type: ignore[arg-type]
    assert len(set(slots.values())) == len(TOPICS)


async def test_topics_live_on_different_nodes_and_their_entries_are_readable(
    bus: Bus,
) -> None:
    assert isinstance(bus.redis, RedisCluster)
    for topic in TOPICS.values():
        await bus.redis.xadd(bus.stream_key(topic.name), {"probe": "1"})
    owners = {
        bus.redis.get_node_from_key(bus.stream_key(name)).name  # type: ignore[union-attr]
        for name in TOPICS
    }
    assert len(owners) > 1
    for name in TOPICS:
        assert await bus.redis.xlen(bus.stream_key(name)) == 1


async def test_live_notices_of_many_profiles_reach_a_subscriber_on_any_node(
    bus: Bus, eventually: Any
) -> None:
    # Profiles whose channels hash to every node: the worker's pipeline publishes each through
    # its own slot's node, and a cluster forwards a plain PUBLISH to the subscriber's node.
    project = str(uuid4())
    profiles = [str(uuid4()) for _ in range(30)]
    assert isinstance(bus.redis, RedisCluster)
    await bus.redis.initialize()  # loads the slot map, for get_node_from_key
    nodes = {
        bus.redis.get_node_from_key(bus.channel_key(profile_channel(project, p))).name  # type: ignore[union-attr]
        for p in profiles
    }
    assert len(nodes) == 3
    received: list[Notice] = []

    async def listen() -> None:
        async for notice in bus.listen(profile_channel(project, p) for p in profiles):
            received.append(notice)

    notices = LiveNotices("test")
    worker = NoticeWorker(notices, bus)
    tasks = [asyncio.create_task(listen()), asyncio.create_task(worker.run())]
    try:

        async def all_heard() -> bool:
            heard = {bus_pb2.ProfileChanged.FromString(n.data).profile_id for n in received}
            missing = [p for p in profiles if p not in heard]
            # Until subscribed, notices are lost (pub/sub): offer the missing ones again.
            notices.offer(
                [bus_pb2.ProfileChanged(project_id=project, profile_id=p) for p in missing]
            )
            await asyncio.sleep(0.05)
            return not missing

        await eventually(all_heard)
    finally:
        await worker.stop()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    for notice in received:
        message = bus_pb2.ProfileChanged.FromString(notice.data)
        assert notice.channel == profile_channel(project, message.profile_id)
