"""Live notices (ProfileChanged on a profile's pub/sub channel), published after commit.

Best effort by contract: a watcher may miss notices. So the RPC never waits for Redis: it hands
the notices to a bounded queue and returns; `NoticeWorker` publishes them, one at a time and in
order (a merge's target before its source, see messages.merge_notices). When the queue is full
(Redis slow or down) new notices are dropped and counted, never buffered without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog
from prometheus_client import Counter
from redis.exceptions import RedisError

from profiles.common.v1 import bus_pb2
from shared.bus import Backoff, Bus, sleep_unless
from shared.topics import profile_channel

log = structlog.get_logger(__name__)

QUEUE_SIZE = 10_000
PUBLISH_TIMEOUT_S = 2.0

NOTICES_DROPPED = Counter(
    "profiles_identity_notices_dropped_total",
    "ProfileChanged notices of identity not published (queue full or Redis unavailable).",
    ["reason"],
)


class LiveNotices:
    """The queue between the RPCs and the publishing worker."""

    def __init__(self, size: int = QUEUE_SIZE) -> None:
        self.queue: asyncio.Queue[bus_pb2.ProfileChanged] = asyncio.Queue(maxsize=size)

    def offer(self, notices: Sequence[bus_pb2.ProfileChanged]) -> None:
        """Queues the notices without waiting; drops those that do not fit."""
        for notice in notices:
            try:
                self.queue.put_nowait(notice)
            except asyncio.QueueFull:
                NOTICES_DROPPED.labels("queue_full").inc()


class NoticeWorker:
    """Publishes queued notices with `Bus.notify`; on a Redis failure drops the notice and backs
    off, so an outage costs missed notices, not memory."""

    def __init__(self, notices: LiveNotices, bus: Bus) -> None:
        self._notices = notices
        self._bus = bus
        self._stop = asyncio.Event()
        self._backoff = Backoff("identity_notice_redis_unavailable", initial=0.1, maximum=5.0)

    async def run(self) -> None:
        queue = self._notices.queue
        while not self._stop.is_set():
            getter = asyncio.ensure_future(queue.get())
            stopper = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait((getter, stopper), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                if not getter.done():
                    getter.cancel()
            if not getter.done() or getter.cancelled():
                continue
            notice = getter.result()
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                    await self._bus.notify(
                        profile_channel(notice.project_id, notice.profile_id), notice
                    )
                self._backoff.recovered()
            except (RedisError, OSError, TimeoutError) as exc:
                NOTICES_DROPPED.labels("redis_unavailable").inc()
                await sleep_unless(self._stop, self._backoff.failed(exc))

    async def stop(self) -> None:
        self._stop.set()
