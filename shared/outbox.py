"""The transactional outbox: bus messages written with the data they describe, published later.

A service calls `enqueue` inside its own transaction; the rows become visible (and the relay is
woken by NOTIFY) only when that transaction commits, so a rolled-back change never announces
itself. `OutboxRelay` moves committed rows to the Redis bus and deletes them in one transaction of
its own: while Redis is away the rows simply stay, so an outage delays messages and never loses
them. A crash between XADD and COMMIT publishes a batch twice; consumers are idempotent.

Several relays may run (one per service process): `FOR UPDATE SKIP LOCKED` hands each row to one
of them. Order is kept within one relay's batch, not across relays.

Every relay also trims its topics' streams by time every `trim_interval_s` (Bus.trim_expired): a
stream nobody publishes to still loses its old entries, and with several relays a trim only
finds less to do.

What an operator watches: `profiles_outbox_backlog` (counted in PostgreSQL every
`metrics_interval_s`, also while Redis is away, when it is the number that grows) and
`profiles_outbox_redis_up` (whether this relay last reached Redis: a publish, or a PING when it
had nothing to publish).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg
import structlog
from google.protobuf.message import Message
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError, SlotNotCoveredError

from shared.bus import Backoff, Bus, Envelope, Topic, sleep_unless

log = structlog.get_logger(__name__)

NOTIFY_CHANNEL = "profiles_outbox"

# One statement for the rows and the wake-up: a data-modifying CTE always runs to completion,
# and pg_notify() inside a transaction is delivered only at COMMIT (and not at all on rollback),
# so the relay never wakes for rows it cannot see. Identical notifications of one transaction
# are folded into one by PostgreSQL, so a batch costs one notice.
INSERT_OUTBOX = """
    WITH inserted AS (
        INSERT INTO outbox (project_id, topic, kind, payload, profile_id)
        SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::uuid[])
        RETURNING 1
    )
    SELECT pg_notify('profiles_outbox', '')"""

# Many messages of one project, topic and kind, already serialized: only their payloads and
# profiles vary (a new segment's entries), so the rest is not sent once per row.
INSERT_OUTBOX_SERIALIZED = """
    WITH inserted AS (
        INSERT INTO outbox (project_id, topic, kind, payload, profile_id)
        SELECT $1, $2, $3, p.payload, p.profile_id
        FROM unnest($4::bytea[], $5::uuid[]) AS p(payload, profile_id)
        RETURNING 1
    )
    SELECT pg_notify('profiles_outbox', '')"""

# The relay serves every project, so unlike tenant statements it does not filter on project_id.
# Oldest first (outbox_by_id index) so messages leave roughly in commit order; SKIP LOCKED lets
# several relays take disjoint batches instead of queueing behind each other's locks.
SELECT_BATCH = """
    SELECT project_id, outbox_id, topic, kind, payload
    FROM outbox
    ORDER BY outbox_id
    LIMIT $1
    FOR UPDATE SKIP LOCKED"""

# By outbox_id alone (unique: an identity column) through outbox_by_id; the rows are still
# locked by this transaction, so nobody else can have published or deleted them meanwhile.
DELETE_BATCH = "DELETE FROM outbox WHERE outbox_id = ANY($1::bigint[])"

# Exact count for the backlog gauge; run every metrics interval, not every round, because a
# long Redis outage can grow the table to millions of rows.
COUNT_BACKLOG = "SELECT count(*) FROM outbox"

# Redis away, refusing (OOM, MISCONF), too slow (asyncio.timeout's TimeoutError) or a cluster
# without an owner for a slot during a failover: all mean "not published yet", so the rows stay
# and the relay tries again later.
REDIS_FAILURES: tuple[type[Exception], ...] = (RedisError, TimeoutError, SlotNotCoveredError)

# A database that fails the backlog's count while Redis is away: left to the next round, which
# meets it and backs off (a relay's round starts with the database).
DATABASE_FAILURES: tuple[type[Exception], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
)

OUTBOX_BACKLOG = Gauge("profiles_outbox_backlog", "Outbox rows waiting to be published.")
OUTBOX_REDIS_UP = Gauge(
    "profiles_outbox_redis_up",
    "1 when this process's outbox relay last reached Redis (a publish, or a PING when it had"
    " nothing to publish, every metrics interval), 0 when it last failed to.",
)
OUTBOX_PUBLISHED = Counter(
    "profiles_outbox_published_total", "Outbox rows published to the bus.", ["topic"]
)
OUTBOX_DEAD_LETTERED = Counter(
    "profiles_outbox_dead_lettered_total",
    "Outbox rows of an unknown topic or kind, moved straight to a dead-letter stream.",
    ["topic", "reason"],
)


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One message to enqueue; `profile_id` lets an erasure purge it while it waits."""

    project_id: UUID | str
    topic: Topic
    message: Message
    profile_id: UUID | str | None = None


