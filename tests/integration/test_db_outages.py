"""A PostgreSQL that crashes or hangs, on a server of this module's own (the session's shared one
is never frozen): what asyncpg raises then is recognised as the database being away (UNAVAILABLE,
no bus delivery spent), and a hung server costs a call a bounded wait, not the whole outage."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
import pytest

from profiles.query.v1 import query_service_pb2 as pb
from profiles.query.v1 import query_service_pb2_grpc as pb_grpc
from shared.bus import dependency_unavailable
from shared.db import (
    DatabaseBounds,
    NoConnectionInTime,
    bound_statements,
    connection_lost,
    create_pool,
    migrate,
)
from shared.embedded import EmbeddedPostgres
from shared.settings import Settings
from tests.conftest import create_test_project, eventually, server_scratch_dir
from tests.support.bad_input import violations

# Short bounds, so that a hang costs these tests a second (the defaults are several).
SHORT = DatabaseBounds(acquire_s=1.0, read_statement_s=1.0, write_statement_s=1.0)
# How long a frozen server stays frozen at most: a deadline against a test that would hang (the
# defect this module is about), never a timing.
HANG_GUARD_S = 30
SOCKET_NAME = ".s.PGSQL.5432"


@pytest.fixture(scope="module")
def postgres() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of this module's own, which its tests freeze and whose backends they end
    (in tests/conftest.py's server_scratch_dir)."""
    directory = server_scratch_dir("profiles-outage-")
    server = EmbeddedPostgres(directory / "pg", fast_unsafe=True)
    try:
        server.start()
        yield server
    finally:
        _resume(server)  # a test that failed while the server was frozen
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _processes(server: EmbeddedPostgres) -> list[psutil.Process]:
    """The postmaster and its children (backends, checkpointer, WAL writer...)."""
    pid = server.pid()
    if pid is None:
        return []
    postmaster = psutil.Process(pid)
    return [postmaster, *postmaster.children(recursive=True)]


_GUARDS: list[asyncio.TimerHandle] = []


def _freeze(server: EmbeddedPostgres) -> None:
    """A hung server: every process stopped, its sockets open, nothing answered; resumed after
    HANG_GUARD_S at the latest, so that a wait that is not bounded ends (and its test fails)
    rather than hang the test."""
    for process in _processes(server):
        _signal(process, signal.SIGSTOP)
    _GUARDS.append(asyncio.get_running_loop().call_later(HANG_GUARD_S, _resume, server))


def _resume(server: EmbeddedPostgres) -> None:
    while _GUARDS:
        _GUARDS.pop().cancel()
    for process in _processes(server):
        _signal(process, signal.SIGCONT)


def _signal(process: psutil.Process, number: signal.Signals) -> None:
    # A backend listed a moment ago may have ended since (a test's connection closing): it has
    # nothing left to freeze or resume.
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, number)


def _url(socket_dir: Path, database: str) -> str:
    return f"postgresql://postgres@/{database}?host={socket_dir}"


@pytest.fixture
async def database(postgres: EmbeddedPostgres) -> AsyncIterator[str]:
    """The name of a database of this test's own on the module's server."""
    name = f"t_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(postgres.url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield name
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


