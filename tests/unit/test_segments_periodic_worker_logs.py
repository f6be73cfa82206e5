"""A periodic worker of segments logs a database outage as a warning (the next round retries it)
and anything else as an error with its traceback."""

from __future__ import annotations

import asyncio
import socket

import asyncpg
import pytest
from structlog.testing import capture_logs

from services.segments.consumers import PeriodicWorker


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Failing(PeriodicWorker):
    failure_event = "test_periodic_failed"

    def __init__(self, error: type[Exception] | None) -> None:
        super().__init__(interval_s=60)
        self._error = error

    async def tick(self) -> None:
        await self.stop()  # one round
        if self._error is None:
            # A real refused connection, as asyncpg raises it while the database is down.
            await asyncpg.connect(host="127.0.0.1", port=_closed_port(), timeout=5)
        raise self._error("a bug")


async def _levels(worker: PeriodicWorker) -> list[tuple[str, bool]]:
    with capture_logs() as logs:
        await asyncio.wait_for(worker.run(), 30)
    return [(e["log_level"], "exc_info" in e) for e in logs if e["event"] == "test_periodic_failed"]


@pytest.mark.asyncio
async def test_an_outage_is_a_warning_without_traceback() -> None:
    assert await _levels(_Failing(None)) == [("warning", False)]


@pytest.mark.asyncio
async def test_a_bug_is_an_error_with_its_traceback() -> None:
    assert await _levels(_Failing(ValueError)) == [("error", True)]