async def enqueue(
    conn: asyncpg.Connection,
    project_id: UUID | str,
    topic: Topic,
    message: Message,
    *,
    profile_id: UUID | str | None = None,
) -> None:
    """Adds one message to the outbox in the caller's open transaction.

    Raises ValueError if the topic does not carry the message's kind and RuntimeError if no
    transaction is open (a message committed apart from its data is what the outbox prevents).
    """
    await enqueue_many(conn, [OutboxItem(project_id, topic, message, profile_id)])


async def enqueue_many(conn: asyncpg.Connection, items: Sequence[OutboxItem]) -> None:
    """Adds several messages in one statement; same rules as `enqueue`."""
    if not items:
        return
    if not conn.is_in_transaction():
        raise RuntimeError("outbox messages must be enqueued inside the data's transaction")
    kinds = [item.topic.kind_of(item.message) for item in items]
    await conn.execute(
        INSERT_OUTBOX,
        [item.project_id for item in items],
        [item.topic.name for item in items],
        kinds,
        [item.message.SerializeToString() for item in items],
        [item.profile_id for item in items],
    )


async def enqueue_serialized(
    conn: asyncpg.Connection,
    project_id: UUID | str,
    topic: Topic,
    kind: str,
    payloads: Sequence[bytes],
    profile_ids: Sequence[UUID | str],
) -> None:
    """Adds messages of one kind already serialized, each with its profile, in one statement;
    same rules as `enqueue`. For many messages that differ only by profile, built without a
    message object each (services/segments/messages.py, entries_to_bus)."""
    if not payloads:
        return
    if topic.message_class(kind) is None:
        raise ValueError(f"topic {topic.name} does not carry {kind}")
    if len(payloads) != len(profile_ids):
        raise ValueError("one profile per payload")
    if not conn.is_in_transaction():
        raise RuntimeError("outbox messages must be enqueued inside the data's transaction")
    await conn.execute(
        INSERT_OUTBOX_SERIALIZED, project_id, topic.name, kind, payloads, profile_ids
    )


