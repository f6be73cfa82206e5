"""The periodic worker that closes sessions left without an end."""

from __future__ import annotations

import asyncio

import asyncpg
import structlog

from services.ingest.errors import StorageUnavailable
from services.ingest.repository import TransactionConflict
from services.ingest.service import IngestService
from shared.bus import sleep_unless

log = structlog.get_logger(__name__)

# A session is closed at most this long after it became idle for 30 minutes.
SWEEP_INTERVAL_S = 30.0


class SessionSweeper:
    """Every `interval_s`, closes the sessions idle for over 30 minutes by the service's clock
    (IngestService.close_idle_sessions). Failures are logged and retried at the next round."""

    def __init__(self, service: IngestService, interval_s: float = SWEEP_INTERVAL_S) -> None:
        self._service = service
        self._interval_s = interval_s
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                await self._service.close_idle_sessions()
            except (StorageUnavailable, TransactionConflict, asyncpg.PostgresError) as exc:
                log.warning("session_sweep_failed", error=type(exc).__name__)
            await sleep_unless(self._stop, self._interval_s)

    async def stop(self) -> None:
        self._stop.set()
