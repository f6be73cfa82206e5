"""Group commit (services/ingest/group_commit.py, batch_groups.py): concurrent batches of one
project stored by one transaction, each batch answered its own events' outcomes. Pure: the
store is a function of the test; no I/O."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from profiles.common.v1 import bus_pb2, types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from services.ingest.batch_groups import (
    StoreAttempt,
    Stored,
    combine,
    merged,
    origin_of,
    partition_of,
    partitioned,
    split,
)
from services.ingest.group_commit import GroupCommit
from services.ingest.model import Rejection
from services.ingest.validation import RejectedEvent, ValidEvent, renumbered

NOW = datetime(2030, 6, 1, 12, tzinfo=UTC)
PROJECT = uuid.UUID("00000000-0000-4000-8000-00000000000a")


class Recorder:
    """A store that records each group and waits for the test to let it finish."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.release: dict[int, asyncio.Event] = {}
        self.failing: set[str] = set()  # items answered an exception of their own
        self.raising: set[str] = set()  # items that make the whole group raise

    async def store(self, key: str, items: Sequence[str]) -> list[str | BaseException]:
        number = len(self.groups)
        self.groups.append(list(items))
        gate = self.release.setdefault(number, asyncio.Event())
        await gate.wait()
        if self.raising & set(items):
            raise RuntimeError("the group failed")
        return [ValueError(i) if i in self.failing else f"{key}:{i}" for i in items]

    def open(self, number: int) -> None:
        self.release.setdefault(number, asyncio.Event()).set()


def waiting() -> float:
    return REGISTRY.get_sample_value("profiles_ingest_group_commit_waiting") or 0.0


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_lone_batch_is_stored_at_once_and_later_ones_wait_and_go_together() -> None:
    recorder = Recorder()
    groups = GroupCommit(recorder.store, size_of=lambda _: 1, writers=1, max_size=10)
    waiting_before = waiting()
    first = asyncio.create_task(groups.submit("p", "a"))
    await settle()
    assert recorder.groups == [["a"]]
    later = [asyncio.create_task(groups.submit("p", i)) for i in "bcd"]
    await settle()
    assert recorder.groups == [["a"]], "a second transaction started beside the first"
    assert waiting() == waiting_before + 3
    recorder.open(0)
    assert await first == "p:a"
    await settle()
    assert recorder.groups == [["a"], ["b", "c", "d"]]
    assert waiting() == waiting_before
    recorder.open(1)
    assert await asyncio.gather(*later) == ["p:b", "p:c", "p:d"]


async def test_groups_are_bounded_by_size_and_each_key_has_its_own_writers() -> None:
    recorder = Recorder()
    sizes = {"a": 1, "b": 2, "c": 2, "d": 1, "x": 1}
    groups = GroupCommit(recorder.store, size_of=sizes.__getitem__, writers=1, max_size=3)
    tasks = [asyncio.create_task(groups.submit("p", "a"))]
    await settle()
    tasks += [asyncio.create_task(groups.submit("p", i)) for i in "bcd"]
    other = asyncio.create_task(groups.submit("q", "x"))
    await settle()
    # Key q does not wait for p's transaction.
    assert recorder.groups == [["a"], ["x"]]
    for number in range(4):
        recorder.open(number)
        await settle()
    assert recorder.groups == [["a"], ["x"], ["b"], ["c", "d"]]
    assert await asyncio.gather(*tasks, other) == ["p:a", "p:b", "p:c", "p:d", "q:x"]


async def test_two_writers_run_two_groups_at_once() -> None:
    recorder = Recorder()
    groups = GroupCommit(recorder.store, size_of=lambda _: 1, writers=2, max_size=10)
    tasks = [asyncio.create_task(groups.submit("p", i)) for i in "ab"]
    await settle()
    assert recorder.groups == [["a"], ["b"]]
    tasks += [asyncio.create_task(groups.submit("p", i)) for i in "cde"]
    await settle()
    recorder.open(1)
    await settle()
    assert recorder.groups == [["a"], ["b"], ["c", "d", "e"]]
    recorder.open(0)
    recorder.open(2)
    assert await asyncio.gather(*tasks) == [f"p:{i}" for i in "abcde"]


async def test_an_item_s_own_failure_reaches_only_it_and_a_group_s_reaches_its_items() -> None:
    recorder = Recorder()
    recorder.failing = {"b"}
    recorder.raising = {"e"}
    groups = GroupCommit(recorder.store, size_of=lambda _: 1, writers=1, max_size=2)
    first = asyncio.create_task(groups.submit("p", "a"))
    await settle()
    rest = {i: asyncio.create_task(groups.submit("p", i)) for i in "bcdef"}
    for number in range(4):
        recorder.open(number)
        await settle()
    assert await first == "p:a"
    assert recorder.groups == [["a"], ["b", "c"], ["d", "e"], ["f"]]
    with pytest.raises(ValueError, match="b"):
        await rest["b"]
    assert await rest["c"] == "p:c"
    for failed in "de":
        with pytest.raises(RuntimeError, match="the group failed"):
            await rest[failed]
    assert await rest["f"] == "p:f", "the batches after a failed group were not stored"


