"""Session fixtures: one PostgreSQL and one Redis per test session, a fresh database per test.

By default they are embedded servers started from pip packages in a temporary directory (in
memory, /dev/shm, where there is one), so the suite needs nothing installed by hand.
PROFILES_TEST_DATABASE_URL / PROFILES_TEST_REDIS_URL point the tests at external servers instead;
tests never read PROFILES_DATABASE_URL, so they cannot drop the databases of a running suite.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
import structlog
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

# Services started in-process log through structlog's defaults, whose console renderer draws a
# logged exception with rich, every frame's local variables included: seconds of CPU for one
# failed group of batches, spent on the event loop the services share with the test (a group
# commit test waited 4 to 17 s on two such logs). Plain tracebacks instead, as the services' own
# JSON logging prints them; nothing cached, so structlog.testing.capture_logs still works.
structlog.configure(
    processors=[
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.StackInfoRenderer(),
        structlog.dev.set_exc_info,
        structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
        structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        ),
    ],
    cache_logger_on_first_use=False,
)


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at database `name` (keeps ?host=/socket/dir)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def scratch_base() -> str | None:
    """Memory-backed /dev/shm where there is one, else the system's temporary directory.

    Every test's database is a copy of the template, hundreds of files made and deleted again:
    on an ext4 disk that has just deleted many files, making new ones is slow (the kernel looks
    past recently freed inodes), about 0.35 s of the server's time per copy against 0.03 s on
    tmpfs. The servers' data is thrown away after the session anyway (fast_unsafe)."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None


