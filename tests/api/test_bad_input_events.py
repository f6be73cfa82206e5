"""One bad event never fails its batch: what is stored about a rejected event is storable
whatever the client sent, and StreamEvents goes on after it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc
import pytest

from profiles.ingest.v1 import ingest_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from services.ingest import model
from shared.clock import FrozenClock
from tests.support.ingest import (
    NOW,
    Ingest,
    aiter_of,
    attribute_event,
    custom_event,
    op,
    start_ingest,
)


@pytest.fixture
async def channel(start_services: Any, settings_for_test: Any) -> grpc.aio.Channel:
    return await start_ingest(start_services, settings_for_test, clock=FrozenClock(NOW))


@pytest.fixture
async def ingest(channel, project, database_url) -> Ingest:  # type: ignore[no-untyped-def]
    return Ingest(
        pb_grpc.IngestServiceStub(channel),
        project.metadata("sdk"),
        project.metadata("admin"),
        database_url,
    )


def _bad_then_good() -> list[pb.Event]:
    bad = custom_event("inst-1", event_id="bad")
    bad.custom.attributes["a\x00b"].string_value = "x"
    return [bad, custom_event("inst-1", event_id="good")]


async def test_an_attribute_name_with_a_nul_rejects_its_event_and_keeps_the_batch(
    ingest: Ingest,
) -> None:
    reply = await ingest.track(*_bad_then_good())
    bad, good = reply.results
    assert bad.outcome == pb.EVENT_OUTCOME_REJECTED
    assert bad.reason == model.ATTRIBUTE_NAME_INVALID
    assert bad.field_path == 'custom.attributes["a\\u0000b"]'
    assert good.outcome == pb.EVENT_OUTCOME_ACCEPTED
    rows = await ingest.fetch("SELECT reason, field_path FROM rejected_events")
    assert [(r["reason"], r["field_path"]) for r in rows] == [
        (model.ATTRIBUTE_NAME_INVALID, 'custom.attributes["a\\u0000b"]')
    ]
    assert [r["event_id"] for r in await ingest.fetch("SELECT event_id FROM events")] == ["good"]


async def test_stream_events_goes_on_after_a_batch_holding_such_an_event(ingest: Ingest) -> None:
    requests: list[Any] = [
        pb.StreamEventsRequest(batch_id="1", events=_bad_then_good()),
        pb.StreamEventsRequest(batch_id="2", events=[custom_event("inst-1", event_id="later")]),
    ]
    replies = [
        reply
        async for reply in ingest.stub.StreamEvents(aiter_of(*requests), metadata=ingest.metadata)
    ]
    assert [r.batch_id for r in replies] == ["1", "2"]
    assert [r.outcome for r in replies[0].results] == [
        pb.EVENT_OUTCOME_REJECTED,
        pb.EVENT_OUTCOME_ACCEPTED,
    ]
    assert replies[1].accepted_count == 1


async def test_stream_events_answers_a_broken_batch_as_malformed_and_goes_on(
    ingest: Ingest, channel: grpc.aio.Channel
) -> None:
    """An undecodable batch and one with a NUL outside its events: each answered with an
    INVALID_ARGUMENT status, as the contract answers a malformed batch, and the stream goes on."""
    stream = channel.stream_stream(
        "/profiles.ingest.v1.IngestService/StreamEvents",
        request_serializer=lambda data: data,
        response_deserializer=pb.StreamEventsResponse.FromString,
    )
    bodies = [
        bytes.fromhex("0a0e0a04fffec3281204696e73743001"),
        pb.StreamEventsRequest(
            batch_id="a\x00b", events=[custom_event("inst-1", event_id="nul-batch")]
        ).SerializeToString(),
        pb.StreamEventsRequest(
            batch_id="3", events=[custom_event("inst-1", event_id="after")]
        ).SerializeToString(),
    ]
    replies = [reply async for reply in stream(aiter_of(*bodies), metadata=ingest.metadata)]
    assert [r.status.code for r in replies] == [3, 3, 0]
    assert replies[1].batch_id == "a\x00b"
    assert replies[2].accepted_count == 1
    stored = await ingest.fetch("SELECT event_id FROM events")
    assert [r["event_id"] for r in stored] == ["after"]


async def test_a_session_rule_this_build_does_not_know_rejects_its_event_only(
    ingest: Ingest,
) -> None:
    unknown = custom_event("inst-1", event_id="rule-7")
    unknown.session_rule = 7  # type: ignore[assignment]  # a newer client's rule
    reply = await ingest.track(unknown, custom_event("inst-1", event_id="good"))
    refused, good = reply.results
    assert (refused.outcome, refused.reason, refused.field_path) == (
        pb.EVENT_OUTCOME_REJECTED,
        model.VALUE_INVALID,
        "session_rule",
    )
    assert good.outcome == pb.EVENT_OUTCOME_ACCEPTED


async def test_increments_past_a_double_s_range_change_nothing_and_fail_no_batch(
    ingest: Ingest,
) -> None:
    """0041: before, the second increment of 1.5e308 made PostgreSQL raise in the replay, which
    failed its batch and every later batch touching the attribute."""
    times = [NOW - timedelta(minutes=3 - i) for i in range(3)]
    for number, time in enumerate(times[:2]):
        reply = await ingest.track(
            attribute_event("inst-1", [op("increment", "big", 1.5e308)], time=time),
            custom_event("inst-1", event_id=f"good-{number}"),
        )
        assert [r.outcome for r in reply.results] == [pb.EVENT_OUTCOME_ACCEPTED] * 2
    reply = await ingest.track(
        attribute_event("inst-1", [op("increment", "big", -0.5e308)], time=times[2])
    )
    assert reply.accepted_count == 1
    rows = await ingest.fetch("SELECT value, update_time FROM profile_attributes")
    # The second increment applied nothing (value and time stay); the third applied.
    assert [(float(r["value"]["value"]), r["update_time"]) for r in rows] == [(1e308, times[2])]
    stored = await ingest.fetch("SELECT count(*) AS n FROM events WHERE event_id LIKE 'good-%'")
    assert stored[0]["n"] == 2
