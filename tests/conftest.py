"""Session fixtures: one PostgreSQL and one Redis per test session, a fresh database per test.

By default they are embedded servers started from pip packages in a temporary directory, so the
suite needs nothing installed by hand. PROFILES_TEST_DATABASE_URL / PROFILES_TEST_REDIS_URL point
the tests at external servers instead; tests never read PROFILES_DATABASE_URL, so they cannot
drop the databases of a running suite.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from hypothesis import HealthCheck, settings

from shared.redis_client import connect
from shared.settings import Settings
from shared.tenancy import TenancyRepository

# The shared helpers assert too; rewrite their asserts as pytest does those of test modules, so a
# failing helper explains itself (they used to be test_*.py modules, rewritten for that reason).
pytest.register_assert_rewrite("tests.support")

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=50,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at database `name` (keeps ?host=/socket/dir)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@pytest.fixture(scope="session")
def embedded_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: pytest prunes old base temp dirs, and a second pytest run
    # on the same machine would delete the data of this session's running servers.
    directory = Path(tempfile.mkdtemp(prefix="profiles-test-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server_url(embedded_dir: Path) -> Iterator[str]:
    external = os.environ.get("PROFILES_TEST_DATABASE_URL")
    if external:
        yield external
        return
    from shared.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(embedded_dir / "pg", fast_unsafe=True)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(embedded_dir: Path) -> Iterator[str]:
    external = os.environ.get("PROFILES_TEST_REDIS_URL")
    if external:
        yield external
        return
    from shared.embedded import EmbeddedRedis

    server = EmbeddedRedis(embedded_dir / "redis", persist=False)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
async def template_database(postgres_server_url: str) -> AsyncIterator[str]:
    """A database migrated once; each test gets a copy of it (CREATE DATABASE ... TEMPLATE)."""
    from shared.db import migrate

    name = f"tpl_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(postgres_server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        await migrate(with_database(postgres_server_url, name))
        yield name
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def database_url(postgres_server_url: str, template_database: str) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(postgres_server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
        yield with_database(postgres_server_url, name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A small pool on this test's database, for checking rows directly."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
def redis_cluster_url(embedded_dir: Path) -> Iterator[str]:
    """A real Redis Cluster of three masters on loopback (tests/support/redis_cluster.py), as a
    `redis+cluster://` URL; PROFILES_TEST_REDIS_CLUSTER_URL points at an external one instead."""
    external = os.environ.get("PROFILES_TEST_REDIS_CLUSTER_URL")
    if external:
        yield external
        return
    from tests.support.redis_cluster import RedisClusterProcesses

    cluster = RedisClusterProcesses(embedded_dir / "redis-cluster")
    try:
        yield cluster.start()
    finally:
        cluster.stop()


async def delete_prefixed_keys(url: str, prefix: str) -> None:
    """Deletes the keys under `prefix` (on every node of a cluster); never FLUSHALL."""
    client = connect(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for key in keys:  # one by one: on a cluster they live in different slots
            await client.delete(key)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards (never FLUSHALL)."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    await delete_prefixed_keys(redis_url, prefix)


@pytest.fixture
async def cluster_prefix(redis_cluster_url: str) -> AsyncIterator[str]:
    """`redis_prefix` for the Redis Cluster."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    await delete_prefixed_keys(redis_cluster_url, prefix)


@pytest.fixture
def settings_for_test(database_url: str, redis_url: str, redis_prefix: str) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        internal_token=f"internal-{uuid.uuid4().hex}",
        db_pool_size=5,
        shutdown_grace_seconds=5.0,
    )


@dataclass(frozen=True, slots=True)
class TestProject:
    project_id: uuid.UUID
    keys: dict[str, str]  # role -> plain key

    def metadata(self, role: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[role]}"),)


async def create_test_project(database_url: str, name: str = "") -> TestProject:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        tenancy = TenancyRepository(pool)
        project = await tenancy.create_project(name or f"p-{uuid.uuid4().hex[:8]}")
        keys = {}
        for role in ("sdk", "read", "admin"):
            keys[role] = (await tenancy.create_key(project.project_id, role)).plain_key
        return TestProject(project.project_id, keys)
    finally:
        await pool.close()


@pytest.fixture
async def project(database_url: str) -> TestProject:
    return await create_test_project(database_url)


StartServices = Callable[..., Awaitable[dict[str, "ServiceHandle"]]]


@dataclass(slots=True)
class ServiceHandle:
    running: object  # shared.server.RunningService
    channel: grpc.aio.Channel

    @property
    def address(self) -> str:
        return self.running.address  # type: ignore[attr-defined]


@pytest.fixture
async def start_services(settings_for_test: Settings) -> AsyncIterator[StartServices]:
    """Starts services in-process on free ports, each with a real gRPC channel to it."""
    from profiles_cli.runner import BUILDERS
    from shared.server import start_service

    started: list[ServiceHandle] = []

    async def start(
        *names: str, settings: Settings | None = None, build: Any = None, **kwargs: object
    ) -> dict:
        """`build` replaces the service's default build (one name only), e.g. a faster sweep."""
        handles = {}
        for name in names or tuple(BUILDERS):
            running = await start_service(
                name,
                settings or settings_for_test,
                build or BUILDERS[name],
                port=0,
                metrics=False,
                **kwargs,  # type: ignore[arg-type]
            )
            handle = ServiceHandle(running, grpc.aio.insecure_channel(running.address))
            started.append(handle)
            handles[name] = handle
        return handles

    yield start
    for handle in reversed(started):
        await handle.channel.close()
        await handle.running.stop(grace=1.0)  # type: ignore[attr-defined]


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = 10.0) -> None:
    """Polls `check` until it is true; fails after `within` seconds (a deadline, not a timing)."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 - polling an outside system has no event
            await asyncio.sleep(0.02)