async def test_a_caller_that_gives_up_leaves_its_item_to_be_stored() -> None:
    recorder = Recorder()
    groups = GroupCommit(recorder.store, size_of=lambda _: 1, writers=1, max_size=10)
    first = asyncio.create_task(groups.submit("p", "a"))
    await settle()
    gone = asyncio.create_task(groups.submit("p", "b"))
    kept = asyncio.create_task(groups.submit("p", "c"))
    await settle()
    gone.cancel()
    recorder.open(0)
    recorder.open(1)
    assert await first == "p:a"
    assert await kept == "p:c"
    assert recorder.groups == [["a"], ["b", "c"]]
    with pytest.raises(asyncio.CancelledError):
        await gone


# -- combine and split, against a model ---------------------------------------------------------


def event(index: int, origin: str, event_id: str, kind: int) -> ValidEvent:
    custom = origin.startswith("user")
    return ValidEvent(
        index,
        event_id,
        None if custom else origin,
        origin if custom else None,
        types_pb2.PLATFORM_IOS,
        kind,
        None,
        NOW + timedelta(seconds=index),
        None,
        "custom",
        bus_pb2.IngestedEvent(),
        {},
    )


def test_renumbered_is_replace_of_the_index_alone() -> None:
    # Every field set to something other than its default, so a field copied into the wrong
    # place, or dropped, shows.
    values: list[object] = [
        7,
        "e-1",
        "inst-1",
        "user-1",
        types_pb2.PLATFORM_ANDROID,
        types_pb2.EVENT_KIND_SESSION_END,
        "name",
        NOW,
        "session-1",
        "session",
        bus_pb2.SessionDetail(country="FR"),
        {"duration": "5s"},
        ("operation",),
        "subscription",
        {"language": "fr"},
        timedelta(seconds=5),
        "192.0.2.1",
        2,
        "FR",
    ]
    assert len(values) == len(dataclasses.fields(ValidEvent))
    original = ValidEvent(*values)  # type: ignore[arg-type]
    moved = renumbered(original, 42)
    assert moved == dataclasses.replace(original, index=42)
    assert moved.index == 42
    assert original.index == 7


def attempts_of(rng: random.Random) -> list[StoreAttempt]:
    """2 to 5 batches over a few origins and event IDs, so that some events repeat across
    batches; each batch's events are unique within it (as ingest hands them over) and some of
    its indexes are taken by events it rejected itself."""
    attempts = []
    for _ in range(rng.randint(2, 5)):
        size = rng.randint(0, 8)
        events: list[ValidEvent] = []
        seen: set[tuple[str, str]] = set()
        for index in range(size):
            origin = rng.choice(["inst-1", "inst-2", "user-1"])
            event_id = f"e{rng.randint(0, 6)}"
            if (origin, event_id) in seen or rng.random() < 0.15:
                continue  # a repeat within the batch, or rejected: not handed to the store
            seen.add((origin, event_id))
            kind = rng.choice([types_pb2.EVENT_KIND_CUSTOM, types_pb2.EVENT_KIND_SESSION_START])
            events.append(event(index, origin, event_id, kind))
        by_index = {i: pb.Event(event_id=f"raw{i}") for i in range(size)}
        attempts.append(StoreAttempt(NOW, events, {}, [], by_index))
    return attempts


def fate(origin: str, event_id: str) -> str:
    """What the model's transaction does with an event: a function of the event alone."""
    return ["accepted", "accepted", "duplicate", "orphan", "refused"][
        zlib.crc32(f"{origin}/{event_id}".encode()) % 5
    ]


def store_model(attempt: StoreAttempt) -> Stored:
    """The transaction as the model sees it: each event's fate, at the indexes it is given."""
    stored = Stored()
    for e in attempt.events:
        origin = origin_of(e).value
        outcome = fate(origin, e.event_id)
        if outcome == "accepted":
            stored.accepted[e.index] = uuid.uuid5(PROJECT, origin)
            if e.kind == types_pb2.EVENT_KIND_SESSION_START and e.installation_id:
                stored.reintegrations.append((origin, f"imported-{origin}"))
        elif outcome == "duplicate":
            stored.duplicates.add(e.index)
        elif outcome == "orphan":
            stored.orphans.append(e)
        else:
            stored.late_rejections.append(
                RejectedEvent(e.index, e.event_id, origin, "", Rejection("R", "f", "m"), None)
            )
    stored.reintegrations = sorted(set(stored.reintegrations))
    return stored