def server_scratch_dir(prefix: str) -> Path:
    """A new directory for servers a test starts itself (PostgreSQL, Redis, `profiles up`):
    right under /dev/shm where there is one (see scratch_base: a cluster's thousand files and
    its fsyncs cost seconds on a disk), else right under /tmp. Never pytest's directory: as
    root, PostgreSQL runs as another user that must pass through every parent, and each new
    pytest session on the machine takes that permission away from pytest's base directory."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_base() or "/tmp"))


def pytest_configure(config: pytest.Config) -> None:
    """A run stopped by SIGTERM (`kill`, a CI job's timeout) unwinds as Ctrl-C does, so the
    session's fixtures stop the embedded servers, which a terminated run used to leave. Those
    fixtures also stop them at the interpreter's exit: an interrupt raised inside the teardown
    (uvicorn raises the signal it caught again when its server ends) cuts the teardown short."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Compiles the project once, and starts the linters in the background when this run
    includes their tests (they then only collect the results)."""
    if session.config.option.collectonly:
        return
    # Every Python process the tests start (services, `profiles` commands, benches) reads the
    # project's bytecode instead of compiling it again (tests/support/bytecode.py).
    from tests.support.bytecode import compile_project

    compile_project()
    if any(item.nodeid.startswith("tests/unit/test_code_quality.py") for item in session.items):
        from tests.unit.test_code_quality import start_checks

        start_checks()


@pytest.fixture(scope="session")
def embedded_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: pytest prunes old base temp dirs, and a second pytest run
    # on the same machine would delete the data of this session's running servers.
    directory = Path(tempfile.mkdtemp(prefix="profiles-test-", dir=scratch_base()))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)  # after the servers' stops
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
    atexit.register(server.stop)  # see pytest_configure
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
    atexit.register(server.stop)  # see pytest_configure
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


async def copy_strategy(admin: asyncpg.Connection) -> str:
    """FILE_COPY where the server knows it (PostgreSQL 15 on): its copy and drop of the small
    template cost the server about half the CPU of the default WAL_LOG (17 against 31 ms a copy,
    8 against 17 to 40 ms a drop, measured on the embedded server), on every test."""
    version = int(await admin.fetchval("SHOW server_version_num"))
    return " STRATEGY FILE_COPY" if version >= 150000 else ""


class DatabaseSupply:
    """Fresh copies of the template made ahead of the tests that take them, and dropped after them,
    on a thread of its own: a copy and a drop take the server tens of milliseconds (hundreds on a
    busy machine), which now run while the previous test runs instead of before and after each
    test. Each copy is made from the untouched template and given to one test only, so a test
    sees exactly what a copy made at its start would hold. A copy that failed is its taker's
    error, as it would have been inline."""

    AHEAD = 2  # copies kept ready: enough for a run of short tests, little disk
    TAKE_TIMEOUT_S = 120.0  # a deadline against a hung server, not a timing

    def __init__(self, server_url: str, template: str) -> None:
        self._server_url = server_url
        self._template = template
        self._changed = threading.Condition()
        self._ready: deque[str | BaseException] = deque()
        self._to_drop: deque[str] = deque()
        self._stopping = False
        self._failed_drops: list[str] = []
        self._thread = threading.Thread(target=self._work, name="database-supply", daemon=True)
        self._thread.start()

    def take(self) -> str:
        """The name of a fresh copy of the template, now this caller's own."""
        deadline = time.monotonic() + self.TAKE_TIMEOUT_S
        with self._changed:
            while not self._ready:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    raise RuntimeError("no copy of the template database was made in time")
                self._changed.wait(remaining)
            made = self._ready.popleft()
            self._changed.notify_all()
        if isinstance(made, BaseException):
            raise made
        return made

    def release(self, name: str) -> None:
        """Drops a taken copy (WITH (FORCE): connections left open are ended), on the thread."""
        with self._changed:
            self._to_drop.append(name)
            self._changed.notify_all()

    def close(self) -> None:
        """Drops every copy made or released, then stops the thread."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join()
        assert not self._failed_drops, f"copies of the template not dropped: {self._failed_drops}"

    def _work(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        admin: asyncpg.Connection | None = None
        try:
            while True:
                with self._changed:
                    while not (self._stopping or self._to_drop or len(self._ready) < self.AHEAD):
                        self._changed.wait()
                    if self._stopping:
                        self._to_drop.extend(n for n in self._ready if isinstance(n, str))
                        self._ready.clear()
                    dropping = list(self._to_drop)  # drops first: they free the disk
                    self._to_drop.clear()
                    stopping = self._stopping
                if admin is None or admin.is_closed():
                    admin = await asyncpg.connect(self._server_url)
                for name in dropping:
                    try:
                        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                    except Exception as exc:  # told at close(); the other copies go on
                        self._failed_drops.append(f"{name}: {exc!r}")
                if stopping:
                    return
                if dropping:
                    continue  # then look again: the queue may be full meanwhile
                made: str | BaseException = f"t_{uuid.uuid4().hex}"
                try:
                    await admin.execute(
                        f'CREATE DATABASE "{made}" TEMPLATE "{self._template}"'
                        + await copy_strategy(admin)
                    )
                except Exception as exc:  # the next taker's failure, as it would have been inline
                    made = exc
                    await admin.close()  # a fresh connection for the next copy
                with self._changed:
                    self._ready.append(made)
                    self._changed.notify_all()
        except BaseException as exc:
            with self._changed:  # takers fail at once rather than at their deadline
                self._ready.append(exc)
                self._changed.notify_all()
            raise
        finally:
            if admin is not None:
                await admin.close()


@pytest.fixture(scope="session")
def database_supply(postgres_server_url: str, template_database: str) -> Iterator[DatabaseSupply]:
    supply = DatabaseSupply(postgres_server_url, template_database)
    yield supply
    supply.close()  # before the template is dropped: a copy in progress holds it


@pytest.fixture
async def database_url(
    postgres_server_url: str, database_supply: DatabaseSupply
) -> AsyncIterator[str]:
    """A fresh copy of the migrated template, this test's own; dropped after the test."""
    name = await asyncio.to_thread(database_supply.take)
    try:
        yield with_database(postgres_server_url, name)
    finally:
        database_supply.release(name)


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
    atexit.register(cluster.stop)  # see pytest_configure
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
        # Entries handed back to a group (a replay, a dead letter) wait for the consumer's
        # blocked read to end: seconds per test at the production default.
        bus_wait_seconds=0.1,
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
