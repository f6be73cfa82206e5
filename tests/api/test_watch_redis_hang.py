"""WatchProfile through a Redis that hangs (SIGSTOP, then SIGCONT) instead of going away: its
connections stay open and nothing fails, it just stops answering, while ingest gives its live
notices up. Once Redis answers again the watch says it may have missed items (a `dropped` item
without a count), as after an outage, and goes on. The Redis is the test's own: the suite's
shared one must not freeze."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import structlog
from prometheus_client import REGISTRY

from profiles.query.v1 import query_service_pb2 as pb
from shared.embedded import EmbeddedRedis
from shared.settings import Settings
from tests.conftest import eventually
from tests.support.identity import new_id
from tests.support.query import NOW, custom_event, round_trip, start_suite

if TYPE_CHECKING:
    from tests.conftest import StartServices, TestProject

# Far above any answer on a slow machine: an item still missing then is missing.
ITEM_WAIT_S = 60.0
# What the watch logs once it takes its subscription for lost (services/query/live.py).
WATCH_LOST = "watch_redis_unavailable"


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    """A Redis only this test uses, so it may freeze it."""
    server = EmbeddedRedis(tmp_path / "redis", persist=False)
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


@pytest.fixture
def private_settings(settings_for_test: Settings, private_redis: EmbeddedRedis) -> Settings:
    return settings_for_test.with_changes(
        redis_url=private_redis.url, redis_prefix=f"test-{uuid.uuid4().hex[:12]}"
    )


def notices_given_up() -> float:
    """Ingest's live notices dropped because Redis did not answer (services run in-process)."""
    value = REGISTRY.get_sample_value(
        "profiles_live_notices_dropped_total", {"service": "ingest", "reason": "redis_unavailable"}
    )
    return value or 0.0


async def items_until(call: Any, done: Any) -> list[pb.WatchProfileResponse]:
    """The items up to and including the first for which `done` is true."""
    items: list[pb.WatchProfileResponse] = []
    try:
        async with asyncio.timeout(ITEM_WAIT_S):
            while True:
                item = await call.read()
                assert item is not grpc.aio.EOF, [i.WhichOneof("item") for i in items]
                round_trip(item)
                items.append(item)
                if done(item):
                    return items
    except TimeoutError:
        pytest.fail(f"no such item; received {[i.WhichOneof('item') for i in items]}")


def is_event(name: str) -> Any:
    return lambda item: item.WhichOneof("item") == "event" and item.event.custom.name == name


def is_dropped(item: pb.WatchProfileResponse) -> bool:
    return item.WhichOneof("item") == "dropped"


async def test_a_profile_watch_says_it_may_have_missed_items_when_redis_hangs(
    start_services: StartServices,
    private_settings: Settings,
    project: TestProject,
    database_url: str,
    private_redis: EmbeddedRedis,
) -> None:
    suite = await start_suite(start_services, private_settings, project, database_url)
    watched = new_id()
    await suite.track(custom_event(watched, time=NOW - timedelta(hours=1)))
    profile_id = await suite.identity.profile_of(watched)
    call = suite.query.WatchProfile(
        pb.WatchProfileRequest(profile_id=profile_id), metadata=project.metadata("read")
    )
    try:
        (started,) = await items_until(call, lambda item: True)
        assert started.WhichOneof("item") == "started"
        await suite.track(custom_event(watched, name="before", time=NOW - timedelta(minutes=3)))
        before = await items_until(call, is_event("before"))
        assert [i.WhichOneof("item") for i in before] == ["event"]

        pid = int((private_redis.data_dir / "redis.pid").read_text())
        given_up = notices_given_up()
        with structlog.testing.capture_logs() as logs:
            os.kill(pid, signal.SIGSTOP)
            try:
                # Committed while Redis hangs: ingest gives its live notice up.
                await suite.track(
                    custom_event(watched, name="during", time=NOW - timedelta(minutes=2))
                )
                await eventually(lambda: _above(notices_given_up, given_up), within=ITEM_WAIT_S)
                # Redis stays frozen until the watch took its PING unanswered for a lost
                # subscription (its one warning of the outage; a deadline, not a timing).
                await eventually(lambda: _logged(logs, WATCH_LOST), within=ITEM_WAIT_S)
                assert not call.done(), "the watch ended while Redis hung"
            finally:
                os.kill(pid, signal.SIGCONT)

        # The watch tells the client that it may have missed items (the profile changed while
        # Redis hung), at once subscribed again...
        gap = await items_until(call, is_dropped)
        # (only the "during" event may come besides, had Redis published it late, never twice)
        assert [i.event.custom.name for i in gap[:-1]] in ([], ["during"])
        assert gap[-1].profile_id == profile_id
        assert gap[-1].dropped.dropped_count == 0  # unknown: the notices never reached it
        assert gap[-1].dropped.HasField("first_drop_time")
        # ...and goes on with what comes next.
        await suite.track(custom_event(watched, name="after", time=NOW - timedelta(minutes=1)))
        after = await items_until(call, is_event("after"))
        assert [i.WhichOneof("item") for i in after] in (["event"], ["event", "event"])
        seen = [i.event.custom.name for i in [*gap[:-1], *after]]
        assert seen in (["after"], ["during", "after"]), seen
        assert all(i.profile_id == profile_id for i in after)
    finally:
        call.cancel()


async def _above(read: Any, level: float) -> bool:
    return bool(read() > level)


async def _logged(logs: list[dict[str, Any]], event: str) -> bool:
    return any(entry["event"] == event for entry in logs)