@pytest.mark.parametrize("seed", range(200))
def test_each_batch_gets_back_what_its_own_events_met(seed: int) -> None:
    rng = random.Random(seed)
    attempts = attempts_of(rng)
    group = combine(attempts)
    outcomes = split(store_model(group.attempt), group)
    assert len(outcomes) == len(attempts)
    stored_first: set[tuple[str, str]] = set()
    folded: set[tuple[str, str]] = set()
    for attempt, outcome in zip(attempts, outcomes, strict=True):
        expected = Stored()
        for e in attempt.events:
            key = (origin_of(e).value, e.event_id)
            if key in stored_first:
                # Carried by an earlier batch of the group: answered as a duplicate.
                expected.duplicates.add(e.index)
                continue
            stored_first.add(key)
            alone = store_model(StoreAttempt(NOW, [e], {}, [], attempt.by_index))
            expected.accepted.update(alone.accepted)
            expected.duplicates |= alone.duplicates
            expected.orphans += alone.orphans
            expected.late_rejections += alone.late_rejections
        assert outcome.accepted == expected.accepted
        assert outcome.duplicates == expected.duplicates
        assert outcome.orphans == expected.orphans
        assert outcome.late_rejections == expected.late_rejections
        # Each folding goes with exactly one batch, one that started that session.
        starters = {
            e.installation_id
            for e in attempt.events
            if e.kind == types_pb2.EVENT_KIND_SESSION_START
        }
        for installation, _ in outcome.reintegrations:
            assert installation in starters
        assert not folded & set(outcome.reintegrations)
        folded |= set(outcome.reintegrations)
    assert folded == set(store_model(group.attempt).reintegrations)
    # The group's indexes are distinct and its requests' events all present.
    indexes = [e.index for e in group.attempt.events]
    assert len(indexes) == len(set(indexes))
    assert len(group.attempt.by_index) == sum(len(a.by_index) for a in attempts)


# -- a batch split by writer partition, and its partitions' outcomes merged, against a model ----


def batch_of(rng: random.Random) -> StoreAttempt:
    """A batch over a few installations and custom IDs, some of which share a profile (a
    custom ID and the installations logged into it), with a few events it rejected itself."""
    profiles = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(3)]
    origins = {name: rng.choice(profiles) for name in ("inst-1", "inst-2", "inst-3", "user-1")}
    events = [
        event(index, rng.choice(list(origins)), f"e{index}", types_pb2.EVENT_KIND_CUSTOM)
        for index in range(rng.randint(0, 12))
    ]
    rejected = [
        RejectedEvent(index, f"r{index}", "inst-9", "", Rejection("R", "f", "m"), None)
        for index in range(len(events), len(events) + rng.randint(0, 2))
    ]
    keys = {origin_of(e) for e in events}
    by_index = {i: pb.Event(event_id=f"raw{i}") for i in range(len(events) + len(rejected))}
    return StoreAttempt(NOW, events, {k: origins[k.value] for k in keys}, rejected, by_index)


@pytest.mark.parametrize("seed", range(200))
def test_a_batch_split_by_partition_comes_back_whole(seed: int) -> None:
    rng = random.Random(seed)
    attempt = batch_of(rng)
    partitions = rng.randint(1, 4)
    parts = partitioned(attempt, partitions)
    numbers = [number for number, _ in parts]
    assert numbers == sorted(set(numbers))
    # Every event in exactly one part, in its batch's order; a profile's events in one part,
    # the part of its profile.
    assert sorted(e.index for _, p in parts for e in p.events) == [e.index for e in attempt.events]
    for number, part in parts:
        assert [e.index for e in part.events] == sorted(e.index for e in part.events)
        for e in part.events:
            assert partition_of(attempt.profiles[origin_of(e)], partitions) == number
        assert part.by_index is attempt.by_index
        assert part.receive_time == attempt.receive_time
    # The batch's own rejections are stored once, by its first part.
    assert list(parts[0][1].rejected) == list(attempt.rejected)
    assert all(not part.rejected for _, part in parts[1:])
    # The parts' outcomes, merged, are what one transaction of the whole batch met.
    whole = store_model(attempt)
    merged_outcome = merged([store_model(part) for _, part in parts])
    assert merged_outcome.accepted == whole.accepted
    assert merged_outcome.duplicates == whole.duplicates
    assert merged_outcome.orphans == whole.orphans
    assert merged_outcome.late_rejections == whole.late_rejections
    assert sorted(merged_outcome.reintegrations) == sorted(whole.reintegrations)