class OutboxRelay:
    """Publishes committed outbox rows to the bus and deletes them; run one per process."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        bus: Bus,
        topics_by_name: Mapping[str, Topic],
        *,
        batch_size: int = 500,
        poll_interval_s: float = 1.0,
        publish_timeout_s: float = 10.0,
        metrics_interval_s: float = 10.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        trim_interval_s: float = 60.0,
    ) -> None:
        self._pool = pool
        self._bus = bus
        self._topics = dict(topics_by_name)
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._publish_timeout_s = publish_timeout_s
        self._metrics_interval_s = metrics_interval_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._listener: Any = None  # a pool connection held for LISTEN
        self._next_metrics = 0.0
        self._trim_interval_s = trim_interval_s
        self._next_trim = 0.0

    def stop(self) -> None:
        """Asks `run()` to return once the current batch is published (or rolled back)."""
        self._stop.set()

    async def run(self) -> None:
        """Relays until `stop()`: at once on NOTIFY, else every `poll_interval_s`."""
        self._stop.clear()
        redis_backoff = self._backoff("outbox_relay_redis_unavailable")
        db_backoff = self._backoff("outbox_relay_database_unavailable")
        log.info("outbox_relay_started")
        try:
            while not self._stop.is_set():
                # First, so that a database outage (which fails the rest of the round) does not
                # hold up the trims; it catches Redis's errors itself.
                await self._trim_if_due()
                try:
                    await self._listen()
                    # Cleared before the SELECT: a commit landing during this round sets it
                    # again, so the wait below returns at once instead of missing those rows.
                    self._wake.clear()
                    published = await self.relay_batch()
                    db_backoff.recovered()
                    if published:
                        self._reached_redis(redis_backoff)
                    if self._metrics_due():
                        if not published:
                            # An empty round did not talk to Redis: without a PING an idle
                            # relay would report a Redis it has no news of.
                            await self._ping_redis()
                            self._reached_redis(redis_backoff)
                        await self.update_metrics()
                    if published < self._batch_size:
                        await self._wait_for_rows()
                except REDIS_FAILURES as exc:
                    OUTBOX_REDIS_UP.set(0)
                    delay = redis_backoff.failed(exc)
                    # The backlog is counted in PostgreSQL, so it stays current while Redis is
                    # away: its growth is what an operator alerts on (docs/running.md).
                    await self._update_metrics_without_redis()
                    await sleep_unless(self._stop, delay)
                except DATABASE_FAILURES as exc:
                    await self._unlisten()
                    await sleep_unless(self._stop, db_backoff.failed(exc))
                except Exception:
                    # A bug here must not stop the relay for good; log it and go on slowly.
                    log.exception("outbox_relay_failed")
                    await sleep_unless(self._stop, self._backoff_max_s)
        finally:
            await self._unlisten()
            log.info("outbox_relay_stopped")

    async def relay_batch(self) -> int:
        """Publishes and deletes up to `batch_size` of the oldest unlocked rows; returns how many.

        Raises what Redis or PostgreSQL raise; the rows then stay for the next attempt.
        """
        # The publish happens inside the transaction on purpose: the row locks are what keep
        # two relays from publishing the same row, and a failed publish rolls back to "still
        # waiting". The timeout keeps those locks short even if Redis hangs.
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(SELECT_BATCH, self._batch_size)
            if not rows:
                return 0
            batches, orphans = self._sort_rows(rows)
            async with asyncio.timeout(self._publish_timeout_s):
                await self._bus.publish_batches(batches)
                for topic_name, envelope, reason in orphans:
                    await self._bus.dead_letter(topic_name, envelope.fields(), reason)
            await conn.execute(DELETE_BATCH, [row["outbox_id"] for row in rows])
        for topic, envelopes in batches:
            OUTBOX_PUBLISHED.labels(topic.name).inc(len(envelopes))
        for topic_name, _, reason in orphans:
            OUTBOX_DEAD_LETTERED.labels(topic_name, reason).inc()
        log.debug("outbox_batch_published", count=len(rows), dead_lettered=len(orphans))
        return len(rows)

    def _sort_rows(
        self, rows: Sequence[asyncpg.Record]
    ) -> tuple[list[tuple[Topic, list[Envelope]]], list[tuple[str, Envelope, str]]]:
        """Groups rows by topic, keeping order; rows no topic here carries become orphans.

        Orphans come from a newer version during a rolling deploy (or a bug). They go to the
        topic's dead-letter stream rather than staying: left in place they would fill every
        batch of this relay and stall the rest of the outbox.
        """
        batches: dict[str, tuple[Topic, list[Envelope]]] = {}
        orphans: list[tuple[str, Envelope, str]] = []
        for row in rows:
            envelope = Envelope(
                str(row["project_id"]), row["kind"], row["payload"], str(row["outbox_id"])
            )
            topic = self._topics.get(row["topic"])
            if topic is None:
                orphans.append((row["topic"], envelope, "unknown_topic"))
            elif topic.message_class(envelope.kind) is None:
                orphans.append((row["topic"], envelope, "unknown_kind"))
            else:
                batches.setdefault(topic.name, (topic, []))[1].append(envelope)
        return list(batches.values()), orphans

    async def flush(self, timeout_s: float) -> bool:
        """Publishes what is waiting now, retrying Redis errors, for at most `timeout_s` seconds.

        For graceful shutdown, after `stop()` and the end of `run()`. Returns True when no
        unlocked row was left, False when the time ran out first.
        """
        backoff = self._backoff("outbox_flush_redis_unavailable")
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    try:
                        if await self.relay_batch() < self._batch_size:
                            return True
                    except REDIS_FAILURES as exc:
                        await asyncio.sleep(backoff.failed(exc))
        except TimeoutError:
            log.warning("outbox_flush_incomplete", timeout_s=timeout_s)
            return False

    async def update_metrics(self) -> int:
        """Sets the backlog gauge; returns the number of rows waiting."""
        async with self._pool.acquire() as conn:
            backlog = int(await conn.fetchval(COUNT_BACKLOG))
        OUTBOX_BACKLOG.set(backlog)
        self._next_metrics = time.monotonic() + self._metrics_interval_s
        return backlog

    def _metrics_due(self) -> bool:
        return time.monotonic() >= self._next_metrics

    async def _update_metrics_without_redis(self) -> None:
        """The backlog gauge, when due, in a round Redis failed; never raises what the database
        raises (the next round meets it and backs off)."""
        if not self._metrics_due():
            return
        with contextlib.suppress(*DATABASE_FAILURES):
            await self.update_metrics()

    async def _ping_redis(self) -> None:
        """Raises what Redis raises, within the publish timeout (a stopped Redis never
        answers)."""
        async with asyncio.timeout(self._publish_timeout_s):
            await self._bus.redis.ping()

    @staticmethod
    def _reached_redis(backoff: Backoff) -> None:
        backoff.recovered()
        OUTBOX_REDIS_UP.set(1)

    async def _trim_if_due(self) -> None:
        """Trims the streams by time when due. A failed trim is logged and tried again at the
        next interval: it never raises, so it never holds up publishing (a Redis that refuses
        EVAL, or XTRIM MINID before 6.2, would otherwise stall the outbox)."""
        if time.monotonic() < self._next_trim:
            return
        self._next_trim = time.monotonic() + self._trim_interval_s
        try:
            async with asyncio.timeout(self._publish_timeout_s):
                await self._bus.trim_expired(self._topics.values())
        except REDIS_FAILURES as exc:
            log.warning("outbox_relay_trim_failed", error=type(exc).__name__)
        except Exception:
            # Outside the round's error handling: a bug here must not end the relay.
            log.exception("outbox_relay_trim_failed")

    async def _wait_for_rows(self) -> None:
        """Returns on NOTIFY, on stop, or after the poll interval (NOTIFY is only a hint)."""
        stop_wait = asyncio.ensure_future(self._stop.wait())
        wake_wait = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait(
                (stop_wait, wake_wait),
                timeout=self._poll_interval_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stop_wait.cancel()
            wake_wait.cancel()

    async def _listen(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        await self._unlisten()
        conn = await self._pool.acquire()
        try:
            await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
        except BaseException:
            await self._pool.release(conn)
            raise
        self._listener = conn

    async def _unlisten(self) -> None:
        conn, self._listener = self._listener, None
        if conn is None:
            return
        try:
            if not conn.is_closed():
                await conn.remove_listener(NOTIFY_CHANNEL, self._on_notify)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            pass  # the connection is broken anyway; the pool replaces it
        finally:
            await self._pool.release(conn)

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    def _backoff(self, event: str) -> Backoff:
        return Backoff(event, initial=self._backoff_initial_s, maximum=self._backoff_max_s)
