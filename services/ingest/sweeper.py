"""Closing the sessions left without an end: one sweep (close_idle_sessions) and the periodic
worker that runs it."""

from __future__ import annotations

import asyncio
import uuid
from uuid import UUID

import asyncpg
import structlog

from profiles.common.v1 import bus_pb2
from services.ingest import model
from services.ingest.errors import StorageUnavailable
from services.ingest.messages import timeout_end
from services.ingest.repository import IngestRepository, TransactionConflict
from shared.bus import sleep_unless
from shared.clock import Clock
from shared.convert import set_timestamp
from shared.outbox import OutboxItem, enqueue_many
from shared.topics import EVENTS

log = structlog.get_logger(__name__)

# A session is closed at most this long after it became idle for 30 minutes.
SWEEP_INTERVAL_S = 30.0
SWEEP_BATCH_SIZE = 500


class SessionSweeper:
    """Every `interval_s`, closes the sessions idle for over 30 minutes by the clock
    (close_idle_sessions). Failures are logged and retried at the next round."""

    def __init__(
        self,
        repository: IngestRepository,
        clock: Clock,
        interval_s: float = SWEEP_INTERVAL_S,
    ) -> None:
        self._repository = repository
        self._clock = clock
        self._interval_s = interval_s
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.close_idle_sessions()
            except (StorageUnavailable, TransactionConflict, asyncpg.PostgresError) as exc:
                log.warning("session_sweep_failed", error=type(exc).__name__)
            await sleep_unless(self._stop, self._interval_s)

    async def stop(self) -> None:
        self._stop.set()

    async def close_idle_sessions(self, batch_size: int = SWEEP_BATCH_SIZE) -> int:
        """Closes every open session idle for over 30 minutes (by the clock), at its last
        activity with the duration seen so far, and publishes a session end for each through
        the outbox (EventsIngested), for segments. Returns how many were closed. Safe to run
        concurrently. No live notice: the idle end is no stored event (the timeline never shows
        it), and a live feed shows stored events only, as a reload does."""
        now = self._clock.now()
        total = 0
        while True:
            async with self._repository.transaction() as conn:
                closed = await self._repository.close_idle_sessions(
                    conn, now - model.SESSION_TIMEOUT, batch_size
                )
                messages: dict[UUID, bus_pb2.EventsIngested] = {}
                for session in closed:
                    message = messages.get(session.project_id)
                    if message is None:
                        message = messages[session.project_id] = bus_pb2.EventsIngested(
                            project_id=str(session.project_id), batch_id=str(uuid.uuid4())
                        )
                        set_timestamp(message.commit_time, now)
                    message.events.append(timeout_end(session, now))
                await enqueue_many(
                    conn, [OutboxItem(p, EVENTS, m) for p, m in sorted(messages.items())]
                )
            total += len(closed)
            if len(closed) < batch_size:
                if total:
                    log.info("sessions_closed_idle", count=total)
                return total
