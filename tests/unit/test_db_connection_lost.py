"""Which driver errors mean the database is gone for now (UNAVAILABLE), not a bug (INTERNAL)."""

from __future__ import annotations

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
