"""The bus retention reaches the dead letters of topics no relay knows (a topic renamed or
removed, or one a newer version's outbox rows named during a rolling deploy): every
`{prefix}:{...}:dead` stream is trimmed by time, on one Redis and on every node of a cluster,
and nothing under another prefix is touched."""

from __future__ import annotations

from typing import Any

from profiles.diagnostics.v1.diagnostics_service_pb2 import EchoRequest
from shared.bus import Envelope, Topic
from tests.integration.test_bus_retention import (
    a_bus,
    ids,
    millis,
    sample,
    wait_for_redis_clock,
)

ECHO = Topic("echo", (EchoRequest,))
# Topics no relay is given: their dead-letter streams were left by earlier versions.
GONE = ("renamed-topic", "removed.topic", "future_1")


def letter(n: int) -> dict[bytes, bytes]:
    return Envelope.of(ECHO, "p", EchoRequest(payload=str(n).encode()), message_id=str(n)).fields()


async def dead_letters_of_gone_topics_are_trimmed(
    redis_url: str, prefix: str, eventually: Any
) -> None:
    async with (
        a_bus(redis_url, prefix, retention_ms=1000) as bus,
        a_bus(redis_url, f"{prefix}:other", retention_ms=1000) as other_suite,
    ):
        for n, name in enumerate(GONE):
            await bus.dead_letter(name, letter(n), "unknown_topic")
        await bus.dead_letter(ECHO.name, letter(9), "handler_failed")
        # Another suite's bus on the same Redis (a prefix that starts with ours): not ours.
        await other_suite.dead_letter("renamed-topic", letter(7), "unknown_topic")
        old = [i for name in GONE for i in await ids(bus, bus.dead_key(name))]
        await wait_for_redis_clock(bus, max(map(millis, old)) + 1000, eventually)
        await bus.dead_letter(GONE[0], letter(10), "unknown_topic")
        kept = (await ids(bus, bus.dead_key(GONE[0])))[-1:]
        before = sample("profiles_bus_entries_expired_total", topic=GONE[1], stream="dead")

        assert await bus.dead_letter_topics() == sorted([*GONE, ECHO.name])
        removed = await bus.trim_expired([ECHO])

        # The three old dead letters of the gone topics and the known topic's one.
        assert removed == 4
        assert await ids(bus, bus.dead_key(GONE[0])) == kept
        for name in GONE[1:]:
            assert await ids(bus, bus.dead_key(name)) == []
        assert await ids(bus, bus.dead_key(ECHO.name)) == []
        assert sample("profiles_bus_entries_expired_total", topic=GONE[1], stream="dead") == (
            before + 1
        )
        assert len(await ids(other_suite, other_suite.dead_key("renamed-topic"))) == 1
        assert await bus.trim_expired([ECHO]) == 0


async def test_dead_letters_of_topics_no_relay_knows_are_trimmed_by_time(
    redis_url: str, redis_prefix: str, eventually: Any
) -> None:
    await dead_letters_of_gone_topics_are_trimmed(redis_url, redis_prefix, eventually)


async def test_a_cluster_trims_them_on_every_node(
    redis_cluster_url: str, cluster_prefix: str, eventually: Any
) -> None:
    # Each topic's hash tag puts its streams in a slot of their own: SCAN must ask every master.
    await dead_letters_of_gone_topics_are_trimmed(redis_cluster_url, cluster_prefix, eventually)


async def test_a_prefix_with_glob_characters_matches_only_itself(
    redis_url: str, redis_prefix: str
) -> None:
    # A prefix read as a pattern would take `[ab]` for one letter: ours is matched literally.
    async with (
        a_bus(redis_url, f"{redis_prefix}:x[ab]*") as bus,
        a_bus(redis_url, f"{redis_prefix}:xa") as lookalike,
    ):
        await bus.dead_letter("mine", letter(1), "unknown_topic")
        await lookalike.dead_letter("theirs", letter(2), "unknown_topic")

        assert await bus.dead_letter_topics() == ["mine"]
