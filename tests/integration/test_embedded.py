"""The embedded PostgreSQL and Redis: real servers on Unix sockets, data kept across restarts."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest
import redis.asyncio as aioredis

from shared.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.conftest import server_scratch_dir


def processes_mentioning(text: str) -> list[psutil.Process]:
    """Live processes whose command line or working directory mentions text."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(proc.info["cmdline"] or [])
        if text in cmdline or text in (proc.info["cwd"] or ""):
            found.append(proc)
    return found


def is_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def wait_until_gone(pid: int) -> None:
    async with asyncio.timeout(30):
        while True:
            if not is_alive(pid):
                return
            await asyncio.sleep(0.05)


@pytest.fixture
def work_dir() -> Iterator[Path]:
    """A directory of the test's own (tests/conftest.py, server_scratch_dir)."""
    path = server_scratch_dir("profiles-test-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def postgres(work_dir: Path) -> AsyncIterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(work_dir / "postgres", fast_unsafe=True)
    yield server
    await asyncio.to_thread(server.stop)


@pytest.fixture
async def redis_dir(work_dir: Path) -> AsyncIterator[Path]:
    yield work_dir / "redis"
    # Whatever a test started or left, nothing survives it.
    for proc in processes_mentioning(str(work_dir / "redis")):
        proc.kill()


async def fetch_value(url: str, query: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def test_postgres_answers_on_a_socket_only_and_keeps_data_across_restart(
    postgres: EmbeddedPostgres,
) -> None:
    url = await asyncio.to_thread(postgres.start)
    assert await fetch_value(url, "SHOW listen_addresses") == ""
    conn = await asyncpg.connect(url)
    await conn.execute("CREATE TABLE kept (value text); INSERT INTO kept VALUES ('still here')")
    await conn.close()

    await asyncio.to_thread(postgres.stop)
    assert processes_mentioning(str(postgres.data_dir)) == []
    url = await asyncio.to_thread(postgres.start)

    assert await fetch_value(url, "SELECT value FROM kept") == "still here"


async def test_postgres_start_and_stop_are_idempotent(postgres: EmbeddedPostgres) -> None:
    first = await asyncio.to_thread(postgres.start)
    # A second handle on the same directory (another command) finds the running server.
    second = await asyncio.to_thread(EmbeddedPostgres(postgres.data_dir).start)
    assert first == second
    assert await fetch_value(second, "SELECT 1") == 1

    await asyncio.to_thread(postgres.stop)
    await asyncio.to_thread(postgres.stop)

    assert not postgres.is_running()
    assert processes_mentioning(str(postgres.data_dir)) == []


async def test_postgres_starts_after_a_killed_server_with_committed_data(
    work_dir: Path,
) -> None:
    # Crash-safe settings (what `profiles up` uses): a commit must survive the kill.
    postgres = EmbeddedPostgres(work_dir / "postgres")
    try:
        url = await asyncio.to_thread(postgres.start)
        await fetch_value(url, "CREATE TABLE survivor (id int)")
        pid = int((postgres.data_dir / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        await wait_until_gone(pid)

        url = await asyncio.to_thread(EmbeddedPostgres(postgres.data_dir).start)

        assert await fetch_value(url, "SELECT count(*) FROM survivor") == 0
    finally:
        await asyncio.to_thread(postgres.stop)
    assert processes_mentioning(str(postgres.data_dir)) == []


async def test_postgres_in_a_deep_directory_puts_its_socket_in_a_short_one(
    work_dir: Path,
) -> None:
    deep = work_dir.joinpath(*["a-rather-long-directory-name"] * 4) / "postgres"
    server = EmbeddedPostgres(deep, fast_unsafe=True)
    try:
        url = await asyncio.to_thread(server.start)
        assert await fetch_value(url, "SELECT 1") == 1
        assert len(str(server.socket_dir)) < 40
    finally:
        await asyncio.to_thread(server.stop)


async def test_redis_keeps_data_across_restart_when_persisting(redis_dir: Path) -> None:
    server = EmbeddedRedis(redis_dir)
    url = await asyncio.to_thread(server.start)
    client = aioredis.from_url(url)
    await client.set("kept", "still here")
    await client.aclose()

    await asyncio.to_thread(server.stop)
    assert processes_mentioning(str(redis_dir)) == []
    client = aioredis.from_url(await asyncio.to_thread(server.start))
    try:
        assert await client.get("kept") == b"still here"
    finally:
        await client.aclose()
        await asyncio.to_thread(server.stop)
    assert processes_mentioning(str(redis_dir)) == []


async def test_redis_forgets_data_when_not_persisting(redis_dir: Path) -> None:
    server = EmbeddedRedis(redis_dir, persist=False)
    client = aioredis.from_url(await asyncio.to_thread(server.start))
    await client.set("gone", "soon")
    await client.aclose()
    await asyncio.to_thread(server.stop)

    client = aioredis.from_url(await asyncio.to_thread(server.start))
    try:
        assert await client.get("gone") is None
    finally:
        await client.aclose()
        await asyncio.to_thread(server.stop)


async def test_redis_replaces_a_server_left_by_a_killed_run(redis_dir: Path) -> None:
    orphan = EmbeddedRedis(redis_dir)
    client = aioredis.from_url(await asyncio.to_thread(orphan.start))
    await client.set("kept", "yes")
    await client.aclose()

    # A new run knows nothing of the old handle; the old server is still running on the socket.
    server = EmbeddedRedis(redis_dir)
    client = aioredis.from_url(await asyncio.to_thread(server.start))
    try:
        assert await client.get("kept") == b"yes"
        assert len(processes_mentioning(str(server.socket_path))) == 1
    finally:
        await client.aclose()
        await asyncio.to_thread(server.stop)
    assert processes_mentioning(str(redis_dir)) == []


async def test_redis_starts_after_a_killed_server_left_its_socket(redis_dir: Path) -> None:
    killed = EmbeddedRedis(redis_dir)
    await asyncio.to_thread(killed.start)
    pid = int((redis_dir / "redis.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    await wait_until_gone(pid)

    server = EmbeddedRedis(redis_dir)
    client = aioredis.from_url(await asyncio.to_thread(server.start))
    try:
        assert await client.ping()
    finally:
        await client.aclose()
        await asyncio.to_thread(server.stop)
