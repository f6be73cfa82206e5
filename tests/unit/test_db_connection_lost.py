"""Which driver errors mean the database is gone for now (UNAVAILABLE), not a bug (INTERNAL)."""

from __future__ import annotations

import socket
from pathlib import Path

import asyncpg
import pytest

from shared.db import connection_lost


def _raised_from(cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.TooManyConnectionsError("too many clients"),
        asyncpg.InterfaceError("pool is closing"),
        asyncpg.InterfaceError("cannot perform operation: connection is closed"),
        ConnectionResetError(),
        ConnectionRefusedError(),
    ],
)
def test_a_lost_or_refused_connection_is_transient_even_when_wrapped(error: Exception) -> None:
    assert connection_lost(error)
    assert connection_lost(_raised_from(error))


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.UniqueViolationError("duplicate key"),
        asyncpg.InterfaceError("the server expects 2 arguments, 1 was passed"),
        RuntimeError("a bug"),
    ],
)
def test_other_errors_are_not(error: Exception) -> None:
    assert not connection_lost(error)


async def test_a_server_gone_from_its_socket_or_host_is_lost_when_asyncpg_meets_it(
    tmp_path: Path,
) -> None:
    """A server stopped cleanly removes its Unix socket (FileNotFoundError on connect); a host
    name that stops resolving fails with socket.gaierror. Both come from asyncpg's connect."""
    cases: list[tuple[str, type[OSError]]] = [
        (f"postgresql:///db?host={tmp_path}&port=5999", FileNotFoundError),  # no socket there
        ("postgresql://user@no-such-host.invalid:5432/db", socket.gaierror),
    ]
    for dsn, kind in cases:
        with pytest.raises(kind) as raised:
            await asyncpg.connect(dsn, timeout=10)
        assert connection_lost(raised.value)
        assert connection_lost(_raised_from(raised.value))


def test_the_same_os_errors_from_other_code_are_not() -> None:
    for error in (FileNotFoundError(2, "No such file or directory"), socket.gaierror(-2, "x")):
        assert not connection_lost(_raised_from(error))
