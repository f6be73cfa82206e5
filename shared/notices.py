"""Live notices (ProfileChanged on a profile's pub/sub channel), published after commit.

Best effort by contract: a watcher may miss notices. So an RPC never waits for Redis: it hands
its notices to a bounded queue and returns; `NoticeWorker` publishes them in order, up to
`PUBLISH_BATCH` per round trip. When the queue is full (Redis slow or down) new notices are
dropped and counted, never buffered without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter
from redis.exceptions import RedisError, SlotNotCoveredError

from profiles.common.v1 import bus_pb2
from shared.bus import Backoff, Bus, sleep_unless
from shared.topics import profile_channel

QUEUE_SIZE = 10_000
PUBLISH_TIMEOUT_S = 2.0
# One TrackEvents batch queues a notice per touched profile: publish what is queued together.
PUBLISH_BATCH = 500

NOTICES_DROPPED = Counter(
    "profiles_live_notices_dropped_total",
    "ProfileChanged notices not published (queue full or Redis unavailable), by service.",
    ["service", "reason"],
)


@dataclass(frozen=True, slots=True)
class SerializedNotice:
    """A ProfileChanged already serialized, with what names its channel: a service that builds
    many notices from bytes it has (ingest, from its events) queues these instead of messages."""

    project_id: str
    profile_id: str
    data: bytes


Notice = bus_pb2.ProfileChanged | SerializedNotice


class LiveNotices:
    """The queue between the RPCs and the publishing worker."""

    def __init__(self, service: str, size: int = QUEUE_SIZE) -> None:
        self.service = service
        self.queue: asyncio.Queue[Notice] = asyncio.Queue(maxsize=size)

    def offer(self, notices: Sequence[Notice]) -> None:
        """Queues the notices without waiting; drops those that do not fit."""
        for notice in notices:
            try:
                self.queue.put_nowait(notice)
            except asyncio.QueueFull:
                NOTICES_DROPPED.labels(self.service, "queue_full").inc()


class NoticeWorker:
    """Publishes queued notices; on a Redis failure drops that batch and backs off, so an outage
    costs missed notices, not memory."""

    def __init__(self, notices: LiveNotices, bus: Bus) -> None:
        self._notices = notices
        self._bus = bus
        self._stop = asyncio.Event()
        self._backoff = Backoff(
            "live_notice_redis_unavailable", initial=0.1, maximum=5.0, service=notices.service
        )

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
            batch = [getter.result()]
            while len(batch) < PUBLISH_BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                    await self._publish(batch)
                self._backoff.recovered()
            except (RedisError, SlotNotCoveredError, OSError, TimeoutError) as exc:
                NOTICES_DROPPED.labels(self._notices.service, "redis_unavailable").inc(len(batch))
                await sleep_unless(self._stop, self._backoff.failed(exc))

    async def _publish(self, notices: Sequence[Notice]) -> None:
        await self._bus.notify_many(
            [
                (
                    profile_channel(n.project_id, n.profile_id),
                    n.data if isinstance(n, SerializedNotice) else n,
                )
                for n in notices
            ]
        )

    async def stop(self) -> None:
        self._stop.set()
