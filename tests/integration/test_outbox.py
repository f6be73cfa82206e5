"""The transactional outbox on real PostgreSQL and Redis: rollback, relay, outage, many relays."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import asyncpg
import pytest
from prometheus_client import REGISTRY

from profiles.diagnostics.v1.diagnostics_service_pb2 import EchoRequest, EchoResponse
from shared.bus import Bus, Topic
from shared.db import create_pool
from shared.outbox import OutboxItem, OutboxRelay, enqueue, enqueue_many

REQUESTS = Topic("requests", (EchoRequest,))
RESPONSES = Topic("responses", (EchoResponse,))
TOPICS = {t.name: t for t in (REQUESTS, RESPONSES)}
PROJECT = uuid4()

FAST = {"poll_interval_s": 0.05, "backoff_initial_s": 0.02, "backoff_max_s": 0.2}


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, max_size=6)
    yield pool
    await pool.close()


@pytest.fixture
async def bus(redis_url: str, redis_prefix: str) -> AsyncIterator[Bus]:
    bus = Bus.from_url(redis_url, redis_prefix)
    yield bus
    await bus.aclose()


@contextlib.asynccontextmanager
async def running(*relays: OutboxRelay) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(r.run()) for r in relays]
    try:
        yield
    finally:
        for relay in relays:
            relay.stop()
        async with asyncio.timeout(10):
            await asyncio.gather(*tasks)


async def commit_requests(pool: asyncpg.Pool, numbers: range) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await enqueue_many(
            conn,
            [OutboxItem(PROJECT, REQUESTS, EchoRequest(payload=str(n).encode())) for n in numbers],
        )


async def backlog(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM outbox"))


async def outbox_is_empty(pool: asyncpg.Pool) -> bool:
    return await backlog(pool) == 0


async def stream_length_is(bus: Bus, topic_name: str, length: int) -> bool:
    return int(await bus.redis.xlen(bus.stream_key(topic_name))) == length


async def published_numbers(bus: Bus, topic: Topic = REQUESTS) -> list[int]:
    entries = await bus.redis.xrange(bus.stream_key(topic.name))
    return [int(EchoRequest.FromString(f[b"data"]).payload) for _, f in entries]


async def test_committed_messages_are_published_in_order_and_deleted(
    pool: asyncpg.Pool, bus: Bus, eventually: Any
) -> None:
    profile_id = uuid4()
    async with pool.acquire() as conn, conn.transaction():
        for n in range(5):
            await enqueue(conn, PROJECT, REQUESTS, EchoRequest(payload=str(n).encode()))
        await enqueue(conn, PROJECT, RESPONSES, EchoResponse(payload=b"r"), profile_id=profile_id)
    before = REGISTRY.get_sample_value("profiles_outbox_published_total", {"topic": "requests"})

    async with running(OutboxRelay(pool, bus, TOPICS, **FAST)):
        await eventually(lambda: bus.redis.xlen(bus.stream_key("responses")))
        await eventually(lambda: outbox_is_empty(pool))

    assert await published_numbers(bus) == [0, 1, 2, 3, 4]
    [(_, fields)] = await bus.redis.xrange(bus.stream_key("responses"))
    assert fields[b"kind"] == b"profiles.diagnostics.v1.EchoResponse"
    assert fields[b"project"] == str(PROJECT).encode()
    assert int(fields[b"id"]) > 0  # the outbox id
    assert EchoResponse.FromString(fields[b"data"]).payload == b"r"
    after = REGISTRY.get_sample_value("profiles_outbox_published_total", {"topic": "requests"})
    assert after - (before or 0) == 5


async def test_messages_of_a_rolled_back_transaction_are_never_published(
    pool: asyncpg.Pool, bus: Bus, eventually: Any
) -> None:
    async def change_refused_after_enqueue() -> None:
        async with pool.acquire() as conn, conn.transaction():
            await enqueue(conn, PROJECT, REQUESTS, EchoRequest(payload=b"1"))
            raise RuntimeError("business rule refused the change")

    with pytest.raises(RuntimeError, match="business rule"):
        await change_refused_after_enqueue()
    await commit_requests(pool, range(2, 3))  # a later commit, to know the relay went past

    async with running(OutboxRelay(pool, bus, TOPICS, **FAST)):
        await eventually(lambda: bus.redis.xlen(bus.stream_key("requests")))
        await eventually(lambda: outbox_is_empty(pool))

    assert await published_numbers(bus) == [2]


async def test_enqueue_outside_a_transaction_is_refused(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(RuntimeError, match="inside the data's transaction"):
            await enqueue(conn, PROJECT, REQUESTS, EchoRequest())
    assert await backlog(pool) == 0


async def test_enqueue_rejects_a_kind_the_topic_does_not_carry(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(ValueError, match="does not carry"):
            await enqueue(conn, PROJECT, REQUESTS, EchoResponse())


async def test_relay_wakes_on_commit_without_waiting_for_the_poll(
    pool: asyncpg.Pool, bus: Bus, eventually: Any
) -> None:
    # A poll interval far beyond the deadline below: only NOTIFY can make this pass.
    relay = OutboxRelay(pool, bus, TOPICS, poll_interval_s=600)
    await commit_requests(pool, range(1))
    async with running(relay):
        # The first round (at start) is done, so the relay now waits for a notice.
        await eventually(lambda: stream_length_is(bus, "requests", 1))
        await commit_requests(pool, range(1, 3))
        await eventually(lambda: outbox_is_empty(pool), within_s=5)

    assert await published_numbers(bus) == [0, 1, 2]


async def test_redis_outage_delays_messages_and_loses_none(
    pool: asyncpg.Pool, private_redis: Any, eventually: Any
) -> None:
    bus = Bus.from_url(private_redis.url, "t")
    relay = OutboxRelay(pool, bus, TOPICS, **FAST)
    try:
        async with running(relay):
            await commit_requests(pool, range(3))
            await eventually(lambda: outbox_is_empty(pool))

            private_redis.stop()
            for start in range(3, 30, 9):  # commits keep succeeding without Redis
                await commit_requests(pool, range(start, start + 9))
        # Stopped mid-outage, as on shutdown: the flush gives up and the rows stay.
        assert await relay.flush(timeout_s=0.3) is False
        assert await backlog(pool) == 27

        private_redis.start()  # empty: what was published before the crash is gone
        async with running(relay):
            await eventually(lambda: outbox_is_empty(pool))

        assert sorted(await published_numbers(bus)) == list(range(3, 30))
    finally:
        await bus.aclose()


async def test_two_relays_publish_every_row_exactly_once(
    pool: asyncpg.Pool, bus: Bus, eventually: Any
) -> None:
    for start in range(0, 1000, 100):
        await commit_requests(pool, range(start, start + 100))
    relays = [OutboxRelay(pool, bus, TOPICS, batch_size=25, **FAST) for _ in range(2)]

    async with running(*relays):
        await eventually(lambda: outbox_is_empty(pool))

    entries = await bus.redis.xrange(bus.stream_key("requests"))
    outbox_ids = Counter(f[b"id"] for _, f in entries)
    assert len(outbox_ids) == 1000
    assert max(outbox_ids.values()) == 1
    assert sorted(await published_numbers(bus)) == list(range(1000))


async def test_flush_publishes_everything_waiting(pool: asyncpg.Pool, bus: Bus) -> None:
    await commit_requests(pool, range(1200))
    relay = OutboxRelay(pool, bus, TOPICS, batch_size=500)

    assert await relay.flush(timeout_s=10) is True

    assert await backlog(pool) == 0
    assert await published_numbers(bus) == list(range(1200))
    assert await relay.update_metrics() == 0
    assert REGISTRY.get_sample_value("profiles_outbox_backlog") == 0


async def test_rows_of_an_unknown_topic_or_kind_are_dead_lettered_not_left_blocking(
    pool: asyncpg.Pool, bus: Bus, eventually: Any
) -> None:
    # As a newer version might write them during a rolling deploy.
    await pool.execute(
        "INSERT INTO outbox (project_id, topic, kind, payload) VALUES"
        " ($1, 'future', 'profiles.x.v1.New', ''), ($1, 'requests', 'profiles.x.v1.New', '')",
        PROJECT,
    )
    await commit_requests(pool, range(1))

    async with running(OutboxRelay(pool, bus, TOPICS, batch_size=2, **FAST)):
        await eventually(lambda: outbox_is_empty(pool))

    assert await published_numbers(bus) == [0]
    [(_, future)] = await bus.redis.xrange(bus.dead_key("future"))
    assert future[b"reason"] == b"unknown_topic"
    [(_, unknown_kind)] = await bus.redis.xrange(bus.dead_key("requests"))
    assert unknown_kind[b"reason"] == b"unknown_kind"
