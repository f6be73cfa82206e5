"""The signed-in key at rest: Redis holds it sealed with a key derived from the session ID,
which only the browser's cookie holds, so a copy of Redis yields neither cookies nor keys; a
record that does not open (altered, moved, or stored in clear before keys were sealed) signs
the person out instead of failing."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator

import pytest
import requests
from redis.asyncio import Redis

from services.console.sessions import COOKIE
from tests.console.conftest import ConsoleSuite
from tests.console.test_console_hardening import http_sign_in
from tests.console.test_console_pages import identified_profile
from tests.console.test_console_safety import sse_frames


@pytest.fixture
async def redis(console_suite: ConsoleSuite) -> AsyncIterator[Redis]:
    client = Redis.from_url(console_suite.settings.redis_url)
    yield client
    await client.aclose()


def record_name(suite: ConsoleSuite, session_id: str) -> str:
    digest = hashlib.sha256(session_id.encode()).hexdigest()
    return f"{suite.settings.redis_prefix}:console:session:{digest}"


async def signed_in(suite: ConsoleSuite, key: str) -> requests.Session:
    return await asyncio.to_thread(http_sign_in, suite.url, key)


async def get(browser: requests.Session, url: str) -> requests.Response:
    return await asyncio.to_thread(browser.get, url, allow_redirects=False, timeout=10)


async def test_redis_holds_no_trace_of_a_signed_in_key(
    console_suite: ConsoleSuite, redis: Redis
) -> None:
    key = console_suite.project.keys["admin"]
    secret = key.rpartition("_")[2]
    browser = await signed_in(console_suite, key)
    session_id = browser.cookies[COOKIE]
    # The session works: its pages are read with the key, unsealed from Redis.
    users = await get(browser, console_suite.url + "/users")
    assert users.status_code == 200, users.status_code
    assert "Users" in users.text
    name = record_name(console_suite, session_id)
    assert await redis.exists(name)
    # Every value Redis holds for the console (this session's record and any other), raw.
    raw: list[bytes] = []
    prefix = f"{console_suite.settings.redis_prefix}:console:"
    async for found in redis.scan_iter(match=prefix + "*"):
        raw.append(found)
        kind = await redis.type(found)
        if kind == b"hash":
            for field, value in (await redis.hgetall(found)).items():
                raw += [field, value]
        elif kind == b"string":
            raw.append(await redis.get(found) or b"")
    assert raw, "no console record found"
    for value in raw:
        assert key.encode() not in value
        assert secret.encode() not in value
        assert session_id.encode() not in value


async def test_two_sessions_of_one_key_seal_it_differently(
    console_suite: ConsoleSuite, redis: Redis
) -> None:
    key = console_suite.project.keys["read"]
    first = await signed_in(console_suite, key)
    second = await signed_in(console_suite, key)
    one = await redis.hget(record_name(console_suite, first.cookies[COOKIE]), "sealed_key")
    other = await redis.hget(record_name(console_suite, second.cookies[COOKIE]), "sealed_key")
    assert one
    assert other
    assert one != other
    # Each is sealed with its own random nonce, not only under its own session's key.
    assert one[:12] != other[:12]
    for browser in (first, second):
        assert (await get(browser, console_suite.url + "/users")).status_code == 200


async def test_a_record_that_does_not_open_signs_the_person_out(
    console_suite: ConsoleSuite, redis: Redis
) -> None:
    key = console_suite.project.keys["read"]
    profile_id = (await identified_profile(console_suite)).summary.profile_id

    async def signed_out(browser: requests.Session) -> None:
        name = record_name(console_suite, browser.cookies[COOKIE])
        page = await get(browser, console_suite.url + "/users")
        assert page.status_code == 303, page.status_code
        assert page.headers["location"].startswith("/signin")
        assert not await redis.exists(name), "a record that does not open is removed"

    # A flipped bit in the sealed key.
    browser = await signed_in(console_suite, key)
    name = record_name(console_suite, browser.cookies[COOKIE])
    sealed = bytearray(await redis.hget(name, "sealed_key") or b"")
    sealed[-1] ^= 1
    await redis.hset(name, "sealed_key", bytes(sealed))
    await signed_out(browser)

    # A role raised in Redis: the role is sealed with the key.
    browser = await signed_in(console_suite, key)
    await redis.hset(record_name(console_suite, browser.cookies[COOKIE]), "role", "admin")
    await signed_out(browser)

    # Another project named in Redis (the live watches' share is counted by it): the project
    # is sealed with the key too.
    browser = await signed_in(console_suite, key)
    await redis.hset(
        record_name(console_suite, browser.cookies[COOKIE]), "project", str(uuid.uuid4())
    )
    await signed_out(browser)

    # Another session's sealed key, copied over this one's.
    donor = await signed_in(console_suite, key)
    browser = await signed_in(console_suite, key)
    moved = await redis.hget(record_name(console_suite, donor.cookies[COOKIE]), "sealed_key")
    await redis.hset(record_name(console_suite, browser.cookies[COOKIE]), "sealed_key", moved)
    await signed_out(browser)
    assert (await get(donor, console_suite.url + "/users")).status_code == 200

    # A session stored before keys were sealed (the key in clear): signed out, and the clear
    # key leaves Redis with it.
    browser = await signed_in(console_suite, key)
    name = record_name(console_suite, browser.cookies[COOKIE])
    await redis.hdel(name, "sealed_key")
    await redis.hset(name, "key", key)
    await signed_out(browser)

    # A live feed on an altered record ends as signed out, not with an error.
    browser = await signed_in(console_suite, key)
    cookie = browser.cookies[COOKIE]
    await redis.hset(record_name(console_suite, cookie), "sealed_key", b"\x00" * 40)
    async with asyncio.timeout(10):
        feed = sse_frames(console_suite.url, f"/live/profiles/{profile_id}", cookie)
        try:
            frame = await anext(feed)
        finally:
            await feed.aclose()
    assert frame["event"] == "ended"
    assert '"signed_out"' in frame["data"]