class HangUpHeld:
    """A relay from a Unix socket of its own to the server's that passes every byte both ways
    but holds back the server's hang-up (the close of its end) until `let_go` is set.

    When a backend ends (its postmaster died, pg_terminate_backend), PostgreSQL writes a FATAL
    error to the connection and closes it. asyncpg reads the error first, and the close on a
    later turn of its event loop (later still when the close travels behind the error on the
    network): a statement started in between failed with InternalClientError, answered
    INTERNAL (ingest's TrackEvents, under load, with the postmaster killed). The relay holds
    that moment open, so that the test meets it every time."""

    def __init__(self, server_socket: Path, directory: Path) -> None:
        self._server_socket = server_socket
        self.directory = directory
        self.hung_up = asyncio.Event()
        self.let_go = asyncio.Event()
        self._pumps: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Server | None = None

    async def start(self) -> None:
        self._listener = await asyncio.start_unix_server(
            self._relay, path=str(self.directory / SOCKET_NAME)
        )

    async def close(self) -> None:
        self.let_go.set()
        if self._listener is not None:
            self._listener.close()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _relay(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        server_in, server_out = await asyncio.open_unix_connection(str(self._server_socket))
        for pump in (
            self._to_server(client_in, server_out),
            self._to_client(server_in, client_out),
        ):
            task = asyncio.create_task(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    @staticmethod
    async def _to_server(client_in: asyncio.StreamReader, server_out: asyncio.StreamWriter) -> None:
        try:
            while data := await client_in.read(65536):
                server_out.write(data)
                await server_out.drain()
        except OSError:
            pass  # the server hung up: what the client sends now goes nowhere
        finally:
            server_out.close()

    async def _to_client(
        self, server_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await server_in.read(65536):
                client_out.write(data)
                await client_out.drain()
            self.hung_up.set()
            await self.let_go.wait()
        finally:
            client_out.close()


@pytest.fixture
async def held(postgres: EmbeddedPostgres) -> AsyncIterator[HangUpHeld]:
    directory = server_scratch_dir("profiles-relay-")
    relay = HangUpHeld(postgres.socket_dir / SOCKET_NAME, directory)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("statement", ["a transaction's BEGIN", "a prepared statement"])
async def test_a_statement_started_as_the_server_hangs_up_is_a_lost_connection(
    postgres: EmbeddedPostgres, database: str, held: HangUpHeld, statement: str
) -> None:
    pool = await create_pool(_url(held.directory, database), max_size=1)
    admin = await asyncpg.connect(_url(postgres.socket_dir, database))
    try:
        await pool.fetchval("SELECT $1::int", 1)  # now prepared on the pool's one connection
        backend = await pool.fetchval("SELECT pg_backend_pid()")
        # Ended as the postmaster's death ends it: a FATAL error, then the close (held back).
        assert await admin.fetchval("SELECT pg_terminate_backend($1, 10000)", backend)
        async with asyncio.timeout(HANG_GUARD_S):
            await held.hung_up.wait()
        # Lets the event loop read the error, already in the pool connection's socket.
        await asyncio.sleep(0.05)

        async def next_statement() -> None:
            if statement == "a prepared statement":
                await pool.fetchval("SELECT $1::int", 2)
                return
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT 1")

        with pytest.raises(asyncpg.exceptions.InternalClientError) as raised:
            await next_statement()

        assert "another operation (2) is in progress" in str(raised.value)
        assert connection_lost(raised.value)  # UNAVAILABLE, not INTERNAL
        assert dependency_unavailable(raised.value)  # a bus handler spends no delivery
        held.let_go.set()
        assert await pool.fetchval("SELECT $1::int", 3) == 3  # on a new connection
    finally:
        await admin.close()
        await pool.close()


async def test_two_statements_at_once_on_one_connection_stay_a_bug(
    postgres: EmbeddedPostgres, database: str
) -> None:
    """Our own misuse of a connection is not taken for the database being away."""
    conn = await asyncpg.connect(_url(postgres.socket_dir, database))
    try:
        first, second = await asyncio.gather(
            conn.fetchval("SELECT pg_sleep(0.2)"), conn.fetchval("SELECT 1"), return_exceptions=True
        )
    finally:
        await conn.close()
    assert first is None
    assert isinstance(second, asyncpg.InterfaceError)
    assert not connection_lost(second)


@pytest.mark.parametrize(
    "message",
    [
        "cannot switch to state 12; another operation (15) is in progress",
        "waiter is not done while handling critical protocol error",
        "unknown error in protocol implementation",
    ],
)
def test_other_internal_client_errors_stay_a_bug(message: str) -> None:
    assert not connection_lost(asyncpg.exceptions.InternalClientError(message))


async def test_a_statement_past_its_bound_is_cancelled_and_its_transaction_rolled_back(
    postgres: EmbeddedPostgres, database: str
) -> None:
    """On a live server: the statement is cancelled there, the connection serves on."""
    pool = await create_pool(_url(postgres.socket_dir, database), max_size=1, bounds=SHORT)
    try:
        await pool.execute("CREATE TABLE kept (value text)")
        # Background work (no RPC) is not bounded: a statement longer than SHORT's bounds.
        assert await pool.fetchval("SELECT 1 FROM pg_sleep(1.5)") == 1

        async def insert_then_sleep() -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("INSERT INTO kept VALUES ('half')")
                await conn.execute("SELECT pg_sleep(60)")

        bound_statements(SHORT.read_statement_s)  # as the interceptor does for a call
        try:
            with pytest.raises(TimeoutError) as raised:
                await insert_then_sleep()
        finally:
            bound_statements(None)

        assert connection_lost(raised.value)  # UNAVAILABLE
        assert await pool.fetchval("SELECT count(*) FROM kept") == 0
        active = """
            SELECT count(*) FROM pg_stat_activity
            WHERE state = 'active' AND query LIKE 'SELECT pg_sleep(60)%'"""
        assert await pool.fetchval(active) == 0  # cancelled, not left running
    finally:
        await pool.close()


async def test_waits_on_a_hung_server_are_bounded_and_apply_nothing(
    postgres: EmbeddedPostgres, database: str
) -> None:
    url = _url(postgres.socket_dir, database)
    pool = await create_pool(url, max_size=2, bounds=SHORT)
    try:
        await pool.execute("CREATE TABLE kept (value text)")

        async def insert_then_hang() -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("INSERT INTO kept VALUES ('half')")
                _freeze(postgres)
                await conn.execute("INSERT INTO kept VALUES ('other half')")

        bound_statements(SHORT.read_statement_s)  # as the interceptor does for a call
        try:
            with pytest.raises(TimeoutError) as statement:
                await insert_then_hang()
            # Its connection is gone; a new one is never answered.
            with pytest.raises(NoConnectionInTime) as acquire:
                await pool.fetchval("SELECT 1")
        finally:
            bound_statements(None)
            _resume(postgres)

        assert connection_lost(statement.value)
        assert connection_lost(acquire.value)
        assert dependency_unavailable(acquire.value)
        assert await pool.fetchval("SELECT count(*) FROM kept") == 0
    finally:
        await pool.close()


async def test_a_read_on_a_hung_database_answers_unavailable_then_serves_again(
    postgres: EmbeddedPostgres,
    database: str,
    redis_url: str,
    redis_prefix: str,
    start_services: Any,
) -> None:
    url = _url(postgres.socket_dir, database)
    await migrate(url)
    project = await create_test_project(url)
    settings = Settings(
        database_url=url,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        internal_token=f"internal-{uuid.uuid4().hex}",
        db_pool_size=3,
        shutdown_grace_seconds=5.0,
    )
    channel = (await start_services("query", settings=settings, bounds=SHORT))["query"].channel
    stub = pb_grpc.QueryServiceStub(channel)
    metadata = project.metadata("read")
    await stub.ListProfiles(pb.ListProfilesRequest(), metadata=metadata, timeout=10)

    _freeze(postgres)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            # No deadline, as grpcurl sends it: the server's own bound for a read applies.
            await stub.ListProfiles(pb.ListProfilesRequest(), metadata=metadata)
    finally:
        _resume(postgres)

    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert violations(raised.value)[0] == "DATABASE_UNAVAILABLE"

    async def serves() -> bool:
        try:
            await stub.ListProfiles(pb.ListProfilesRequest(), metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as error:
            if error.code() is not grpc.StatusCode.UNAVAILABLE:
                raise
            return False
        return True

    await eventually(serves, within=30)
