"""The console's session store on a real Redis: idle expiry renewed by use, sign-out, hashing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from services.console.sessions import IDLE_SECONDS, SessionStore


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_a_session_expires_after_eight_idle_hours_and_each_use_renews_it(
    redis: Redis, redis_prefix: str
) -> None:
    store = SessionStore(redis, redis_prefix)
    session = await store.create("prf_secret_key", "read")
    [name] = [key async for key in redis.scan_iter(match=f"{redis_prefix}:console:session:*")]
    assert IDLE_SECONDS == 8 * 3600
    assert 0 < await redis.ttl(name) <= IDLE_SECONDS
    # Nearly idle for eight hours: one more request renews the full period.
    await redis.expire(name, 5)
    found = await store.get(session.session_id)
    assert found == session
    assert await redis.ttl(name) > IDLE_SECONDS - 60
    # The session ID itself is not a Redis key: a copy of Redis yields no usable cookie.
    assert session.session_id.encode() not in name


async def test_an_expired_or_signed_out_session_is_gone(redis: Redis, redis_prefix: str) -> None:
    store = SessionStore(redis, redis_prefix)
    first = await store.create("prf_a", "admin")
    second = await store.create("prf_b", "read")
    assert first.session_id != second.session_id
    assert first.csrf_token != second.csrf_token
    await store.delete(first.session_id)
    assert await store.get(first.session_id) is None
    assert await store.get("") is None
    assert await store.get("made-up") is None
    [name] = [key async for key in redis.scan_iter(match=f"{redis_prefix}:console:session:*")]
    await redis.expire(name, 0)  # what Redis does once the idle period has passed
    assert await store.get(second.session_id) is None
