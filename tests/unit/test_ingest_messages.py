"""The bus messages ingest builds from a validated batch (services/ingest/messages.py): the
outbox's EventsIngested, and the live ProfileChanged notices serialized straight from the events'
bytes, which must read exactly as the messages built field by field. Pure: no I/O."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from profiles.common.v1 import bus_pb2, types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from services.ingest.messages import (
    _varint,
    events_ingested,
    profile_changes,
    serialized_profile_changes,
)
from services.ingest.validation import RejectedEvent, ValidEvent, validate_events
from shared.convert import timestamp_of

NOW = datetime(2030, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)
PROJECT = uuid.UUID("00000000-0000-4000-8000-00000000000a")
FIRST = uuid.UUID("00000000-0000-4000-8000-000000000001")
SECOND = uuid.UUID("00000000-0000-4000-8000-000000000002")


def batch() -> list[pb.Event]:
    """One event of most kinds, from two installations and a custom ID, one of them invalid."""
    events = []
    for number, kind in enumerate(
        ["custom", "start", "heartbeat", "attributes", "subscription", "install", "bad", "crash"]
    ):
        event = pb.Event(event_id=f"e{number}", platform=types_pb2.PLATFORM_IOS)
        if number == 7:
            event.custom_id = "user-7"
        else:
            event.installation_id = "inst-a" if number % 2 else "inst-b"
        event.session_id = "s1"
        event.event_time.FromDatetime(NOW - timedelta(seconds=number, microseconds=number))
        if kind == "custom":
            event.custom.name = "Viewed"  # lower-cased when stored
            event.custom.label = "home"
            event.custom.attributes["price"].number_value = 9.5
            event.custom.attributes["tags"].string_list_value.values.extend(["a", "b"])
        elif kind == "start":
            event.session_start.SetInParent()  # no country: an empty detail, still present
        elif kind == "heartbeat":
            event.session_heartbeat.duration.FromSeconds(30)
        elif kind == "attributes":
            operation = event.attribute_operations.operations.add(
                kind=types_pb2.ATTRIBUTE_OPERATION_KIND_SET, custom_attribute="Plan"
            )
            operation.value.string_value = "pro"
        elif kind == "subscription":
            event.subscription_change.channel = types_pb2.CHANNEL_EMAIL
            event.subscription_change.kind = types_pb2.SUBSCRIPTION_KIND_MARKETING
        elif kind == "install":
            event.installation_update.app_version = "1.2"
        elif kind == "crash":
            event.crash.name = "Boom"
        # "bad" has no payload: rejected
        events.append(event)
    return events


def validated() -> list[ValidEvent]:
    valid, rejected = validate_events(batch(), None, NOW)
    assert [r.index for r in rejected] == [6]
    return valid


def accepted_of(valid: list[ValidEvent]) -> dict[int, uuid.UUID]:
    """Every event accepted but the first: installation inst-a's on FIRST, the rest on SECOND."""
    return {e.index: FIRST if e.installation_id == "inst-a" else SECOND for e in valid[1:]}


def expected_event(
    event: ValidEvent, profile_id: uuid.UUID, *, imported: bool
) -> bus_pb2.IngestedEvent:
    """The bus form of a stored event, built the plain way: every field by keyword."""
    return bus_pb2.IngestedEvent(
        event_id=event.event_id,
        installation_id=event.installation_id or "",
        custom_id=event.custom_id or "",
        profile_id=str(profile_id),
        platform=event.platform,  # type: ignore[arg-type]
        kind=event.kind,  # type: ignore[arg-type]
        session_id=event.session_id or "",
        imported=imported,
        event_time=timestamp_of(event.event_time),
        receive_time=timestamp_of(NOW),
        **{event.detail_field: event.detail},  # type: ignore[arg-type]
    )


