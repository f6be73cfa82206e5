"""The bus retention on a real Redis: streams and dead letters trimmed by Redis's clock, groups
told what they lost, consumers that find their pending entries trimmed, the relay's periodic
trim, the setting, and the embedded Redis's append-only file losing what was trimmed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import asyncpg
import pytest
from google.protobuf.message import Message
from prometheus_client import REGISTRY
from redis.exceptions import NoPermissionError

from profiles.diagnostics.v1.diagnostics_service_pb2 import EchoRequest
from shared.bus import DEFAULT_RETENTION_MS, TRIM_STEP_LIMIT, Bus, Consumer, Envelope, Topic
from shared.db import create_pool
from shared.embedded import EmbeddedRedis
from shared.outbox import OutboxRelay, enqueue
from shared.project_settings import InvalidSettingValue, validate_setting
from shared.settings import SettingInvalid, Settings
from shared.topics import SEGMENT_CHANGES, SEGMENT_CHANGES_KEPT_DAYS

ECHO = Topic("echo", (EchoRequest,))
PROJECT = str(uuid4())
DAY_MS = 24 * 3_600_000
FAST = {
    "block_ms": 50,
    "claim_idle_ms": 150,
    "claim_interval_s": 0.05,
    "backoff_initial_s": 0.02,
    "backoff_max_s": 0.2,
}


def echo(n: int) -> Envelope:
    return Envelope.of(ECHO, PROJECT, EchoRequest(payload=str(n).encode()), message_id=str(n))


@contextlib.asynccontextmanager
async def a_bus(redis_url: str, prefix: str, **options: Any) -> AsyncIterator[Bus]:
    bus = Bus.from_url(redis_url, prefix, **options)
    try:
        yield bus
    finally:
        await bus.aclose()


async def redis_ms(bus: Bus) -> int:
    seconds, micros = await bus.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def millis(entry_id: str | bytes) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-")[0])


async def ids(bus: Bus, key: str) -> list[str]:
    return [entry_id.decode() for entry_id, _ in await bus.redis.xrange(key)]


async def add_at(bus: Bus, key: str, at_ms: int, payload: bytes = b"x") -> str:
    """An entry with an explicit ID of that time (Redis's clock): a message of days ago."""
    fields: dict[Any, Any] = {b"kind": b"k", b"data": payload, b"project": b"p", b"id": b""}
    return (await bus.redis.xadd(key, fields, id=f"{at_ms}-0")).decode()


async def wait_for_redis_clock(bus: Bus, after_ms: int, eventually: Any) -> None:
    """Waits until Redis's clock (not ours) is past `after_ms`."""

    async def past() -> bool:
        return await redis_ms(bus) > after_ms

    await eventually(past, message=f"Redis's clock past {after_ms}")


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_entries_older_than_the_retention_leave_the_stream_and_its_dead_letters(
    redis_url: str, redis_prefix: str, eventually: Any
) -> None:
    async with a_bus(redis_url, redis_prefix, retention_ms=1000) as bus:
        old = await bus.publish(ECHO, [echo(n) for n in range(3)])
        await bus.dead_letter(ECHO.name, echo(9).fields(), "handler_failed")
        old_dead = await ids(bus, bus.dead_key(ECHO.name))
        await wait_for_redis_clock(bus, max(map(millis, old + old_dead)) + 1000, eventually)
        new = await bus.publish(ECHO, [echo(3)])
        await bus.dead_letter(ECHO.name, echo(10).fields(), "handler_failed")
        new_dead = [i for i in await ids(bus, bus.dead_key(ECHO.name)) if i not in old_dead]
        before = sample("profiles_bus_entries_expired_total", topic="echo", stream="stream")

        removed = await bus.trim_expired([ECHO])

        # The old entries share a stream node with the new one (small entries): an
        # approximate trim alone, which frees whole nodes only, would have left them.
        assert removed == 4
        assert await ids(bus, bus.stream_key(ECHO.name)) == new
        assert await ids(bus, bus.dead_key(ECHO.name)) == new_dead
        after = sample("profiles_bus_entries_expired_total", topic="echo", stream="stream")
        assert after - before == 3
        assert await bus.trim_expired([ECHO]) == 0


async def test_the_default_retention_is_a_week_by_the_entry_ids(
    redis_url: str, redis_prefix: str
) -> None:
    async with a_bus(redis_url, redis_prefix) as bus:
        assert bus.retention_ms == DEFAULT_RETENTION_MS == 7 * DAY_MS
        now = await redis_ms(bus)
        stream, dead = bus.stream_key(ECHO.name), bus.dead_key(ECHO.name)
        await add_at(bus, stream, now - 8 * DAY_MS)
        await add_at(bus, stream, now - 7 * DAY_MS - 60_000)
        kept = await add_at(bus, stream, now - 6 * DAY_MS)
        await add_at(bus, dead, now - 8 * DAY_MS)
        kept_dead = await add_at(bus, dead, now - DAY_MS)

        assert await bus.trim_expired([ECHO]) == 3

        assert await ids(bus, stream) == [kept]
        assert await ids(bus, dead) == [kept_dead]


async def test_a_backlog_larger_than_one_trim_step_leaves_in_one_trim(
    redis_url: str, redis_prefix: str
) -> None:
    async with a_bus(redis_url, redis_prefix) as bus:
        stream = bus.stream_key(ECHO.name)
        start = await redis_ms(bus) - 9 * DAY_MS
        backlog = TRIM_STEP_LIMIT * 2 + 500
        fields: dict[Any, Any] = {b"data": b"x"}
        async with bus.redis.pipeline(transaction=False) as pipe:
            for n in range(backlog):
                pipe.xadd(stream, fields, id=f"{start + n}-0")
            await pipe.execute()
        kept = await add_at(bus, stream, start + 8 * DAY_MS)

        assert await bus.trim_expired([ECHO]) == backlog
        assert await ids(bus, stream) == [kept]


async def test_segment_changes_stay_as_long_as_a_project_may_read_them(
    redis_url: str, redis_prefix: str
) -> None:
    # The stream keeps what the longest `segments.change_retention_days` lets a watcher read.
    validate_setting("segments.change_retention_days", SEGMENT_CHANGES_KEPT_DAYS)
    with pytest.raises(InvalidSettingValue):
        validate_setting("segments.change_retention_days", SEGMENT_CHANGES_KEPT_DAYS + 1)
    async with a_bus(redis_url, redis_prefix) as bus:
        now = await redis_ms(bus)
        stream, dead = bus.stream_key(SEGMENT_CHANGES.name), bus.dead_key(SEGMENT_CHANGES.name)
        await add_at(bus, stream, now - (SEGMENT_CHANGES_KEPT_DAYS + 1) * DAY_MS)
        kept = [
            await add_at(bus, stream, now - (SEGMENT_CHANGES_KEPT_DAYS - 1) * DAY_MS),
            await add_at(bus, stream, now - 8 * DAY_MS),
        ]
        await add_at(bus, dead, now - 8 * DAY_MS)

        assert await bus.trim_expired([SEGMENT_CHANGES]) == 2

        assert await ids(bus, stream) == kept
        assert await ids(bus, dead) == []


async def test_a_group_that_had_not_read_what_expired_is_told(
    redis_url: str, redis_prefix: str
) -> None:
    async with a_bus(redis_url, redis_prefix) as bus:
        stream = bus.stream_key(ECHO.name)
        now = await redis_ms(bus)
        await add_at(bus, stream, now - 9 * DAY_MS)
        await add_at(bus, stream, now - 8 * DAY_MS)
        behind, read_all, read_one = (f"g-{uuid4().hex[:8]}" for _ in range(3))
        await bus.redis.xgroup_create(stream, behind, "0")
        await bus.redis.xgroup_create(stream, read_all, "$")
        await bus.redis.xgroup_create(stream, read_one, "0")
        await bus.redis.xreadgroup(read_one, "c", {stream: ">"}, count=1)
        await add_at(bus, stream, now - DAY_MS)
        name = "profiles_bus_unread_entries_expired_total"
        before = {g: sample(name, topic="echo", group=g) for g in (behind, read_all, read_one)}

        assert await bus.trim_expired([ECHO]) == 2

        after = {g: sample(name, topic="echo", group=g) for g in (behind, read_all, read_one)}
        assert {g: after[g] - before[g] for g in after} == {behind: 1, read_all: 0, read_one: 1}


class Recorder:
    def __init__(self) -> None:
        self.handled: list[int] = []

    async def __call__(self, project_id: str, message: Message, entry_id: str) -> None:
        assert isinstance(message, EchoRequest)
        self.handled.append(int(message.payload))


@pytest.mark.parametrize("holder", ["c1", "crashed"], ids=["own", "claimed"])
async def test_a_consumer_acks_pending_entries_trimmed_before_they_were_handled(
    redis_url: str, redis_prefix: str, eventually: Any, holder: str
) -> None:
    """Entries delivered (to this consumer before a restart, or to one that crashed) and
    trimmed before being handled: Redis answers them without a body. The consumer acks them,
    counts them, and goes on with the rest, neither dead-lettering nor looping."""
    group = f"g-{uuid4().hex[:8]}"
    async with a_bus(redis_url, redis_prefix, retention_ms=1000) as bus:
        stream = bus.stream_key(ECHO.name)
        old = await bus.publish(ECHO, [echo(n) for n in range(3)])
        await bus.redis.xgroup_create(stream, group, "0")
        delivered = await bus.redis.xreadgroup(group, holder, {stream: ">"}, count=10)
        assert len(delivered[0][1]) == 3
        await wait_for_redis_clock(bus, millis(old[-1]) + 1000, eventually)
        await bus.publish(ECHO, [echo(3)])
        assert await bus.trim_expired([ECHO]) == 3
        name = "profiles_bus_pending_entries_expired_total"
        before = sample(name, topic="echo", group=group)
        recorder = Recorder()
        consumer = Consumer(bus, ECHO, group, "c1", recorder, **FAST)
        task = asyncio.create_task(consumer.run())
        try:

            async def settled() -> bool:
                summary = await bus.redis.xpending(stream, group)
                return recorder.handled == [3] and int(summary["pending"]) == 0

            await eventually(settled, message="the new entry handled, nothing left pending")
            await bus.publish(ECHO, [echo(4)])
            await eventually(lambda: recorder.handled == [3, 4], message="consumption goes on")
        finally:
            consumer.stop()
            async with asyncio.timeout(10):
                await task
        assert sample(name, topic="echo", group=group) - before == 3
        assert await bus.dead_letters(ECHO.name) == []


async def test_the_outbox_relay_trims_the_streams_on_its_own(
    database_url: str, redis_url: str, redis_prefix: str, eventually: Any
) -> None:
    pool = await create_pool(database_url, max_size=3)
    assert isinstance(pool, asyncpg.Pool)
    try:
        async with a_bus(redis_url, redis_prefix) as bus:
            stream, dead = bus.stream_key(ECHO.name), bus.dead_key(ECHO.name)
            now = await redis_ms(bus)
            await add_at(bus, stream, now - 8 * DAY_MS)
            kept = await add_at(bus, stream, now - DAY_MS)
            await add_at(bus, dead, now - 8 * DAY_MS)
            relay = OutboxRelay(
                pool, bus, {ECHO.name: ECHO}, poll_interval_s=0.05, trim_interval_s=0.05
            )
            task = asyncio.create_task(relay.run())
            try:

                async def trimmed() -> bool:
                    return await ids(bus, stream) == [kept] and await ids(bus, dead) == []

                await eventually(trimmed, message="the relay trimmed the old entries")
            finally:
                relay.stop()
                async with asyncio.timeout(10):
                    await task
    finally:
        await pool.close()


async def test_a_relay_whose_trims_fail_still_publishes(
    database_url: str, private_redis: EmbeddedRedis, eventually: Any
) -> None:
    """A Redis that refuses the trim (here a user without EVAL; or a Redis before 6.2) costs
    the retention, never the outbox."""
    async with a_bus(private_redis.url, "t") as admin:
        await admin.redis.execute_command(
            "ACL", "SETUSER", "relay", "on", "nopass", "~*", "&*", "+@all", "-eval"
        )
    user_url = private_redis.url.replace("unix://", "unix://relay:@", 1)
    pool = await create_pool(database_url, max_size=3)
    assert isinstance(pool, asyncpg.Pool)
    try:
        async with a_bus(user_url, "t") as bus:
            with pytest.raises(NoPermissionError):
                await bus.trim_expired([ECHO])
            async with pool.acquire() as conn, conn.transaction():
                await enqueue(conn, PROJECT, ECHO, EchoRequest(payload=b"7"))
            relay = OutboxRelay(
                pool, bus, {ECHO.name: ECHO}, poll_interval_s=0.05, trim_interval_s=0.05
            )
            task = asyncio.create_task(relay.run())
            try:

                async def published() -> bool:
                    return len(await ids(bus, bus.stream_key(ECHO.name))) == 1

                await eventually(published, message="the outbox row reached the stream")
                async with pool.acquire() as conn, conn.transaction():
                    await enqueue(conn, PROJECT, ECHO, EchoRequest(payload=b"8"))

                async def published_again() -> bool:
                    return len(await ids(bus, bus.stream_key(ECHO.name))) == 2

                await eventually(published_again, message="the relay goes on publishing")
            finally:
                relay.stop()
                async with asyncio.timeout(10):
                    await task
    finally:
        await pool.close()


def test_the_bus_retention_setting_takes_whole_hours_from_one_to_a_year() -> None:
    default = Settings.from_env({})
    assert default.bus_retention_hours == 168
    assert default.bus_retention_ms == DEFAULT_RETENTION_MS
    day = Settings.from_env({"PROFILES_BUS_RETENTION_HOURS": "24"})
    assert day.bus_retention_ms == DAY_MS
    assert Settings.from_env(day.to_env()).bus_retention_hours == 24
    refusals = {
        "0": "PROFILES_BUS_RETENTION_HOURS must be from 1 to 8760, not 0",
        "-3": "PROFILES_BUS_RETENTION_HOURS must be from 1 to 8760, not -3",
        "8761": "PROFILES_BUS_RETENTION_HOURS must be from 1 to 8760, not 8761",
        "1.5": "PROFILES_BUS_RETENTION_HOURS must be a whole number, not '1.5'",
        "": "PROFILES_BUS_RETENTION_HOURS must be a whole number, not ''",
    }
    for text, message in refusals.items():
        with pytest.raises(SettingInvalid) as refused:
            Settings.from_env({"PROFILES_BUS_RETENTION_HOURS": text})
        assert str(refused.value) == message
    for retention_ms in (0, -1):
        refusal = f"^the bus retention must be above 0 ms, not {retention_ms}$"
        with pytest.raises(ValueError, match=refusal):
            Bus(None, "p", retention_ms=retention_ms)  # type: ignore[arg-type]  # no client needed


def files_holding(directory: Path, marker: bytes) -> list[str]:
    return sorted(
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.is_file() and path.name != "redis.log" and marker in path.read_bytes()
    )


async def test_the_embedded_redis_rewrites_trimmed_entries_out_of_its_append_only_file(
    tmp_path: Path, eventually: Any
) -> None:
    server = EmbeddedRedis(tmp_path / "redis", aof_rewrite_interval_s=0.1)
    url = await asyncio.to_thread(server.start)
    marker = f"erased-{uuid4().hex}".encode()
    try:
        async with a_bus(url, "t") as bus:
            stream = bus.stream_key(ECHO.name)
            now = await redis_ms(bus)
            await add_at(bus, stream, now - 8 * DAY_MS, marker)
            # A newer entry in the same stream node: the trim only flags the old one as deleted
            # inside the node, which an RDB image (an AOF's RDB preamble) would still hold.
            kept = await add_at(bus, stream, now - DAY_MS)
            assert files_holding(server.data_dir, marker) != []

            assert await bus.trim_expired([ECHO]) == 1

            await eventually(
                lambda: files_holding(server.data_dir, marker) == [],
                within_s=5,
                message="the trimmed entry left the append-only file",
            )
        await asyncio.to_thread(server.stop)
        async with a_bus(await asyncio.to_thread(server.start), "t") as bus:
            assert await ids(bus, bus.stream_key(ECHO.name)) == [kept]
            assert files_holding(server.data_dir, marker) == []
    finally:
        await asyncio.to_thread(server.stop)


async def test_a_service_trims_by_the_retention_its_settings_give(
    start_services: Any, settings_for_test: Settings, eventually: Any
) -> None:
    """PROFILES_BUS_RETENTION_HOURS reaches the services: one started with an hour trims an
    entry of two hours ago from the events stream (the default week would keep it)."""
    settings = settings_for_test.with_changes(bus_retention_hours=1)
    async with a_bus(settings.redis_url, settings.redis_prefix) as bus:
        stream = bus.stream_key("events")
        now = await redis_ms(bus)
        await add_at(bus, stream, now - 2 * 3_600_000)
        kept = await add_at(bus, stream, now - 60_000)
        await start_services("identity", settings=settings)

        async def trimmed() -> bool:
            return await ids(bus, stream) == [kept]

        await eventually(trimmed, message="the service trimmed by its hour of retention")
