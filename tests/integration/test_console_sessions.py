"""The console's session store on a real Redis: idle expiry renewed by use, a maximum age,
sign-out, hashing."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import requests
import uvicorn
from redis.asyncio import Redis

from services.console.app import build_app
from services.console.pages import COOKIE
from services.console.sessions import IDLE_SECONDS, MAX_AGE_SECONDS, SessionStore
from shared.embedded import EmbeddedRedis
from shared.settings import Settings
from tests.support.serving import served

PROJECT = str(uuid.uuid4())  # the store keeps the project GetCaller named; any UUID here


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_a_session_expires_after_eight_idle_hours_and_each_use_renews_it(
    redis: Redis, redis_prefix: str
) -> None:
    store = SessionStore(redis, redis_prefix)
    session = await store.create("prf_secret_key", "read", PROJECT)
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
    first = await store.create("prf_a", "admin", PROJECT)
    second = await store.create("prf_b", "read", PROJECT)
    assert first.session_id != second.session_id
    assert first.csrf_token != second.csrf_token
    await store.delete(first.session_id)
    assert await store.get(first.session_id) is None
    assert await store.get("") is None
    assert await store.get("made-up") is None
    [name] = [key async for key in redis.scan_iter(match=f"{redis_prefix}:console:session:*")]
    await redis.expire(name, 0)  # what Redis does once the idle period has passed
    assert await store.get(second.session_id) is None


async def test_a_session_ends_at_its_maximum_age_however_much_it_is_used(
    redis: Redis, redis_prefix: str
) -> None:
    store = SessionStore(redis, redis_prefix)
    session = await store.create("prf_secret_key", "read", PROJECT)
    [name] = [key async for key in redis.scan_iter(match=f"{redis_prefix}:console:session:*")]
    assert MAX_AGE_SECONDS == 7 * 24 * 3600
    # Signed in six days and 23 hours ago, used all along: its last idle period ends with it.
    await redis.hset(name, "created", str(int(time.time()) - MAX_AGE_SECONDS + 600))
    assert await store.get(session.session_id) == session
    assert 0 < await redis.ttl(name) <= 600
    assert await store.alive(session.session_id)
    # A week after sign-in: gone, whatever its idle expiry says.
    await redis.expire(name, IDLE_SECONDS)
    await redis.hset(name, "created", str(int(time.time()) - MAX_AGE_SECONDS - 1))
    assert not await store.alive(session.session_id)
    assert await store.get(session.session_id) is None
    assert not await redis.exists(name)
    # A session stored without its sign-in time (before sessions had a maximum age) is over.
    other = await store.create("prf_other_key", "admin", PROJECT)
    [name] = [key async for key in redis.scan_iter(match=f"{redis_prefix}:console:session:*")]
    await redis.hdel(name, "created")
    assert await store.get(other.session_id) is None


async def test_a_read_without_renewal_leaves_the_idle_expiry(
    redis: Redis, redis_prefix: str
) -> None:
    store = SessionStore(redis, redis_prefix)
    session = await store.create("prf_secret_key", "read", PROJECT)
    [name] = [key async for key in redis.scan_iter(match=f"{redis_prefix}:console:session:*")]
    await redis.expire(name, 60)
    assert await store.get(session.session_id, renew=False) == session
    assert 0 < await redis.ttl(name) <= 60
    assert await store.get(session.session_id) == session
    assert await redis.ttl(name) > IDLE_SECONDS - 60


async def test_pages_answer_503_to_retry_while_the_session_store_is_away(
    private_redis: EmbeddedRedis, eventually: Any
) -> None:
    """Redis restarting (or failing over) under the console: /healthz and every page answer
    503 with Retry-After and the console's own page, not a bare 500; once Redis is back the
    console answers again by itself."""
    settings = Settings(redis_url=private_redis.url, redis_prefix=f"t-{uuid.uuid4().hex[:8]}")
    async with served(uvicorn.Config(build_app(settings), log_level="warning")) as base:

        async def get(path: str) -> requests.Response:
            # In a thread: the console serves from this test's event loop.
            return await asyncio.to_thread(
                requests.get,
                base + path,
                cookies={COOKIE: "some-session"},
                allow_redirects=False,
                timeout=10,
            )

        assert (await get("/healthz")).status_code == 200
        private_redis.stop()
        assert (await get("/healthz")).status_code == 503
        page = await get("/overview")
        assert page.status_code == 503
        assert page.headers["retry-after"] == "2"
        assert "session store" in page.text
        private_redis.start()

        async def answers() -> bool:
            return (await get("/healthz")).status_code == 200

        await eventually(answers)
        # Back: an unknown session is sent to sign in, as ever.
        assert (await get("/overview")).status_code == 303
