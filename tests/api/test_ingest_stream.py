"""StreamEvents, the outbox message, and a property test of random batches against TrackEvents."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profiles.common.v1 import bus_pb2, types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from services.ingest.validation import ValidEvent, validate_event
from tests.support.ingest import NOW, Ingest, aiter_of, custom_event, stamp


async def test_stream_events_answers_each_batch_in_order_and_goes_on_after_a_bad_one(
    ingest: Ingest,
) -> None:
    requests = [
        pb.StreamEventsRequest(batch_id="b1", events=[custom_event("i1", event_id="1")]),
        pb.StreamEventsRequest(batch_id="b2"),  # malformed: no events
        pb.StreamEventsRequest(
            batch_id="b3",
            events=[custom_event("i1", event_id="1"), custom_event("i1", event_id="2")],
        ),
    ]
    call = ingest.stub.StreamEvents(aiter_of(*requests), metadata=ingest.metadata)
    responses = [r async for r in call]
    assert [r.batch_id for r in responses] == ["b1", "b2", "b3"]
    assert [r.status.code for r in responses] == [
        0,
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        0,
    ]
    assert [r.accepted_count for r in responses] == [1, 0, 1]
    assert responses[2].duplicate_count == 1
    assert len(await ingest.fetch("SELECT 1 FROM events")) == 2


async def test_one_events_ingested_message_is_enqueued_per_batch(
    ingest: Ingest,
    settings_for_test,  # type: ignore[no-untyped-def]
) -> None:
    from redis.asyncio import Redis

    from shared.bus import Bus, decode_entry
    from shared.topics import EVENTS
    from tests.conftest import eventually

    reply = await ingest.track(
        custom_event("i1", event_id="a"), custom_event("i1", event_id="bad name", name="x y")
    )
    redis = Redis.from_url(settings_for_test.redis_url)
    bus = Bus(redis, settings_for_test.redis_prefix)
    try:
        entries: list[Any] = []

        async def published() -> bool:
            entries[:] = await redis.xrange(bus.stream_key(EVENTS.name))
            return bool(entries)

        await eventually(published)
        assert len(entries) == 1
        _, message = decode_entry(EVENTS, entries[0][1])
        assert isinstance(message, bus_pb2.EventsIngested)
        assert [e.event_id for e in message.events] == ["a"]
        assert message.events[0].profile_id == reply.results[0].profile_id
        assert message.events[0].custom.name == "purchase"
    finally:
        await redis.aclose()


INSTALLATIONS = st.sampled_from(["i1", "i2", "i3", "", "x" * 129])
NAMES = st.sampled_from(["view", "Add_To_Cart", "bad name", "", "n" * 31])
OFFSETS = st.sampled_from([0, -60, 599, 601, -86_400 * 31, -86_400 * 29])


@st.composite
def events(draw: st.DrawFn) -> pb.Event:
    event = pb.Event(
        event_id=draw(st.sampled_from(["e1", "e2", "e3", "", "x" * 65])),
        platform=draw(st.sampled_from([0, 1, 2, 3, 4, 9])),  # type: ignore[arg-type]
    )
    installation_id = draw(st.one_of(st.none(), INSTALLATIONS))
    if installation_id is not None:
        event.installation_id = installation_id
    elif draw(st.booleans()):
        event.custom_id = draw(st.sampled_from(["user-1", "null", " padded"]))
    if draw(st.booleans()):
        event.event_time.CopyFrom(stamp(NOW + timedelta(seconds=draw(OFFSETS))))
    payload = draw(st.sampled_from(["custom", "crash", "subscription", "none"]))
    if payload == "custom":
        event.custom.name = draw(NAMES)
        for key in draw(st.lists(st.sampled_from(["a", "B", "b", "bad-key"]), max_size=3)):
            event.custom.attributes[key].number_value = draw(
                st.floats(allow_nan=True, allow_infinity=True)
            )
    elif payload == "crash":
        event.crash.name = draw(st.text(max_size=5))
    elif payload == "subscription":
        event.subscription_change.channel = draw(st.sampled_from([0, 1, 2, 3]))  # type: ignore[arg-type]
        event.subscription_change.kind = draw(st.sampled_from([0, 1, 2]))  # type: ignore[arg-type]
    return event


async def test_random_batches_are_answered_and_exactly_the_valid_events_are_stored(
    ingest: Ingest,
) -> None:
    loop = asyncio.get_running_loop()
    stored: set[tuple[str, str, str]] = set()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)

    @settings(max_examples=25)
    @given(st.lists(events(), max_size=12))
    def check(batch: list[pb.Event]) -> None:
        if not batch:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                run(ingest.track(*batch))
            assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            return
        reply = run(ingest.track(*batch))  # any other failure fails the property
        assert len(reply.results) == len(batch)
        for i, (event, result) in enumerate(zip(batch, reply.results, strict=True)):
            local = validate_event(i, event, request_send_time=None, now=NOW)
            valid = isinstance(local, ValidEvent) and event.custom_id != "null"
            origin = event.WhichOneof("origin") or ""
            key = (origin, getattr(event, origin) if origin else "", event.event_id)
            if not valid:
                assert result.outcome == pb.EVENT_OUTCOME_REJECTED
                continue
            assert result.outcome in (pb.EVENT_OUTCOME_ACCEPTED, pb.EVENT_OUTCOME_DUPLICATE)
            assert (result.outcome == pb.EVENT_OUTCOME_DUPLICATE) == (key in stored)
            stored.add(key)
        rows = run(
            ingest.fetch(
                "SELECT coalesce(installation_id, custom_id) AS origin,"
                " installation_id IS NOT NULL AS by_installation, event_id FROM events"
            )
        )
        found = {
            ("installation_id" if r["by_installation"] else "custom_id", r["origin"], r["event_id"])
            for r in rows
        }
        assert found == stored

    await asyncio.to_thread(check)
    # Still serving after all that.
    reply = await ingest.track(custom_event("after", event_id="after"))
    assert reply.results[0].outcome == pb.EVENT_OUTCOME_ACCEPTED


async def test_unknown_platform_numbers_and_channels_are_rejected_not_crashing(
    ingest: Ingest,
) -> None:
    event = custom_event("i1")
    event.platform = 42  # type: ignore[assignment]
    sub = pb.Event(event_id="s", installation_id="i1", platform=types_pb2.PLATFORM_WEB)
    sub.event_time.CopyFrom(stamp(NOW))
    sub.subscription_change.channel = 9  # type: ignore[assignment]
    reply = await ingest.track(event, sub)
    assert [r.reason for r in reply.results] == ["PLATFORM_MISSING", "SUBSCRIPTION_INVALID"]
