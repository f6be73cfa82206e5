"""`profiles dead-letters`, the real command on a real Redis: what consumers gave up on is
counted by reason and group, and a replay puts it back where every group reads it again."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from google.protobuf.message import Message

from profiles.common.v1 import bus_pb2
from shared.bus import Bus, Consumer, Envelope
from shared.topics import EVENTS

PROJECT = "00000000-0000-4000-8000-0000000000aa"
FAST = {"block_ms": 50, "claim_idle_ms": 100, "claim_interval_s": 0.05, "max_deliveries": 2}


@pytest.fixture
async def bus(redis_url: str, redis_prefix: str) -> AsyncIterator[Bus]:
    bus = Bus.from_url(redis_url, redis_prefix)
    yield bus
    await bus.aclose()


def profiles(redis_url: str, redis_prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PROFILES_REDIS_URL": redis_url, "PROFILES_REDIS_PREFIX": redis_prefix}
    return subprocess.run(
        [sys.executable, "-c", "from profiles_cli.cli import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def consume(bus: Bus, group: str, handler: Any, until: Any, eventually: Any) -> None:
    """Runs a consumer of `group` until `until()` holds."""
    consumer = Consumer(bus, EVENTS, group, "c1", handler, **FAST)
    task = asyncio.create_task(consumer.run())
    try:
        await eventually(until, within_s=20)
    finally:
        consumer.stop()
        await task


async def test_dead_letters_are_listed_and_replayed_to_every_group(
    bus: Bus, redis_url: str, redis_prefix: str, eventually: Any
) -> None:
    messages = [
        Envelope.of(EVENTS, PROJECT, bus_pb2.EventsIngested(), message_id=f"m{n}") for n in range(3)
    ]
    await bus.publish(EVENTS, messages)

    async def broken(project_id: str, message: Message, entry_id: str) -> None:
        raise RuntimeError("a handler bug")

    async def all_dead() -> bool:
        return len(await bus.dead_letters("events")) == 3

    await consume(bus, "segments", broken, all_dead, eventually)
    # Another group handled them: it gets them again on replay, and tolerates it.
    handled: dict[str, list[str]] = {"segments": [], "query": []}

    listed = await asyncio.to_thread(profiles, redis_url, redis_prefix, "dead-letters")
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()}
    assert lines["events"].split()[1] == "3"
    assert "handler_failed (segments): 3" in lines["events"]
    assert lines["identity"].split()[1] == "0"
    as_json = await asyncio.to_thread(profiles, redis_url, redis_prefix, "dead-letters", "--json")
    letters = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(x["reason"], x["group"], x["deliveries"]) for x in letters] == [
        ("handler_failed", "segments", 2)
    ] * 3

    # A poison reason is not replayed unless asked for; one letter at a time with --limit.
    nothing = await asyncio.to_thread(
        profiles, redis_url, redis_prefix, "dead-letters", "replay", "events", "--reason", "x"
    )
    assert "0 dead letters of events replayed" in nothing.stdout
    one = await asyncio.to_thread(
        profiles, redis_url, redis_prefix, "dead-letters", "replay", "events", "--limit", "1"
    )
    assert one.returncode == 0, one.stderr
    assert "1 dead letters of events replayed" in one.stdout
    rest = await asyncio.to_thread(
        profiles, redis_url, redis_prefix, "dead-letters", "replay", "events", "--group", "segments"
    )
    assert "2 dead letters of events replayed" in rest.stdout
    assert await bus.dead_letters("events") == []

    def recorder(group: str) -> Any:
        async def handle(project_id: str, message: Message, entry_id: str) -> None:
            assert project_id == PROJECT
            handled[group].append(entry_id)

        return handle

    async def segments_done() -> bool:
        return len(handled["segments"]) == 3

    await consume(bus, "segments", recorder("segments"), segments_done, eventually)

    async def query_done() -> bool:
        return len(handled["query"]) == 6  # the three first publications and the replays

    await consume(bus, "query", recorder("query"), query_done, eventually)


def test_replay_refuses_an_unknown_topic_and_a_bad_limit(redis_url: str, redis_prefix: str) -> None:
    unknown = profiles(redis_url, redis_prefix, "dead-letters", "replay", "nope")
    assert unknown.returncode == 2
    assert "invalid choice" in unknown.stderr
    bad = profiles(redis_url, redis_prefix, "dead-letters", "replay", "events", "--limit", "0")
    assert bad.returncode == 2
    assert "--limit must be at least 1" in bad.stderr