def test_validate_events_splits_a_batch_in_request_order() -> None:
    valid, rejected = validate_events(batch(), None, NOW)
    assert [e.index for e in valid] == [0, 1, 2, 3, 4, 5, 7]
    assert all(isinstance(e, ValidEvent) for e in valid)
    assert [type(r) for r in rejected] == [RejectedEvent]
    assert rejected[0].rejection.reason == "PAYLOAD_MISSING"


@pytest.mark.parametrize("imported", [False, True])
def test_events_ingested_holds_every_accepted_event_after_the_derived_starts(
    imported: bool,
) -> None:
    valid = validated()
    accepted = accepted_of(valid)
    derived = bus_pb2.IngestedEvent(event_id="derived", kind=types_pb2.EVENT_KIND_SESSION_START)
    message, ingested = events_ingested(
        PROJECT,
        "batch-1",
        valid,
        accepted,
        NOW,
        NOW + timedelta(seconds=1),
        imported=imported,
        session_countries={("inst-b", "s1"): "FR"},
        derived_starts=[derived],
    )
    assert message.project_id == str(PROJECT)
    assert message.batch_id == "batch-1"
    assert message.commit_time == timestamp_of(NOW + timedelta(seconds=1))
    expected = [derived]
    for event in valid[1:]:
        one = expected_event(event, accepted[event.index], imported=imported)
        if event.kind == types_pb2.EVENT_KIND_SESSION_HEARTBEAT:
            one.session.country = "FR"  # the heartbeat of inst-b takes its session's country
        expected.append(one)
    assert list(message.events) == expected
    assert ingested == expected
    start = next(e for e in ingested if e.event_id == "e1")
    assert start.WhichOneof("detail") == "session"  # present, though empty
    assert message.events[-1].custom_id == "user-7"
    assert message.events[-1].installation_id == ""


def test_events_ingested_of_no_accepted_event_is_empty() -> None:
    message, ingested = events_ingested(
        PROJECT, "b", validated(), {}, NOW, NOW, imported=False, session_countries={}
    )
    assert ingested == []
    assert len(message.events) == 0


def test_serialized_profile_changes_read_as_the_messages_built_field_by_field() -> None:
    valid = validated()
    accepted = accepted_of(valid)
    _, ingested = events_ingested(
        PROJECT, "b", valid, accepted, NOW, NOW, imported=False, session_countries={}
    )
    change_time = Timestamp(seconds=1_900_000_000, nanos=5)
    versions = {FIRST: 300}  # two varint bytes; SECOND's version unknown: 0 (omitted)
    built = profile_changes(PROJECT, ingested, versions, change_time)
    serialized = serialized_profile_changes(PROJECT, ingested, versions, change_time)
    assert len(built) == len(serialized) == 2
    for message, notice in zip(built, serialized, strict=True):
        assert (notice.project_id, notice.profile_id) == (message.project_id, message.profile_id)
        assert bus_pb2.ProfileChanged.FromString(notice.data) == message
        # Fields in number order, events last: the very bytes of the whole message.
        assert notice.data == message.SerializeToString(deterministic=True)
    first = bus_pb2.ProfileChanged.FromString(serialized[0].data)
    assert first.profile_version == 300
    # inst-a's session start, attribute change and installation update
    assert [e.event_id for e in first.events] == ["e1", "e3", "e5"]
    assert list(first.kinds) == [
        bus_pb2.PROFILE_CHANGE_KIND_EVENTS,
        bus_pb2.PROFILE_CHANGE_KIND_ATTRIBUTES,
        bus_pb2.PROFILE_CHANGE_KIND_INSTALLATIONS,
    ]


def test_varint_of_zero_is_one_zero_byte() -> None:
    assert _varint(0) == b"\x00"


@pytest.mark.parametrize("value", [1, 127, 128, 300, 16_383, 16_384, 2**21, 2**35 + 7])
def test_varint_is_protobufs_encoding(value: int) -> None:
    # An int64 field on the wire: its tag byte, then the value's varint.
    assert b"\x08" + _varint(value) == Timestamp(seconds=value).SerializeToString()
