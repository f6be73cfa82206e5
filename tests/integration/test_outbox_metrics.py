"""What an operator sees of the outbox while Redis is away: the backlog gauge keeps counting
(in PostgreSQL) and `profiles_outbox_redis_up` says Redis is unreachable, for a Redis that
hangs (SIGSTOP: every call times out) as for one that is gone, busy relay or idle."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from prometheus_client import REGISTRY

from shared.bus import Bus
from shared.db import create_pool
from shared.embedded import EmbeddedRedis
from shared.outbox import OUTBOX_BACKLOG, OUTBOX_REDIS_UP, OutboxRelay
from tests.integration.test_outbox import TOPICS, commit_requests, running

# Quick rounds, and a publish timeout short enough that a stopped Redis costs little time.
QUICK = {
    "poll_interval_s": 0.05,
    "backoff_initial_s": 0.02,
    "backoff_max_s": 0.2,
    "metrics_interval_s": 0.05,
    "publish_timeout_s": 0.5,
}


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, max_size=6)
    yield pool
    await pool.close()


@pytest.fixture(autouse=True)
def unreported_gauges() -> None:
    """Gauges no relay would set, so that what an earlier test's relays left (they are
    process-wide) cannot pass for what this test's relay reports."""
    OUTBOX_BACKLOG.set(-1)
    OUTBOX_REDIS_UP.set(-1)


def gauges() -> tuple[float | None, float | None]:
    """(backlog, redis_up) as a scrape of this process would read them."""
    return (
        REGISTRY.get_sample_value("profiles_outbox_backlog"),
        REGISTRY.get_sample_value("profiles_outbox_redis_up"),
    )


async def gauges_become(backlog: float, redis_up: float, within_s: float = 10.0) -> None:
    """Waits until the gauges read these values; fails naming what they read instead."""
    deadline = time.monotonic() + within_s
    while True:
        if gauges() == (backlog, redis_up):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"(backlog, redis_up) reads {gauges()}, not {(backlog, redis_up)}")
        await asyncio.sleep(0.02)


@contextlib.contextmanager
def hung(redis: EmbeddedRedis) -> Iterator[None]:
    """The Redis stopped (SIGSTOP): its socket accepts, nothing answers."""
    pid = redis.pid()
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_a_hung_redis_shows_in_the_gauges_and_the_backlog_keeps_counting(
    pool: asyncpg.Pool, private_redis: EmbeddedRedis
) -> None:
    bus = Bus.from_url(private_redis.url, "t")
    relay = OutboxRelay(pool, bus, TOPICS, **QUICK)
    # Before the relay starts: its first round publishes them, before it sets any gauge.
    await commit_requests(pool, range(3))
    try:
        async with running(relay):
            await gauges_become(backlog=0, redis_up=1)

            with hung(private_redis):
                await commit_requests(pool, range(3, 30))
                # Counted while Redis stays stopped: not only once it is back.
                await gauges_become(backlog=27, redis_up=0)
                await commit_requests(pool, range(30, 40))
                await gauges_become(backlog=37, redis_up=0)

            await gauges_become(backlog=0, redis_up=1)
    finally:
        await bus.aclose()


async def test_an_idle_relay_notices_a_redis_that_went_away_and_came_back(
    pool: asyncpg.Pool, private_redis: EmbeddedRedis
) -> None:
    bus = Bus.from_url(private_redis.url, "t")
    relay = OutboxRelay(pool, bus, TOPICS, **QUICK)
    try:
        async with running(relay):
            await gauges_become(backlog=0, redis_up=1)
            with hung(private_redis):
                await gauges_become(backlog=0, redis_up=0)
            await gauges_become(backlog=0, redis_up=1)

            private_redis.stop()
            await gauges_become(backlog=0, redis_up=0)
            private_redis.start()
            await gauges_become(backlog=0, redis_up=1)
    finally:
        await bus.aclose()
